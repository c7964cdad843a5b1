"""Faults a run at ImageNet scale meets, each on small data made here (docs/faults.md): a bad image
in the data (with and without DataLoader workers, on one and two processes), an empty class
folder, a full disk, files of the wrong format, non-finite latents, images of another size, and the
messages that say what happened. Each ends in one line, within seconds, and loses nothing."""
import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import train
from support import checkpoints, data
from support.run_folder import RunFolder, read_stats
from tools import check_images
from util import free_port, mount_tmpfs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "depths=2,2", "widths=32,16", "num_heads=2"]
QUIET = ["--sample-every", "0", "--eval-images", "0", "--threads", "1"]


def image_folder(root, bad=()):
    """Two classes of 12 small RGB JPEGs each, plus the bad files {relative path: bytes}."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / c / f"{i}.jpg")
    for name, content in dict(bad).items():
        (root / name).write_bytes(content)
    return root


def truncated_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:400]


def train_cli(args, nproc=1, timeout=90):
    """python train.py ARGS (or under torchrun); (return code, stderr, seconds)."""
    launcher = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py")]
    start = time.time()
    result = subprocess.run([*launcher, *TINY, *QUIET, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return result.returncode, result.stderr, time.time() - start


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error")]


# ----------------------------------------------------------------------------------------------
# A bad file in the data

@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bad", ["truncated", "text"])
def test_a_bad_image_stops_the_run_naming_it(tmp_path, workers, bad):
    """A truncated JPEG or a text file named .jpg: one line naming the file, exit status 1, and no
    hang (the DataLoader workers ignore SIGTERM; the process must stop them itself)."""
    content = truncated_jpeg() if bad == "truncated" else b"not an image\n"
    folder = image_folder(tmp_path / "imgs", {"a/broken.jpg": content})
    code, stderr, seconds = train_cli(["--data", str(folder), "--image-size", "16",
                                       "--batch-size", "8", "--workers", str(workers),
                                       "--steps", "40", "--results-dir", str(tmp_path / "runs")])
    (line,) = error_lines(stderr)
    assert code == 1 and line.startswith(f"error: {folder / 'a' / 'broken.jpg'}: not a readable "
                                         "image (")
    assert ("Truncated" in line) if bad == "truncated" else ("cannot identify image" in line)
    assert seconds < 60


def test_two_processes_each_name_their_bad_file(tmp_path):
    folder = image_folder(tmp_path / "imgs", {"a/broken.jpg": truncated_jpeg(),
                                              "b/x.jpg": b"text\n"})
    code, stderr, seconds = train_cli(["--data", str(folder), "--image-size", "16",
                                       "--batch-size", "8", "--workers", "2", "--steps", "40",
                                       "--results-dir", str(tmp_path / "runs")], nproc=2)
    lines = error_lines(stderr)
    assert code != 0 and lines and all(" not a readable image (" in line for line in lines)
    assert all(line.startswith(("error (rank 0): ", "error (rank 1): ")) for line in lines)
    assert seconds < 60


def test_check_images_lists_every_bad_file(tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs", {"a/broken.jpg": truncated_jpeg(),
                                              "b/x.jpg": b"text\n"})
    with pytest.raises(SystemExit) as e:
        check_images.main([str(folder), "--workers", "2"])
    assert e.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:2]) == sorted([
        f"{folder / 'a' / 'broken.jpg'}: not a readable image (OSError: Truncated File Read)",
        f"{folder / 'b' / 'x.jpg'}: not a readable image (UnidentifiedImageError: cannot identify "
        f"image file '{folder / 'b' / 'x.jpg'}')"])
    assert out[2] == "2 unreadable of 26 files in 2 classes"
    for path in (folder / "a" / "broken.jpg", folder / "b" / "x.jpg"):
        path.unlink()
    check_images.main([str(folder), "--workers", "1"])
    assert capsys.readouterr().out.strip() == "0 unreadable of 24 files in 2 classes"


def test_an_empty_class_folder_is_an_error(tmp_path):
    """As torchvision's ImageFolder: a class without images would be a class id with no data."""
    folder = image_folder(tmp_path / "imgs")
    (folder / "c_empty").mkdir()
    (folder / "c_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"1 of 3 class folders hold no images .* e\.g\. c_empty"):
        data.open_data(str(folder), image_size=16)


# ----------------------------------------------------------------------------------------------
# Writes that fail

def test_a_failed_write_names_the_file_and_the_cause_and_keeps_the_old_one(tmp_path,
                                                                         monkeypatch):
    """Any write through atomic_write that meets ENOSPC: 'cannot write PATH: no space left on
    device', the previous file intact, no temporary file left."""
    target = tmp_path / "ckpt.pt"
    checkpoints.save({"step": 1}, target)
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoints.WriteError) as e:
        checkpoints.save({"step": 2}, target)
    assert str(e.value) == f"cannot write {target}: no space left on device"
    assert checkpoints.load(target) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failed_stats_line_is_taken_back(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path, "DiMR-S/2R", None, 0, {}, keep=1)
    folder.append({"step": 1, "loss": 1.0})
    before = folder.stats_path.read_bytes()
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, b):
            super().write(b[:5])  # part of the line reaches the disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(path, "a")
                        if mode == "ab" else real_open(path, mode, *a, **k))
    with pytest.raises(checkpoints.WriteError,
                       match=f"cannot write {folder.stats_path}: no space left on device"):
        folder.append({"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert folder.stats_path.read_bytes() == before


def test_a_full_disk_during_training_names_the_last_good_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    # room for one checkpoint of the tiny model (1.1 MB), not two
    mount_tmpfs(disk, "2m", "test_a_failed_write_...")
    try:
        code, stderr, seconds = train_cli(["--results-dir", str(disk), "--steps", "100",
                                           "--log-every", "10", "--ckpt-every", "10"])
        run = disk / "000-DiMR-S-2R"
        assert code == 1 and error_lines(stderr) == [
            f"error: cannot write {run / 'checkpoints' / 'ckpt_0000020.pt'}: no space left on "
            f"device; last good checkpoint: {run / 'checkpoints' / 'ckpt_0000010.pt'}"]
        assert sorted(os.listdir(run / "checkpoints")) == ["ckpt_0000010.pt"]
        assert checkpoints.load(run / "checkpoints" / "ckpt_0000010.pt")["step"] == 10
        assert [json.loads(s)["step"] for s in (run / "stats.jsonl").read_text().splitlines()] \
            == [10, 20]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_checkpoint_larger_than_the_free_space_says_so_in_plain_words(tmp_path):
    """3.2 MB onto a 2 MB tmpfs: torch's zip writer replaces the write's OSError (ENOSPC) by its
    own RuntimeError ("unexpected pos ..."), which keeps the OSError as its context; the message
    is the OSError's, the directory left empty. (Injected: test_a_full_disk_injected_...)"""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "2m", "test_a_failed_write_...")
    try:
        with pytest.raises(checkpoints.WriteError) as e:
            checkpoints.save({"x": torch.zeros(800_000)}, disk / "ckpt.pt")
        assert str(e.value) == f"cannot write {disk / 'ckpt.pt'}: no space left on device"
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def fill(disk, leave=0):
    """Take the free space of the tmpfs `disk` but `leave` bytes, as another writer would."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while shutil.disk_usage(disk).free > leave:
            os.write(fd, bytes(min(1 << 16, shutil.disk_usage(disk).free - leave)))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


FULL_DISK_ARGS = ["--steps", "10", "--log-every", "5", "--ckpt-every", "5"]


def full_disk_error(argv):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, *QUIET, *argv])
    return str(e.value.code)


def after(monkeypatch, cls, name, action):
    """Run `action(self)` after each call of cls.name."""
    method = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        action(self)
        return result
    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.parametrize("site", ["first checkpoint", "stats.jsonl", "grid"])
def test_a_disk_that_fills_during_training_says_so_wherever_it_strikes(tmp_path, monkeypatch,
                                                                      site):
    """A 2 MB tmpfs that another writer fills during the run: after the first stats line but for
    300 kB (the checkpoint needs 1.08 MB); after the first checkpoint, then stats.jsonl at its
    next block (padded there with empty lines, which readers skip); after the first checkpoint,
    then the grid. Each: one line naming the file, "no space left on device" and the last good
    checkpoint; what was written before is intact, no temporary file is left."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "2m", "test_a_failed_write_...")
    run = disk / "000-DiMR-S-2R"
    ckpt_5 = run / "checkpoints" / "ckpt_0000005.pt"
    try:
        if site == "first checkpoint":
            after(monkeypatch, RunFolder, "append", lambda folder: fill(disk, leave=300_000))
            expected = (f"{run / 'checkpoints' / 'ckpt_0000005.pt'}: no space left on device; "
                        "last good checkpoint: none written yet")
        elif site == "stats.jsonl":
            def fill_to_the_block(folder):
                fill(disk)
                with open(folder.stats_path, "ab") as f:
                    f.write(b"\n" * (-f.tell() % os.statvfs(disk).f_bsize))
            after(monkeypatch, RunFolder, "save", fill_to_the_block)
            expected = (f"{run / 'stats.jsonl'}: no space left on device; last good checkpoint: "
                        f"{ckpt_5}")
        else:
            after(monkeypatch, RunFolder, "save", lambda folder: fill(disk))
            expected = (f"{run / 'samples' / 'step_0000005.png'}: no space left on device; last "
                        f"good checkpoint: {ckpt_5}")
        argv = [*FULL_DISK_ARGS, "--results-dir", str(disk)]
        if site == "grid":
            argv += ["--sample-every", "5", "--sample-steps", "3"]
        assert full_disk_error(argv) == f"error: cannot write {expected}"
        assert [s["step"] for s in read_stats(run)] == [5]
        written = sorted(p.name for p in run.rglob("*") if p.is_file())
        assert written == (["config.json", "stats.jsonl"] if site == "first checkpoint" else
                           ["ckpt_0000005.pt", "config.json", "stats.jsonl"])
        if site != "first checkpoint":
            assert checkpoints.load(ckpt_5)["step"] == 5
    finally:
        monkeypatch.undo()
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("site", ["first checkpoint", "later checkpoint", "stats.jsonl", "grid"])
def test_a_full_disk_injected_at_each_write_says_so(tmp_path, monkeypatch, site):
    """The same four cases with ENOSPC injected, from the first stats line or the first checkpoint
    on, where the operating system would raise it (torch's zip writer, as on a full disk, raises
    its RuntimeError with the OSError as context)."""
    run = tmp_path / "000-DiMR-S-2R"
    ckpt = {step: run / "checkpoints" / f"ckpt_{step:07d}.pt" for step in (5, 10)}
    real_open = open

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def zip_writer_on_a_full_disk(obj, f):
        try:
            enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 "
                               "vs 598")

    class FullDisk(io.FileIO):
        write = enospc

    full = {"first checkpoint": (torch, "save", zip_writer_on_a_full_disk),
            "later checkpoint": (torch, "save", zip_writer_on_a_full_disk),
            "stats.jsonl": (builtins, "open", lambda path, mode="r", *a, **k: FullDisk(path, "a")
                            if mode == "ab" else real_open(path, mode, *a, **k)),
            "grid": (Image.Image, "save", enospc)}[site]
    after(monkeypatch, RunFolder, "append" if site == "first checkpoint" else "save",
          lambda folder: monkeypatch.setattr(*full))
    argv = [*FULL_DISK_ARGS, "--results-dir", str(tmp_path)]
    if site == "grid":
        argv += ["--sample-every", "5", "--sample-steps", "3"]
    expected = {"first checkpoint": f"{ckpt[5]}: no space left on device; last good checkpoint: "
                                    "none written yet",
                "later checkpoint": f"{ckpt[10]}: no space left on device; last good checkpoint: "
                                    f"{ckpt[5]}",
                "stats.jsonl": f"{run / 'stats.jsonl'}: no space left on device; last good "
                               f"checkpoint: {ckpt[5]}",
                "grid": f"{run / 'samples' / 'step_0000005.png'}: no space left on device; last "
                        f"good checkpoint: {ckpt[5]}"}[site]
    assert full_disk_error(argv) == f"error: cannot write {expected}"
    monkeypatch.undo()
    assert [s["step"] for s in read_stats(run)] == ([5, 10] if site == "later checkpoint" else
                                                     [5])
    assert sorted(p.name for p in (run / "checkpoints").glob("*")) \
        == ([] if site == "first checkpoint" else ["ckpt_0000005.pt"])


# ----------------------------------------------------------------------------------------------
# Files of the wrong format, named against the format that was expected

def test_npz_files_with_other_keys_name_both_formats(tmp_path):
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "train_1.npz", images=np.zeros((2, 12), np.uint8))
    for spec in (tmp_path / "npz", tmp_path / "npz" / "train_1.npz"):
        with pytest.raises(ValueError) as e:
            data.open_data(str(spec))
        assert str(e.value) == (
            f"{tmp_path / 'npz' / 'train_1.npz'}: keys ['images'], expected those of "
            "downsampled ImageNet: data uint8 [N, 3*S*S] (R, G, B planes) and labels 1..1000, or "
            "latents: latents float [N, C, h, h] and labels int [N]")


def test_a_pixel_model_refuses_float_arrays_that_would_train_as_latents(tmp_path):
    """DiMR-M/3R given float32 [N, 3, 64, 64]: one line with what the file holds and what the
    model trains on; the same array as uint8 opens as ImageNet 64 pixels."""
    images = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    for name, array in (("float.npy", images), ("uint8.npy", (images * 255).astype(np.uint8))):
        np.save(tmp_path / name, array)
        np.save(data.labels_npy_path(tmp_path / name), np.arange(4))
    with pytest.raises(SystemExit) as e:
        train.main(["--variant", "m", "--data", str(tmp_path / "float.npy"),
                    "--results-dir", str(tmp_path / "runs")])
    assert str(e.value.code) == (
        f"error: --data {tmp_path / 'float.npy'} holds float32 {list(images.shape)}, read as VAE "
        "latents, but DiMR-M/3R works on pixels: give uint8 pixels [N, 3, 64, 64] "
        "(tools/imagenet64.py writes ImageNet 64 so) or an image folder")
    assert not (tmp_path / "runs").exists()
    pixels = data.open_data(str(tmp_path / "uint8.npy"), pixel_model="DiMR-M/3R")
    assert (len(pixels.dataset), pixels.channels, pixels.image_size) == (4, 3, 64)


def test_non_finite_latents_are_an_error_naming_the_rows(tmp_path):
    lat = np.random.default_rng(0).normal(size=(10_000, 4, 2, 2)).astype(np.float16)
    lat[17, 1, 0, 1], lat[9_000, 0, 1, 1] = np.nan, np.inf        # two chunks of the scan
    np.save(tmp_path / "lat.npy", lat)
    np.save(data.labels_npy_path(tmp_path / "lat.npy"), np.zeros(10_000, np.int64))
    with pytest.raises(ValueError, match=r"lat\.npy: 2 latent\(s\) with NaN or inf, rows 17, "
                                         r"9000$"):
        data.open_data(str(tmp_path / "lat.npy"), num_classes=3)
    assert list(data.non_finite_rows(lat, 100, 9_500)) == [9_000]


class _Counting(torch.nn.Module):
    """A stand-in Inception that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.dummy, self.seen = torch.nn.Parameter(torch.zeros(())), 0

    def forward(self, x):
        self.seen += len(x)
        pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x.amax((1, 2, 3)),
                            x[:, 0].mean((1, 2))], 1)
        return fid.Activations(pool, pool, None)


def test_fid_eval_checks_both_files_before_any_feature(tmp_path, monkeypatch, capsys):
    model = _Counting()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: model)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=rng.random((20, 8, 8, 3)))
    with pytest.raises(SystemExit) as e:
        fid.main(["eval", str(tmp_path / "ref.npz"), str(tmp_path / "float.npz")])
    assert str(e.value).startswith(f"error: {tmp_path / 'float.npz'}: arr_0 is float64 "
                                   "[20, 8, 8, 3], expected arr_0 uint8 [N, H, W, 3]")
    assert model.seen == 0
    # another size: a warning with the numbers, then the numbers
    np.savez(tmp_path / "small.npz", arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    fid.main(["eval", str(tmp_path / "ref.npz"), str(tmp_path / "small.npz")])
    captured = capsys.readouterr()
    assert "fid: warning: the reference images are 16x16 but the samples 8x8" in captured.err
    assert "FID: " in captured.out and model.seen == 40


# ----------------------------------------------------------------------------------------------
# Messages that say what happened

def test_a_resumed_run_says_how_many_steps_it_trained(tmp_path, capsys):
    args = [*TINY, *QUIET, "--results-dir", str(tmp_path), "--log-every", "5"]
    train.main([*args, "--steps", "10"])
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "000-DiMR-S-2R"), "--steps", "25", "--threads", "1"])
    assert "trained 15 steps (step 10 -> 25) in " in capsys.readouterr().out
    train.main(["--resume", str(tmp_path / "000-DiMR-S-2R"), "--steps", "26", "--threads", "1"])
    assert "trained 1 step (step 25 -> 26) in " in capsys.readouterr().out


def test_the_grid_spans_the_classes(tmp_path):
    """grid.png shows at most 64 images evenly spread over the indices: with --classes even and
    200 images of 10 classes, every class is in it (the first 64 would be classes 0-3 only)."""
    shown = sample.grid_indices(200)
    labels = sample.parse_classes("even", 200, 10, 0)
    assert len(shown) == 64 and shown[0] == 0 and shown[-1] == 199
    assert set(labels[shown]) == set(range(10)) and set(labels[:64]) == {0, 1, 2, 3}
    assert list(sample.grid_indices(5)) == [0, 1, 2, 3, 4]
