"""train.py: DDP over 2 gloo processes equals one process with the doubled batch (and gradient
accumulation), resuming equals not stopping (after SIGTERM or a finished run), the weight-decay
groups, NaN handling, clear errors, and a short demo run that lowers the loss."""
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from support import checkpoints, images
import diffusion
import dimr
import train
from td_ln import TimeDependentParameter
from util import free_port

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
TINY = ["--arch", "widths=32,16", "depths=2,2", "num_heads=2"]
QUIET = ["--sample-every", "0", "--eval-images", "0", "--log-every", "1", "--threads", "1"]


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
def test_weight_decay_groups_are_the_releases(norm):
    """The release's utils.trainable_parameters: decay on every parameter but those named
    `*.nodecay_weight` / `*.nodecay_bias`, i.e. (checkpoints.OFFICIAL_KEYS) the TD slopes and
    offsets
    w, b."""
    model = dimr.DiMR(dimr.get_config("s", widths=(32, 16), depths=(3, 2), num_heads=2, norm=norm))
    decay, no_decay = train.param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {n for n in names.values() if re.search(r"\.(gamma|beta)\.(w|b)$", n)}
    assert {names[id(p)] for p in no_decay["params"]} == exempt
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - exempt
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert len(exempt) == (0 if norm != "td" else 2 * sum(isinstance(m, TimeDependentParameter)
                                                          for m in model.modules()))
    assert {"class_embed.weight", "branches.0.pos_embed", "branches.0.blocks.0.attn.proj.bias"} <= \
        {names[id(p)] for p in decay["params"]}
    if norm == "td":
        assert "branches.0.blocks.0.norm1.gamma.p0" in {names[id(p)] for p in decay["params"]}


def test_the_optimizer_that_training_builds_exempts_exactly_the_td_slopes_and_offsets(tmp_path):
    """The AdamW of train.setup, the run's own (not param_groups alone): its groups hold each
    parameter once, the names ending in gamma/beta .w/.b (the release's nodecay_weight and
    nodecay_bias) at weight decay 0 and every other at --weight-decay."""
    cfg = train.parse_config([*TINY, *QUIET, "--results-dir", str(tmp_path), "--weight-decay",
                              "0.05"])[0]
    state = train.setup(cfg, None, None).state
    model, optimizer = state.model, state.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {n for n in names.values() if re.search(r"\.(gamma|beta)\.(w|b)$", n)}
    groups = [(g["weight_decay"], [names[id(p)] for p in g["params"]])
              for g in optimizer.param_groups]
    assert sorted(n for _, group in groups for n in group) == sorted(names.values())
    assert {decay: set(group) for decay, group in groups} \
        == {0.05: set(names.values()) - exempt, 0.0: exempt}
    assert len(exempt) == 2 * sum(isinstance(m, TimeDependentParameter)
                                  for m in model.modules()) > 0


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
# Training semantics: EMA, the global batch's rows and draws, class dropout, flips

def test_ema_after_k_steps_is_the_closed_form():
    """ema_k = d^k ema_0 + sum_i (1 - d) d^(k - i) theta_i for the model weights
    theta_1..theta_k."""
    d, k = 0.9, 5
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in ema.parameters()]
    thetas = [[torch.randn_like(p) for p in model.parameters()] for _ in range(k)]
    for theta in thetas:
        with torch.no_grad():
            for p, v in zip(model.parameters(), theta):
                p.copy_(v)
        train.ema_update(ema, model, d)
    for j, p in enumerate(ema.parameters()):
        expected = d ** k * start[j] + sum((1 - d) * d ** (k - i) * thetas[i - 1][j]
                                           for i in range(1, k + 1))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_the_ema_starts_as_an_exact_copy_of_the_model():
    """Step 0's EMA equals the initial weights bit for bit, in separate storage, without
    gradients, in eval mode (the closed form above starts from it)."""
    cfg = replace(train.DEMO, cpu_conv_kernel=True)
    state = train.new_state(dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2), cfg,
                            torch.device("cpu"), "fp32")
    model, ema = state.model.state_dict(), state.ema.state_dict()
    assert list(model) == list(ema)
    for name in model:
        assert torch.equal(model[name], ema[name]) and model[name].stride() == ema[name].stride()
        assert model[name].data_ptr() != ema[name].data_ptr()
    assert not any(p.requires_grad for p in state.ema.parameters()) and not state.ema.training


def test_without_the_multiscale_loss_the_low_resolution_head_learns_nothing(tmp_path):
    """--no-multiscale-loss (Table 5's rows before '+ multi-scale loss'): the loss is the
    full-resolution branch's term, so the 4x4 branch's output head gets no gradient and AdamW
    only decays it, w -> w (1 - lr_1 * 0.03) after one step, while its blocks still learn through
    the cascade."""
    run_dir = run(tmp_path, "--steps", "1", "--no-multiscale-loss")
    ckpt = last_checkpoint(run_dir)
    torch.manual_seed(0)
    start = dimr.DiMR(dimr.config_from_dict(ckpt["config"])).state_dict()
    lr = train.learning_rate(0, train.DEMO.lr, train.DEMO.warmup)
    head = "branches.0.head.conv.weight"
    torch.testing.assert_close(ckpt["model"][head], start[head] * (1 - lr * 0.03), rtol=0,
                               atol=1e-7)
    block = "branches.0.blocks.0.mlp.w0.weight"  # Adam's first step: lr per weight with a gradient
    assert (ckpt["model"][block] - start[block] * (1 - lr * 0.03)).abs().max() > 0.9 * lr
    loss = json.loads((run_dir / "stats.jsonl").read_text().splitlines()[-1])
    assert loss["loss"] == pytest.approx(loss["loss_branches"][-1], rel=1e-6)


def patterned_data(n=40, flip=True):
    """Images that identify their index and orientation: x[i] = i + an asymmetric ramp."""
    ramp = torch.arange(12.0).view(1, 3, 4) / 100          # (1, H=3, W=4), distinct along H and W
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + ramp
    return SimpleNamespace(dataset=TensorDataset(x, torch.arange(n) % 7), flip=flip)


def batches_of(data, G, micro, steps, world=1, rank=0, monkeypatch=None, dropout=0.1, start=0):
    if monkeypatch:
        monkeypatch.setattr(train.distributed, "world_size", lambda: world)
        monkeypatch.setattr(train.distributed, "rank", lambda: rank)
    loader = train.GlobalBatches(data, G, micro, start, torch.Generator().manual_seed(5), dropout,
                                 seed=3, workers=0)
    return [next(loader) for _ in range(steps)]


def cat_rows(step):
    return [torch.cat(parts) for parts in zip(*step)]


def test_each_process_gets_its_rows_of_the_global_batch(monkeypatch):
    """Process p of 2 (micro-batches of 2) gets rows [4p, 4p + 4) of what one process gets with
    the whole batch of 8: images, labels, steps n, noise and dropout; every epoch visits each
    image once."""
    data = patterned_data()
    whole = batches_of(data, 8, 8, 10, monkeypatch=monkeypatch)
    parts = [batches_of(data, 8, 2, 10, 2, r, monkeypatch) for r in (0, 1)]
    for s in range(10):
        assert len(parts[0][s]) == 2
        for field_whole, field_0, field_1 in zip(cat_rows(whole[s]), cat_rows(parts[0][s]),
                                                 cat_rows(parts[1][s])):
            assert torch.equal(torch.cat([field_0, field_1]), field_whole)
    seen = torch.cat([b.x0[:, 0, 0, 0] for step in whole[:5] for b in step]).round()
    assert sorted(seen.tolist()) == list(range(40))       # 5 steps of 8 = one epoch, a permutation
    resumed = batches_of(data, 8, 8, 3, monkeypatch=monkeypatch, start=7)
    for a, b in zip(resumed, whole[7:]):
        # a restarted loader finds the same images (its draws come from the generator, restored
        # apart)
        assert torch.equal(a[0].x0[:, 0, 0, 0].round(), b[0].x0[:, 0, 0, 0].round())


def test_flips_go_along_the_width_only_for_data_that_has_flips():
    data, ramp = patterned_data(), torch.arange(12.0).view(1, 3, 4) / 100
    rows = [b for step in batches_of(data, 8, 8, 25) for b in step]
    flipped = 0
    for b in rows:
        for x in b.x0:
            frac = x - x[0, 0, 0].round()  # the ramp, maybe flipped
            is_flipped = torch.allclose(frac, ramp.flip(-1), atol=1e-4)
            assert is_flipped or torch.allclose(frac, ramp, atol=1e-4)
            flipped += is_flipped
    assert abs(flipped - 100) < 4 * 10  # 200 draws of p = 1/2: within 4 standard deviations
    unflipped = [b for step in batches_of(patterned_data(flip=False), 8, 8, 5) for b in step]
    assert all(torch.allclose(x - x[0, 0, 0].round(), ramp, atol=1e-4)
               for b in unflipped for x in b.x0)


def test_class_dropout_rate_and_the_null_class(monkeypatch):
    rows = [b for step in batches_of(patterned_data(), 8, 8, 500, dropout=0.1) for b in step]
    drop = torch.cat([b.drop for b in rows])
    n = len(drop)                                          # 4000 Bernoulli(0.1) draws
    assert abs(drop.float().sum().item() - 0.1 * n) < 4 * math.sqrt(n * 0.1 * 0.9)
    n_steps = torch.cat([b.n for b in rows])
    assert n_steps.min() >= 1 and n_steps.max() <= 1000 \
        and abs(n_steps.float().mean().item() - 500.5) < 20

    model = dimr.DiMR(dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2,
                                      input_size=4))
    seen = []

    def net(x, n, y):
        seen.append(y.clone())
        return model(x, n, y)

    batch = train.Batch(torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 4, 5]),
                        torch.full((6,), 500), torch.randn(6, 1, 4, 4),
                        torch.tensor([True, False, True, False, False, True]))
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = replace(train.DEMO, grad_clip=None)
    state = train.TrainState(model, copy.deepcopy(model), optimizer,
                             torch.amp.GradScaler("cpu", enabled=False), torch.Generator())
    train.train_step(net, state, [batch], diffusion.DiscreteSchedule(), cfg, None)
    assert seen[0].tolist() == [10, 1, 10, 3, 4, 10]       # dropped labels are the null class 10


# ----------------------------------------------------------------------------------------------
# DDP equivalence

def torchrun(tmp_path, *argv):
    """train.py on 2 gloo processes; returns the run folder it created or resumed and its stdout."""
    results = tmp_path / "runs"
    before = set(results.glob("*"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(TRAIN_PY), *TINY, *QUIET,
           "--results-dir", str(results), *argv]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    created = set(results.glob("*")) - before
    return (created.pop() if created else Path(argv[argv.index("--resume") + 1])), proc.stdout


COMMON = ["--batch-size", "16", "--lr", "1e-3", "--warmup", "0"]


def test_ddp_accumulation_and_resume_equal_one_process(tmp_path):
    """Against one process with the whole batch of 16 for 6 steps:
    - 2 processes x 4 images x 2 accumulation steps; 1 process x 8 x 2;
    - 2 processes x 4 x 2 stopped at step 3 and resumed on 2 processes (equal to the uninterrupted
      2-process run bit for bit);
    - 1 process stopped at step 3 and resumed on 2 processes (another world size).
    Summation order differs between these layouts, so they agree to float32 rounding."""
    single = run(tmp_path, "--steps", "6", *COMMON)
    accumulated = run(tmp_path, "--steps", "6", *COMMON, "--micro-batch", "8")
    ddp, out = torchrun(tmp_path, "--steps", "6", *COMMON, "--micro-batch", "4")
    assert "batch 16 = 2 process(es) x 4 x 2 accumulation step(s)" in out
    ddp_resumed, _ = torchrun(tmp_path, "--steps", "3", *COMMON, "--micro-batch", "4")
    torchrun(tmp_path, "--resume", str(ddp_resumed), "--steps", "6")
    one_then_two = run(tmp_path, "--steps", "3", *COMMON)
    _, out = torchrun(tmp_path, "--resume", str(one_then_two), "--steps", "6")
    assert "resuming" in out and "batch 16 = 2 process(es) x 8 x 1" in out

    ref = last_checkpoint(single)
    torch.manual_seed(0)
    init = dimr.DiMR(dimr.config_from_dict(ref["config"])).state_dict()  # train.py's initialisation
    assert max_diff(ref["model"], init) > 1e-3  # the runs moved far beyond the tolerance below
    for run_dir in (accumulated, ddp, ddp_resumed, one_then_two):
        ckpt = last_checkpoint(run_dir)
        assert ckpt["step"] == 6
        assert max_diff(ref["model"], ckpt["model"]) < 1e-5
        assert max_diff(ref["ema"], ckpt["ema"]) < 1e-5
        np.testing.assert_allclose(losses(run_dir), losses(single), rtol=1e-5)
    a, b = last_checkpoint(ddp), last_checkpoint(ddp_resumed)
    assert all(torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key])
    assert losses(ddp) == losses(ddp_resumed)


def moments_distance(mu1, sigma1, mu2, sigma2):
    """A cheap stand-in for the Fréchet distance in the FID-during-training tests (scipy's sqrtm of
    a 2048 x 2048 product takes minutes on a loaded 2-core CPU; tests/test_fid.py checks the real
    one): a function of the same statistics, so it still sees every gathered feature row."""
    return float(np.sum((mu1 - mu2) ** 2) + abs(np.trace(sigma1) - np.trace(sigma2)))


def fid_worker(rank, argv, port):
    """One process of a 2-process train.py run started by torch.multiprocessing.spawn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import fid
    fid.frechet_distance = moments_distance
    train.main(argv)


def test_fid_during_training_on_two_processes(tmp_path, monkeypatch):
    """--fid-every on 2 processes: each samples and embeds its share of the FID samples and rank 0
    gets every row: the value logged at each FID step equals the one recomputed here from that
    checkpoint's EMA in one process (same seeds, 'even' labels, sampler, no guidance)."""
    import fid
    import sample
    inception = fid.load_inception()
    real = np.repeat(np.clip(load_digits().images[:10] * 16, 0, 255).astype(np.uint8)[..., None],
                     3, -1)
    ref = fid.feature_statistics(fid.inception_features(real, inception))
    fid.save_statistics(tmp_path / "ref.npz", *ref)
    argv = [*TINY, *QUIET, "--results-dir", str(tmp_path / "runs"), "--steps", "4", *COMMON,
            "--log-every", "2", "--ckpt-every", "2", "--keep", "2", "--fid-every", "2",
            "--fid-ref", str(tmp_path / "ref.npz"), "--fid-images", "5", "--sample-steps", "3"]
    torch.multiprocessing.spawn(fid_worker, args=(argv, free_port()), nprocs=2)
    run_dir = next((tmp_path / "runs").iterdir())
    logged = {s["step"]: s["fid"]
              for s in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines())
              if "fid" in s}
    assert set(logged) == {2, 4}
    for step in (2, 4):
        ckpt = checkpoints.load(run_dir / "checkpoints" / f"ckpt_{step:07d}.pt")
        ema = dimr.DiMR(dimr.config_from_dict(ckpt["config"]))
        ema.load_state_dict(ckpt["ema"])
        labels = np.arange(5) * 10 // 5                       # 'even' classes over the 10 digits
        x = sample.generate(ema.eval(), labels, train.FID_SEED + np.arange(5), steps=3,
                            guidance=0.0)
        features = fid.inception_features(images.to_uint8(x), inception)
        expected = moments_distance(*fid.feature_statistics(features), *ref)
        assert logged[step] == pytest.approx(expected, rel=1e-4)


def test_the_best_fid_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    """FIDs 5, 3, 4, 6 at steps 2, 4, 6, 8 with --keep 1: step 4's checkpoint stays beside the
    last one, stats.jsonl holds every FID, and the summary names the best."""
    values = iter([5.0, 3.0, 4.0, 6.0])
    monkeypatch.setattr(train.fid, "load_inception", lambda device: None)
    monkeypatch.setattr(train.fid, "load_statistics", lambda path: None)
    monkeypatch.setattr(train, "compute_fid", lambda *args: next(values))
    run_dir = run(tmp_path, "--steps", "8", "--log-every", "2", "--ckpt-every", "2", "--keep", "1",
                  "--fid-every", "2", "--fid-ref", "unused.npz")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) \
        == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    fids = [(s["step"], s["fid"])
            for s in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines())
            if "fid" in s]
    assert fids == [(2, 5.0), (4, 3.0), (6, 4.0), (8, 6.0)]
    assert "best FID-10000: 3.0000 at step 4" in capsys.readouterr().out


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
    assert b["train_config"]["steps"] == 6


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
    assert path.name == "ckpt_0000002.pt" \
        and [p.name for p in path.parent.iterdir()] == ["ckpt_0000002.pt"]
    ckpt = checkpoints.load(path)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value.code)


def test_clear_errors(tmp_path):
    run_dir = run(tmp_path, "--steps", "1")
    assert error_of(["--resume", str(tmp_path / "nope")]).startswith("error: --resume") \
        and "no such run" in error_of(["--resume", str(tmp_path / "nope")])
    assert re.fullmatch(r"error: --variant DiMR-M/3R differs from the run's DiMR-S/2R "
                        r"\(.*ckpt_0000001.pt\); "
                        r"a resumed run keeps the options it was started with",
                        error_of(["--resume", str(run_dir), "--variant", "m"]))
    demo_lr = train.RECIPES["DiMR-S/2R"].lr
    assert f"error: --lr 0.1 differs from the run's {demo_lr}" \
        in error_of(["--resume", str(run_dir), "--lr", "0.1"])
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
        "error: --batch-size 10 over 1 processes is 10 per process, not a multiple of " \
        "--micro-batch 4"
    assert error_of(["--arch", "widths=a,b"]) \
        == "error: --arch widths=a,b: widths must be integers a,b,..."
    assert error_of(["--ema", "1.5"]) \
        == "error: --ema must be a finite number >= 0 and < 1, got 1.5"
    assert error_of(["--lr", "nan"]) == "error: --lr must be a finite number >= 0, got nan"
    assert error_of(["--steps", "0"]) == "error: --steps must be an integer >= 1, got 0"


# A fresh interpreter in which the machine looks overloaded: os.getloadavg and /proc/loadavg say
# 64 runnable tasks, /proc/stat that no core has been idle since its last reading. Then train.py.
LOADED_MACHINE = """
import builtins, io, os, runpy, sys
os.getloadavg = lambda: (64.0, 64.0, 64.0)
real_open, busy = builtins.open, [0]
def loaded_open(file, mode="r", *args, **kwargs):
    if str(file) not in ("/proc/loadavg", "/proc/stat"):
        return real_open(file, mode, *args, **kwargs)
    busy[0] += 1000
    text = ("64.00 64.00 64.00 65/999 4242\\n" if str(file) == "/proc/loadavg" else "".join(
        f"cpu{c} {busy[0]} 0 0 1000 0 0 0 0 0 0\\n" for c in ["", *range(os.cpu_count())]))
    return io.BytesIO(text.encode()) if "b" in mode else io.StringIO(text)
builtins.open = loaded_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_threads_are_torchs_default_whatever_the_load(tmp_path):
    """Without --threads and OMP_NUM_THREADS: torch's default (the cores) in a fresh process (an
    earlier test may have set this one's), measured here in another fresh process; the same on a
    machine that looks overloaded, so a rule that backs off under load fails."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    default = int(subprocess.run([sys.executable, "-c",
                                  "import torch; print(torch.get_num_threads())"],
                                 env=env, capture_output=True, text=True, check=True).stdout)
    if default == 1:
        pytest.skip("one core: a rule that backs off under load would also choose 1")
    proc = subprocess.run([sys.executable, "-c", LOADED_MACHINE, str(TRAIN_PY), *TINY,
                           "--sample-every", "0", "--eval-images", "0", "--steps", "1",
                           "--results-dir", str(tmp_path)], cwd=TRAIN_PY.parent, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(tmp_path.iterdir())
    assert last_checkpoint(run_dir)["threads"] == default
    assert json.loads((run_dir / "config.json").read_text())["threads"] == default
    assert f"{default} CPU thread(s)" in proc.stdout


def test_a_resume_with_other_threads_says_so(tmp_path, capsys):
    """The checkpoint records the thread count; resuming with another says so in one line."""
    threads = torch.get_num_threads()
    try:
        run_dir = run(tmp_path, "--steps", "2", "--threads", "1")
        assert last_checkpoint(run_dir)["threads"] == 1
        capsys.readouterr()
        train.main(["--resume", str(run_dir), "--steps", "3", "--threads", "2"])
        assert "note: the run used 1 CPU threads per process and continues with 2: float sums " \
               "split differently" in capsys.readouterr().out
        assert last_checkpoint(run_dir)["threads"] == 2
        train.main(["--resume", str(run_dir), "--steps", "4", "--threads", "2"])
        assert "note: the run used" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Mixed precision and torch.compile

def digits_eval_batch(n=256):
    digits = load_digits()
    g = torch.Generator().manual_seed(123)
    x0 = torch.tensor(digits.images[:n] / 16 * 2 - 1, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target[:n])
    return x0, y, torch.randint(1, 1001, (n,), generator=g), torch.randn(x0.shape, generator=g)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_lower_the_loss(tmp_path, precision):
    """bf16 autocast, and fp16 autocast with the GradScaler, train: the fp32 noise-prediction error
    of the weights after 40 steps is well below that of the initial weights."""
    run_dir = run(tmp_path, "--steps", "40", "--warmup", "5", "--precision", precision)
    ckpt = last_checkpoint(run_dir)
    start, end = losses_at_start_and_end(ckpt)
    assert end < 0.7 * start, (start, end)
    # the scaler's state is saved when it is used
    assert (ckpt["scaler"] != {}) == (precision == "fp16")


def test_compile_runs_a_training_step(tmp_path, monkeypatch):
    """--compile: the training step through torch.compile equals the eager one. Inductor's C++ code
    generation takes minutes on a 2-core CPU, so the test compiles with the aot_eager backend: the
    same dynamo graph capture and AOTAutograd forward/backward graphs, without code generation."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
    eager = last_checkpoint(run(tmp_path, "--steps", "2"))
    compiled = last_checkpoint(run(tmp_path, "--steps", "2", "--compile"))
    assert compiled["train_config"]["compile"]
    assert max_diff(eager["model"], compiled["model"]) < 1e-5


def test_the_model_has_no_graph_breaks():
    """torch._dynamo.explain: the forward pass of DiMR (2 branches, TD-LN, GLU) is one graph."""
    model = dimr.DiMR(dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([1, 10])
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, \
        explanation.break_reasons


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


def losses_at_start_and_end(ckpt):
    """eval_loss on the digits batch of train.py's initial weights (seed 0) and of `ckpt`'s."""
    cfg = dimr.config_from_dict(ckpt["config"])
    torch.manual_seed(0)
    start = eval_loss(dimr.DiMR(cfg).state_dict(), cfg, *digits_eval_batch())
    return start, eval_loss(ckpt["model"], cfg, *digits_eval_batch())


def test_short_demo_lowers_the_loss(tmp_path, capsys):
    run_dir = run(tmp_path, "--steps", "60", "--warmup", "10", "--log-every", "10",
                  "--sample-every", "30", "--eval-images", "10")
    out = capsys.readouterr().out
    assert re.search(r"class accuracy of 10 EMA samples \(evenly over the 10 classes, 10 sampler "
                     r"steps, guidance scale 2, i\.e\. cfg-scale s = 1\) by an SVM of the real "
                     r"digits: \d+\.\d% \(after 60 steps the model has not learned the digits "
                     r"yet", out)
    assert {p.name for p in (run_dir / "samples").iterdir()} \
        == {"step_0000030.png", "step_0000060.png", "final_0000060.png"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train_config"]["lr"] == train.RECIPES["DiMR-S/2R"].lr \
        and config["model"]["widths"] == [32, 16]
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [10, 20, 30, 40, 50, 60]
    assert set(stats[0]) >= {"loss", "loss_branches", "lr", "grad_norm", "images_per_s",
                             "s_per_step"}
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["samples"] == 10 and evaluation["guidance"] == 1.0

    # Measured independently of the logs: the trained weights predict the noise better than the
    # start.
    start, end = losses_at_start_and_end(last_checkpoint(run_dir))
    assert end < 0.6 * start, (start, end)
