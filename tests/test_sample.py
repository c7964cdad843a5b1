"""sample.py: per-image seeds (DPM-Solver and DDPM), the ADM .npz layout, the split of indices over
processes, the CLI against a hand-written sampling loop, errors."""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from support import checkpoints, images
import dimr
import sample
from diffusion import ode_sample
from util import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(widths=(32, 16), depths=(2, 2), num_heads=2)  # DiMR-S/2R shape, 8x8x1, 10 classes


def tiny_model(seed):
    torch.manual_seed(seed)
    return dimr.DiMR(dimr.get_config("s", **TINY)).eval()


def save_ckpt(path, model, ema):
    checkpoints.save({"config": dataclasses.asdict(model.config), "model": model.state_dict(),
                      "ema": ema.state_dict()}, path)
    return path


class ZeroEps(torch.nn.Module):
    """A 'model' predicting eps = 0 for every branch: x_t / alpha_t stays constant along the ODE."""

    def __init__(self, channels=3, size=4, num_classes=5):
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, input_size=size,
                                      num_classes=num_classes)

    def forward(self, x, n, y):
        return [torch.zeros_like(x)]


def test_to_uint8_rounds_and_clips_like_the_adm_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(2, 3, 5, 5, generator=g) * 2.4 - 1.2,
                   torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 5, 5)])
    ref = np.clip(np.floor(x.numpy().astype(np.float64) * 127.5 + 127.5 + 0.5), 0, 255)
    out = images.to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 5, 3)
    np.testing.assert_array_equal(out, ref.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(out[2, 0, :, 0], [0, 128, 255, 0, 255])  # x = -1, 0, 1, -2, 2
    grey = images.to_uint8(x[:, :1])
    np.testing.assert_array_equal(grey, np.repeat(ref[:, :1].transpose(0, 2, 3, 1), 3, axis=3))


@pytest.mark.parametrize("method,order,spacing", [("singlestep", 3, "time_uniform"),
                                               ("singlestep", 2, "logSNR"),
                                               ("unipc", 2, "time_quadratic"),
                                               ("unipc", 3, "logSNR")])
def test_generate_starts_image_i_from_seed_i(method, order, spacing):
    """With eps = 0 the probability-flow ODE maps x_T to x_T * alpha(n=1) / alpha(n=1000) exactly,
    and every DPM-Solver and UniPC step is exact for it, so the output exposes each image's
    starting noise."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    factor = np.sqrt(alpha_bar[0]) / np.sqrt(alpha_bar[-1])
    seeds = [7, 123, 7, 2 ** 40]
    x = sample.generate(ZeroEps(), [0, 4, 2, 1], seeds, steps=6, batch_size=3,
                        sampler=dict(method=method, order=order, spacing=spacing))
    for i, s in enumerate(seeds):
        x_T = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(x[i], x_T * factor, rtol=1e-5, atol=1e-5)
    assert not torch.equal(x[0], x[1])


def test_ddpm_draws_each_images_step_noise_after_its_x_T():
    """With eps = 0 a DDPM step is x_{n-1} = x_n / sqrt(1 - beta_n) + sqrt(beta~_n) z, written out
    here image by image, z drawn from the image's own generator right after its x_T."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    seeds = [5, 9, 5]
    # image 2 in another batch
    x = sample.generate(ZeroEps(), [0, 1, 2], seeds, sampler="ddpm", batch_size=2)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        ref = torch.randn(3, 4, 4, generator=g).double()
        for n in range(1000, 0, -1):
            ref = ref / math.sqrt(1 - betas[n - 1])
            if n > 1:
                posterior_var = betas[n - 1] * (1 - alpha_bar[n - 2]) / (1 - alpha_bar[n - 1])
                ref = ref + math.sqrt(posterior_var) * torch.randn(3, 4, 4, generator=g).double()
        torch.testing.assert_close(x[i], ref.float(), rtol=1e-4, atol=1e-4)
    assert (x[0] - x[1]).abs().max() > 1


def test_generate_does_not_depend_on_the_batch_an_image_lands_in():
    model = tiny_model(0)
    labels, seeds = [3, 1, 4, 1, 5, 9], [10, 11, 12, 13, 14, 15]
    full = sample.generate(model, labels, seeds, steps=4, batch_size=6)
    part = sample.generate(model, labels[3:], seeds[3:], steps=4, batch_size=2)
    assert full.shape == (6, 1, 8, 8)
    torch.testing.assert_close(part, full[3:], rtol=0, atol=1e-5)
    # different seeds and classes give different images
    assert (full[0] - full[2]).abs().max() > 0.01


def test_amp_dtype_runs_the_network_under_autocast():
    seen = []

    class Probe(ZeroEps):
        def forward(self, x, t, y):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                        else None)
            return super().forward(x, t, y)

    x = sample.generate(Probe(), [0], [0], steps=3, amp_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] * 3 and x.dtype == torch.float32
    seen.clear()
    sample.generate(Probe(), [0], [0], steps=3)
    assert seen == [None] * 3


def test_parse_classes_lists_ranges_and_random():
    np.testing.assert_array_equal(sample.parse_classes("3,1,4", 7, 10, 0), [3, 1, 4, 3, 1, 4, 3])
    np.testing.assert_array_equal(sample.parse_classes("2-4", 5, 10, 0), [2, 3, 4, 2, 3])
    a = sample.parse_classes("random", 2000, 10, seed=5)
    assert a.dtype == np.int64 and a.min() == 0 and a.max() == 9
    np.testing.assert_array_equal(a, sample.parse_classes("random", 2000, 10, seed=5))
    assert (a != sample.parse_classes("random", 2000, 10, seed=6)).mean() > 0.8
    assert np.all(np.abs(np.bincount(a, minlength=10) - 200) < 60)  # ~ 5 binomial std
    for bad in ("5-2", "a,b", "1,,2", "x-3"):
        with pytest.raises(ValueError, match="--classes"):
            sample.parse_classes(bad, 4, 10, 0)
    with pytest.raises(ValueError, match=r"class ids \[10\] out of range 0..9"):
        sample.parse_classes("0,10", 4, 10, 0)


def test_even_classes_are_the_releases_fid_protocol():
    """The release's eval.py samples arange(K).repeat_interleave(50) for 50 K images."""
    np.testing.assert_array_equal(sample.parse_classes("even", 50_000, 1000, 0),
                                  np.repeat(np.arange(1000), 50))
    np.testing.assert_array_equal(sample.parse_classes("even", 6, 4, 0), [0, 0, 1, 2, 2, 3])
    assert sample.build_parser().parse_args(["c.pt", "--out", "o"]).classes == "even"


def test_npz_has_the_adm_layout(tmp_path):
    g = np.random.default_rng(0)
    parts = [g.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8) for n in (3, 0, 4)]
    np.save(tmp_path / "p.npy", parts[2])
    # part files are memory-mapped in sample.py
    parts[2] = np.load(tmp_path / "p.npy", mmap_mode="r")
    labels = np.array([5, 1, 0, 2, 2, 9, 3])
    images.write_npz(tmp_path / "s.npz", parts, labels)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "labels"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (7, 6, 6, 3)
        np.testing.assert_array_equal(f["arr_0"], np.concatenate([np.asarray(p) for p in parts]))
        assert f["labels"].dtype == np.int64
        np.testing.assert_array_equal(f["labels"], labels)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_grid_shows_each_image_upscaled_with_its_label(tmp_path):
    pictures = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    pictures[0, :4] = (255, 0, 0)  # top half red
    pictures[1] = (0, 0, 255)
    scale = images.save_grid(pictures, [7, 2, 5], tmp_path / "g.png", ncol=2)
    assert scale == 8  # 8x8 -> 64x64 (GRID_MIN_CELL)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    p = images.GRID_PAD
    np.testing.assert_array_equal(grid[p:p + 64, p:p + 64],
                                  np.kron(pictures[0], np.ones((8, 8, 1), np.uint8)))
    second = grid[p:p + 64, 2 * p + 64:2 * p + 128]
    assert (second == (0, 0, 255)).all()
    label_strip = grid[p + 64:p + 64 + 10, p:p + 64]
    assert (label_strip < 128).any()  # the class id is drawn in black under the image


def hand_sampled_uint8(model, labels, seeds, steps, s=1.0, null_class=10, solver=None):
    """What the CLI should write, written out: x_T from each seed's generator, the release's
    guidance eps_c + s (eps_c - eps_u) at s = 1, the digits' default (DIGITS_GUIDANCE, written
    here as a number), the default sampler (diffusion.py,
    tested against closed forms) in fp32, then floor(127.5 x + 128) clipped to 0..255 and the grey
    channel repeated."""
    x_T = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed))
                       for seed in seeds])
    y = torch.tensor(labels)

    def eps_fn(x, n):
        out = model(torch.cat([x, x]), torch.cat([n, n]),
                    torch.cat([y, torch.full_like(y, null_class)]))[-1]
        eps_c, eps_u = out.chunk(2)
        return eps_c + s * (eps_c - eps_u)

    with torch.no_grad():
        x = ode_sample(eps_fn, x_T, steps, **(solver or {})).double().numpy()  # (N, 1, 8, 8)
    pixels = np.clip(np.floor(127.5 * x + 128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(pixels, 3, axis=3)


def test_cli_writes_grid_pngs_and_npz_from_the_chosen_weights(tmp_path):
    raw, ema = tiny_model(0), tiny_model(1)
    ckpt = save_ckpt(tmp_path / "c.pt", raw, ema)
    common = ["--num-images", "5", "--classes", "2,7", "--seed", "100", "--steps", "4",
              "--batch-size", "2"]
    sample.main([str(ckpt), "--out", str(tmp_path / "ema"), *common])
    sample.main([str(ckpt), "--out", str(tmp_path / "raw"), "--weights", "model", "--no-png",
                 *common])
    labels = [2, 7, 2, 7, 2]
    seeds = range(100, 105)
    with np.load(tmp_path / "ema" / "samples.npz") as f:
        arr, lab = f["arr_0"], f["labels"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(lab, labels)
    np.testing.assert_array_equal(arr, hand_sampled_uint8(ema, labels, seeds, steps=4))
    for i in range(5):
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "ema" / "images" / f"{i:06d}.png")), arr[i])
    assert (tmp_path / "ema" / "grid.png").is_file() and not (tmp_path / "ema" / "parts").exists()
    with np.load(tmp_path / "raw" / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], hand_sampled_uint8(raw, labels, seeds, steps=4))
    assert not (tmp_path / "raw" / "images").exists()
    # fp32 on every device
    assert sample.build_parser().parse_args([str(ckpt), "--out", "o"]).autocast == "fp32"


def test_method_release_is_the_releases_sampler_whatever_order_and_skip_say(tmp_path):
    ckpt = save_ckpt(tmp_path / "c.pt", tiny_model(0), tiny_model(1))
    sample.main([str(ckpt), "--out", str(tmp_path / "r"), "--num-images", "3", "--classes", "4",
                 "--steps", "7", "--method", "release", "--order", "2", "--skip", "logSNR",
                 "--no-png"])
    # tests/test_diffusion.py: the release's
    solver = dict(order=3, method="singlestep", spacing="time_uniform")
    with np.load(tmp_path / "r" / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], hand_sampled_uint8(tiny_model(1), [4] * 3,
                                                                     range(3), 7, solver=solver))


def test_two_processes_write_the_same_npz_as_one(tmp_path):
    ckpt = save_ckpt(tmp_path / "c.pt", tiny_model(0), tiny_model(2))
    args = [str(ckpt), "--num-images", "5", "--classes", "random", "--seed", "3", "--steps", "4",
            "--batch-size", "2", "--no-png"]
    sample.main([*args, "--out", str(tmp_path / "one")])
    result = torchrun([*args, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 2 process(es)" in result.stdout
    with np.load(tmp_path / "one" / "samples.npz") as a, \
            np.load(tmp_path / "two" / "samples.npz") as b:
        assert a["arr_0"].shape == (5, 8, 8, 3)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", str(ROOT / "sample.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)


class Killed(Exception):
    pass


def interrupt_after(monkeypatch, batches):
    """Make sample.generate fail like a killed process after `batches` batches."""
    calls, generate = [], sample.generate

    def failing(*args, **kwargs):
        if len(calls) == batches:
            raise Killed
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", failing)


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Killed after 2 of 4 batches (and with a half-written temporary file left behind), then rerun
    with the same arguments, first on 2 processes, then once more on 1: the same samples.npz as an
    uninterrupted run, and only the missing batches are sampled again."""
    ckpt = save_ckpt(tmp_path / "c.pt", tiny_model(0), tiny_model(3))
    args = [str(ckpt), "--num-images", "7", "--seed", "4", "--steps", "4", "--batch-size", "2"]
    sample.main([*args, "--out", str(tmp_path / "whole")])
    out = tmp_path / "resumed"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Killed):
        sample.main([*args, "--out", str(out)])
    assert sorted(p.name for p in (out / "parts").glob("batch_*")) \
        == ["batch_000000.npy", "batch_000001.npy"]
    (out / "parts" / ".batch_000002.npy.tmp999.npy").write_bytes(b"half")
    monkeypatch.undo()
    capsys.readouterr()
    result = torchrun([*args, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming: 2 of 4 batches" in result.stdout
    assert "sample (rank 0 of 2): 2/2 images" in result.stderr  # rank 0 sampled batch 2 only
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(out / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert not (out / "parts").exists()

    interrupt_after(monkeypatch, 1)  # and from 2 processes' leftovers back to 1 process
    with pytest.raises(Killed):
        sample.main([*args, "--out", str(tmp_path / "again")])
    monkeypatch.undo()
    sample.main([*args, "--out", str(tmp_path / "again")])
    with np.load(tmp_path / "whole" / "samples.npz") as a, \
            np.load(tmp_path / "again" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
    ckpt = save_ckpt(tmp_path / "c.pt", tiny_model(0), tiny_model(3))
    args = [str(ckpt), "--num-images", "4", "--steps", "4", "--batch-size", "2",
            "--out", str(tmp_path / "o")]
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Killed):
        sample.main(args)
    monkeypatch.undo()
    msg = run_error([*args, "--steps", "5"])
    assert msg.startswith("error: ") and "steps 4 there, 5 here" in msg and "\n" not in msg


def run_error(argv):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return str(e.value)


def test_bad_input_gets_one_line_errors(tmp_path):
    ckpt = save_ckpt(tmp_path / "c.pt", tiny_model(0), tiny_model(0))
    out = ["--out", str(tmp_path / "o")]
    msg = run_error([str(tmp_path / "missing.pt"), *out])
    assert msg.startswith("error: checkpoint not found") and "missing.pt" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert run_error([str(tmp_path / "junk.pt"), *out]).startswith("error: cannot read checkpoint")
    assert run_error([str(ckpt), "--classes", "3,10", *out]) == \
        "error: class ids [10] out of range 0..9 (this model has 10 classes)"
    assert run_error([str(ckpt), "--num-images", "0", *out]) \
        == "error: argument --num-images: must be an integer >= 1, got 0"
    assert "--steps must be >= 3" in run_error([str(ckpt), "--steps", "2", "--order", "3", *out])
    assert "--steps must be >= 2" in run_error([str(ckpt), "--steps", "1", *out])  # default order 2
    with pytest.raises(ValueError, match="unknown method 'ddim'"):
        sample.generate(tiny_model(0), [1], [0], sampler=dict(method="ddim"))
    for bad in ("-1", "nan", "inf"):  # checked before anything is written
        assert run_error([str(ckpt), "--cfg-scale", bad, *out]) \
            == f"error: argument --cfg-scale: must be a finite number >= 0, got {bad}"
    assert run_error([str(ckpt), "--decay-power", "0", *out]) \
        == "error: argument --decay-power: must be a finite number > 0, got 0"
    assert not (tmp_path / "o").exists()
    for msg in (run_error([str(tmp_path / "missing.pt"), *out]),
                run_error([str(ckpt), "--classes", "1-x", *out])):
        assert "\n" not in msg
    with pytest.raises(ValueError, match="3 labels but 2 seeds"):
        sample.generate(tiny_model(0), [1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        sample.generate(tiny_model(0), [-1], [0])


# The paper's protocol per variant: Table 2 (ImageNet 64) is unguided; the release's eval.py
# samples its 256 px latent models at s = 0.4; at 512 px neither says (ours: 0.4, and it says so);
# the digits demo samples at s = 1 (docs/demo.md).
PAPER_GUIDANCE = {"DiMR-M/3R": 0.0, "DiMR-L/3R": 0.0, "DiMR-XL/2R": 0.4, "DiMR-G/2R": 0.4,
                  "DiMR-XL/3R": 0.4, "DiMR-S/2R": 1.0}


def test_the_default_guidance_is_the_papers_protocol_per_variant():
    for name, s in PAPER_GUIDANCE.items():
        value, why = sample.default_guidance(dimr.get_config(name))
        assert value == s and why.startswith(f"default for {name}: "), (name, value, why)
    assert "Table 2" in sample.default_guidance(dimr.get_config("m"))[1]
    assert "our choice" in sample.default_guidance(dimr.get_config("xl_3r"))[1]


def test_a_64px_pixel_model_samples_unguided_unless_told(tmp_path, capsys):
    """sample.py on a small 64x64x3 model (ImageNet 64's shape): without --cfg-scale its images are
    the unguided ODE solution written out here (one forward pass per evaluation, eps_c alone);
    --cfg-scale 0.4 changes them, and the settings line says where each value came from."""
    torch.manual_seed(0)
    model = dimr.DiMR(dimr.get_config("m", depths=(1, 1, 1), widths=(16, 8, 4),
                                      num_heads=2)).eval()
    ckpt = save_ckpt(tmp_path / "m.pt", model, model)
    common = ["--num-images", "2", "--classes", "3,5", "--steps", "3", "--no-png"]
    sample.main([str(ckpt), "--out", str(tmp_path / "default"), *common])
    assert ("guidance s = 0 (default for a 64x64x3 model: the paper's Table 2 protocol"
            in capsys.readouterr().out)
    sample.main([str(ckpt), "--out", str(tmp_path / "guided"), "--cfg-scale", "0.4", *common])
    assert "guidance s = 0.4 (given)" in capsys.readouterr().out
    y = torch.tensor([3, 5])
    x_T = torch.stack([torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed))
                       for seed in (0, 1)])
    with torch.no_grad():
        x = ode_sample(lambda x, n: model(x, n, y)[-1], x_T, 3).double().numpy()
    unguided = np.clip(np.floor(127.5 * x + 128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    with np.load(tmp_path / "default" / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], unguided)
    with np.load(tmp_path / "guided" / "samples.npz") as f:
        assert (f["arr_0"] != unguided).any()


def test_training_grids_sample_at_the_models_default_guidance(tmp_path, capsys):
    """train.py's grid of a digits run: its first cell is the EMA's sample of class 0 from seed 0
    at s = 1, the digits' default (not at s = 0, which gives another image), and the run's
    summary says so."""
    import train
    train.main(["--steps", "2", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "2",
                "--sample-steps", "3", "--eval-images", "0", "--minutes", "0", "--threads", "1",
                "--results-dir", str(tmp_path)])
    assert ("samples: guidance s = 1 (default for DiMR-S/2R: the digits demo's choice"
            in capsys.readouterr().out)
    run = next(tmp_path.iterdir())
    ema = dimr.DiMR(dimr.get_config("s")).eval()
    ema.load_state_dict(checkpoints.load(run / "checkpoints" / "ckpt_0000002.pt")["ema"])
    first = {s: images.to_uint8(sample.generate(ema, [0], [0], steps=3, guidance=s))[0]
             for s in (0.0, 1.0)}
    assert (first[0.0] != first[1.0]).any()
    grid = np.asarray(Image.open(run / "samples" / "step_0000002.png"))
    p, cell = images.GRID_PAD, 8 * 8  # 8x8 digits drawn 8 times larger
    np.testing.assert_array_equal(grid[p:p + cell, p:p + cell],
                                  np.kron(first[1.0], np.ones((8, 8, 1), np.uint8)))
