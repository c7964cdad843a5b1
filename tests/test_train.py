"""train.py: DDP over 2 gloo processes equals one process with the doubled batch (and gradient
accumulation), resuming equals not stopping (after SIGTERM or a finished run), the weight-decay
groups, NaN handling, clear errors, and a short demo run that lowers the loss."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import checkpoints
import diffusion
import dimr
import train
from util import free_port

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
TINY = ["--arch", "widths=32,16", "depths=2,2", "num_heads=2"]
QUIET = ["--sample-every", "0", "--eval-per-class", "0", "--log-every", "1", "--threads", "1"]


def run(tmp_path, *argv):
    """train.main in this process; returns the run folder it created or resumed."""
    results = tmp_path / "runs"
    before = set(results.glob("*"))
    train.main([*TINY, *QUIET, "--results-dir", str(results), *argv])
    created = set(results.glob("*")) - before
    return created.pop() if created else Path(argv[argv.index("--resume") + 1])


def last_checkpoint(run_dir):
    return checkpoints.load(sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------
# Weight decay, batch split, learning rate

@pytest.mark.parametrize("norm", ["td", "ln", "adaln_zero"])
def test_weight_decay_groups(norm):
    model = dimr.DiMR(dimr.get_config("s", widths=(32, 16), depths=(3, 2), num_heads=2, norm=norm))
    decay, no_decay = train.param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    # By name: weights of linears and convs decay; the class embedding, the position embeddings,
    # biases, LayerNorm gains and the TD parameters p0, p1, w, b do not.
    expected = {n for n in names.values() if n.endswith(".weight") and n != "class_embed.weight"
                and not re.search(r"\.norm\w*\.weight$", n)}
    assert {names[id(p)] for p in decay["params"]} == expected
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    if norm == "td":
        td = {n for n in names.values() if re.search(r"\.(p0|p1|w|b)$", n)}
        assert len(td) == 4 * sum(1 for n in names.values() if n.endswith(".w")) > 0
        assert td <= set(names.values()) - expected


def test_split_batch():
    assert train.split_batch(1024, 8) == (128, 1)
    assert train.split_batch(1024, 8, 32) == (32, 4)
    assert train.split_batch(64, 1, 16) == (16, 4)
    with pytest.raises(ValueError, match="--batch-size 1024 is not divisible by the 6 processes"):
        train.split_batch(1024, 6)
    with pytest.raises(ValueError, match="128 per process, not a multiple of --micro-batch 48"):
        train.split_batch(1024, 8, 48)


def test_learning_rate_warmup():
    lrs = [train.learning_rate(s, 2e-4, 5000) for s in (0, 2499, 4999, 5000, 10 ** 6)]
    assert lrs == pytest.approx([2e-4 / 5000, 2e-4 / 2, 2e-4, 2e-4, 2e-4], rel=1e-12)
    assert train.learning_rate(0, 1e-3, 0) == 1e-3


# ----------------------------------------------------------------------------------------------
# DDP equivalence

def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    common = [*TINY, *QUIET, "--steps", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0"]
    single = run(tmp_path, "--steps", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0")
    accumulated = run(tmp_path, "--steps", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0",
                      "--micro-batch", "8")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(TRAIN_PY), *common,
           "--results-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "batch 16 = 2 process(es) x 8 x 1" in proc.stdout
    ddp = next((tmp_path / "ddp").iterdir())

    a, b, c = (last_checkpoint(d) for d in (single, ddp, accumulated))
    assert a["step"] == b["step"] == c["step"] == 4
    torch.manual_seed(0)
    init = dimr.DiMR(dimr.config_from_dict(a["config"])).state_dict()  # train.py's initialisation
    assert max_diff(a["model"], init) > 1e-3        # the runs moved far beyond the tolerance below
    assert max_diff(a["model"], b["model"]) < 1e-5
    assert max_diff(a["model"], c["model"]) < 1e-5
    assert max_diff(a["ema"], b["ema"]) < 1e-5
    np.testing.assert_allclose(losses(ddp), losses(single), rtol=1e-5)
    np.testing.assert_allclose(losses(accumulated), losses(single), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Resume equivalence

def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight = run(tmp_path, "--steps", "6")
    update, calls = train.ema_update, []

    def preempt_at_step_3(*args):   # SIGTERM arrives during step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        update(*args)

    monkeypatch.setattr(train, "ema_update", preempt_at_step_3)
    stopped = run(tmp_path, "--steps", "6")
    assert "stopped by signal at step 3" in capsys.readouterr().out
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["ckpt_0000003.pt"]
    monkeypatch.setattr(train, "ema_update", update)
    run(tmp_path, "--resume", str(stopped))

    a, b = last_checkpoint(straight), last_checkpoint(stopped)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert losses(stopped) == losses(straight) and len(losses(straight)) == 6


def test_resume_extends_a_finished_run(tmp_path):
    straight = run(tmp_path, "--steps", "6")
    short = run(tmp_path, "--steps", "3")
    run(tmp_path, "--resume", str(short), "--steps", "6")
    a, b = last_checkpoint(straight), last_checkpoint(short)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(short) == losses(straight)
    assert b["options"]["steps"] == 6


# ----------------------------------------------------------------------------------------------
# Failures

def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    loss_fn, calls = diffusion.multiscale_loss, []

    def nan_at_step_3(preds, eps, weights=None):
        calls.append(1)
        total, terms = loss_fn(preds, eps, weights)
        return (total * math.nan if len(calls) == 3 else total), terms

    monkeypatch.setattr(diffusion, "multiscale_loss", nan_at_step_3)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "6", "--ckpt-every", "2")
    message = str(e.value.code)
    assert message.startswith("error: non-finite loss at step 3; last good checkpoint: ")
    path = Path(message.split(": ")[-1])
    assert path.name == "ckpt_0000002.pt" and [p.name for p in path.parent.iterdir()] == ["ckpt_0000002.pt"]
    ckpt = checkpoints.load(path)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value.code)


def test_clear_errors(tmp_path):
    run_dir = run(tmp_path, "--steps", "1")
    assert error_of(["--resume", str(tmp_path / "nope")]).startswith("error: --resume") and "no such run" in \
        error_of(["--resume", str(tmp_path / "nope")])
    assert re.fullmatch(r"error: --variant DiMR-M/3R differs from the run's DiMR-S/2R \(.*ckpt_0000001.pt\); "
                        r"a resumed run keeps the options it was started with",
                        error_of(["--resume", str(run_dir), "--variant", "m"]))
    demo_lr = train.RECIPES["DiMR-S/2R"]["lr"]
    assert f"error: --lr 0.1 differs from the run's {demo_lr}" in error_of(["--resume", str(run_dir), "--lr", "0.1"])
    ckpt = run_dir / "checkpoints" / "ckpt_0000001.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])           # truncated
    assert error_of(["--resume", str(run_dir)]).startswith(f"error: cannot read checkpoint {ckpt}")
    ckpt.unlink()
    assert error_of(["--resume", str(run_dir)]) == \
        f"error: --resume {run_dir}: no checkpoints/ckpt_*.pt in this run folder"
    checkpoints.save({"model": {}}, ckpt)                # readable, but not ours
    assert "not a train.py checkpoint" in error_of(["--resume", str(ckpt)])

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    assert error_of(["--data", str(tmp_path / "imgs"), "--results-dir", str(tmp_path)]).startswith(
        f"error: no images (.png, .jpg, .jpeg, .bmp, .webp) in {tmp_path / 'imgs'}")
    assert error_of(["--variant", "m"]).startswith("error: DiMR-M/3R trains on ImageNet 64x64")
    assert error_of(["--batch-size", "10", "--micro-batch", "4"]) == \
        "error: --batch-size 10 over 1 processes is 10 per process, not a multiple of --micro-batch 4"
    assert error_of(["--arch", "widths=a,b"]) == "error: --arch widths=a,b: widths must be integers a,b,..."
    assert error_of(["--ema", "1.5"]) == "error: --ema must be below 1, got 1.5"


# ----------------------------------------------------------------------------------------------
# The demo, shortened

def eval_loss(state_dict, cfg, x0, y, n, eps):
    """Full-resolution noise-prediction MSE with x_n from the closed-form schedule."""
    model = dimr.DiMR(cfg)
    model.load_state_dict(state_dict)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[n - 1].float()[:, None, None, None]
    x_n = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    with torch.no_grad():
        return torch.mean((model(x_n, n.float(), y)[-1] - eps) ** 2).item()


def test_short_demo_lowers_the_loss(tmp_path, capsys):
    run_dir = run(tmp_path, "--steps", "60", "--warmup", "10", "--log-every", "10", "--sample-every", "30",
                  "--eval-per-class", "1")
    out = capsys.readouterr().out
    assert re.search(r"class accuracy of 10 EMA samples \(1 per class, 25 DPM-Solver steps, guidance scale 2, "
                     r"i\.e\. cfg-scale s = 1\) by an SVM of the real digits: \d+\.\d%", out)
    assert {p.name for p in (run_dir / "samples").iterdir()} == {"step_0000030.png", "step_0000060.png",
                                                                  "final_0000060.png"}
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["lr"] == train.RECIPES["DiMR-S/2R"]["lr"] and config["model"]["widths"] == [32, 16]
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [10, 20, 30, 40, 50, 60]
    assert set(stats[0]) >= {"loss", "loss_branches", "lr", "grad_norm", "images_per_s", "s_per_step"}
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert 0 <= evaluation["accuracy"] <= 1 and evaluation["cfg_scale"] == 1.0

    # Measured independently of the logs: the trained weights predict the noise better than the start.
    ckpt = last_checkpoint(run_dir)
    cfg = dimr.config_from_dict(ckpt["config"])
    digits = load_digits()
    g = torch.Generator().manual_seed(123)
    x0 = torch.tensor(digits.images[:256] / 16 * 2 - 1, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target[:256])
    n = torch.randint(1, 1001, (256,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.manual_seed(0)
    start = eval_loss(dimr.DiMR(cfg).state_dict(), cfg, x0, y, n, eps)
    end = eval_loss(ckpt["model"], cfg, x0, y, n, eps)
    assert end < 0.6 * start, (start, end)
