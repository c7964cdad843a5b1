"""Training data: digits against scikit-learn's own arrays, downsampled ImageNet against images
flattened by hand, ADM's center crop against closed forms, image folders of known colours, the three
latent layouts the extractor may write, and the warning about per-process copies under torchrun."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from support import data
from tools import imagenet64
from util import free_port


def test_digits_are_sklearn_digits_in_model_space():
    d = data.digits_data()
    x, y = d.dataset.tensors
    ref = load_digits()
    assert x.shape == (1797, 1, 8, 8) and d.num_classes == 10 and not d.flip
    np.testing.assert_allclose(x[:, 0].numpy(), ref.images / 16 * 2 - 1, atol=1e-7)
    assert torch.equal(y, torch.from_numpy(ref.target).long())


def test_loading_data_does_not_import_the_fid_code():
    code = ("import sys; from support import data; data.open_data('digits'); "
            "print(sorted(m for m in ('fid', 'support.inception') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(data.__file__).parents[1],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]


def test_digits_upsampled():
    x8 = data.digits_data(8).dataset.tensors[0]
    x16 = data.digits_data(16).dataset.tensors[0]
    assert x16.shape == (1797, 1, 16, 16)
    # bilinear 2x with half-pixel centres: output pixel (0, 0) samples input (-1/4, -1/4),
    # clamped to (0, 0)
    assert torch.equal(x16[:, 0, 0, 0], x8[:, 0, 0, 0])
    # a pixel strictly inside: output (2i+1) samples input i + 1/4 -> 3/4 x[i] + 1/4 x[i+1] per axis
    i = 3
    expect = (0.75 * 0.75 * x8[..., i, i] + 0.75 * 0.25 * (x8[..., i, i + 1] + x8[..., i + 1, i])
              + 0.25 * 0.25 * x8[..., i + 1, i + 1])
    torch.testing.assert_close(x16[..., 2 * i + 1, 2 * i + 1], expect, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="digits come at 8 px"):
        data.digits_data(12)


def rgb(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")


def test_center_crop_exact_size_is_identity():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3))
    assert np.array_equal(data.center_crop_arr(rgb(arr), 32), arr)


def test_center_crop_wide_image_takes_the_middle_columns():
    arr = np.random.default_rng(1).integers(0, 256, (32, 96, 3))       # H 32, W 96: no resize
    assert np.array_equal(data.center_crop_arr(rgb(arr), 32), arr[:, 32:64])


def test_center_crop_halves_with_a_box_filter():
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3))
    block_mean = arr.reshape(32, 2, 32, 2, 3).mean((1, 3))            # what BOX halving computes
    out = data.center_crop_arr(rgb(arr), 32).astype(float)
    # pillow's fixed-point filter rounds to a neighbouring uint8
    assert np.abs(out - block_mean).max() <= 1


def make_folder(root, classes, size=(40, 24)):
    """One image of a constant colour per class: class c -> colour (10 c, 20 c, 30 c)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        colour = np.array([10, 20, 30]) * c
        rgb(np.broadcast_to(colour, (size[1], size[0], 3))).save(root / name / f"img{c}.png")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "imgs", ["b_dog", "a_cat", "c_owl"])
    (tmp_path / "imgs" / "a_cat" / "notes.txt").write_text("not an image")
    d = data.open_data(str(root), image_size=16)
    assert d.class_names == ["a_cat", "b_dog", "c_owl"] and d.num_classes == 3 \
        and len(d.dataset) == 3 and d.flip
    for i in range(3):
        x, y = d.dataset[i]
        assert x.shape == (3, 16, 16) and y == i
        colour = torch.tensor([10.0, 20.0, 30.0]) \
            * ["b_dog", "a_cat", "c_owl"].index(d.class_names[i])
        torch.testing.assert_close(x, (colour / 127.5 - 1)[:, None, None].expand(3, 16, 16),
                                   atol=1e-6, rtol=0)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "empty" / "class0" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images .* in .*empty.*one sub-folder per class"):
        data.open_data(str(tmp_path / "empty"), image_size=16)


def latent_arrays(n=10, seed=0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, 4, 4, 4)).astype(np.float16), g.integers(0, 7, n)


def test_latents_npz_shards_and_npy_agree(tmp_path):
    lat, labels = latent_arrays()
    np.savez(tmp_path / "all.npz", **{data.LATENTS_KEY: lat, data.LABELS_KEY: labels})
    (tmp_path / "shards").mkdir()
    for i, part in enumerate((slice(0, 4), slice(4, 10))):
        np.savez(tmp_path / "shards" / data.SHARD_NAME.format(i),
                 **{data.LATENTS_KEY: lat[part], data.LABELS_KEY: labels[part]})
    np.save(tmp_path / "lat.npy", lat)
    np.save(data.labels_npy_path(tmp_path / "lat.npy"), labels)
    assert data.labels_npy_path(tmp_path / "lat.npy").name == "lat_labels.npy"
    for path in ("all.npz", "shards", "lat.npy"):
        x, y = data.load_latents(tmp_path / path)
        assert x.dtype == np.float16 and np.array_equal(x, lat)
        assert y.dtype == np.int64 and np.array_equal(y, labels)
        # the .npy is shared through the page cache
        assert isinstance(x, np.memmap) == (path == "lat.npy")
        d = data.open_data(str(tmp_path / path), num_classes=7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch.from_numpy on a read-only memory map
            item, label = d.dataset[3]
        assert d.channels == 4 and d.image_size == 4 and d.num_classes == 7 and not d.flip
        assert item.dtype == torch.float32 \
            and np.array_equal(item.numpy(), lat[3].astype(np.float32))
        assert label == labels[3]


def test_latent_errors(tmp_path):
    lat, labels = latent_arrays()
    np.save(tmp_path / "lat.npy", lat)
    with pytest.raises(FileNotFoundError, match="lat_labels.npy are missing"):
        data.load_latents(tmp_path / "lat.npy")
    np.savez(tmp_path / "bad.npz", images=lat, labels=labels)
    with pytest.raises(ValueError, match=r"no \['latents'\]"):
        data.load_latents(tmp_path / "bad.npz")
    np.savez(tmp_path / "flat.npz", latents=lat.reshape(10, -1), labels=labels)
    with pytest.raises(ValueError, match=r"float \[N, C, h, h\]"):
        data.load_latents(tmp_path / "flat.npz")
    (tmp_path / "gap").mkdir()
    for i in (0, 2):
        np.savez(tmp_path / "gap" / data.SHARD_NAME.format(i), latents=lat, labels=labels)
    with pytest.raises(ValueError, match="shard_00001.npz is missing"):
        data.load_latents(tmp_path / "gap")
    np.savez(tmp_path / "ok.npz", latents=lat, labels=labels)
    with pytest.raises(ValueError, match="class ids up to 6, but 5 classes"):
        data.open_data(str(tmp_path / "ok.npz"), num_classes=5)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_latents(tmp_path / "broken.npz")


def test_open_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        data.open_data(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--num-classes applies to latents only"):
        data.open_data("digits", num_classes=10)


def test_arrays_held_by_every_process_are_reported_once_under_torchrun(tmp_path, monkeypatch,
                                                                        capsys):
    lat, labels = latent_arrays()
    np.savez(tmp_path / "all.npz", latents=lat, labels=labels)
    np.save(tmp_path / "lat.npy", lat)
    np.save(data.labels_npy_path(tmp_path / "lat.npy"), labels)
    data.open_data(str(tmp_path / "all.npz"), num_classes=7)
    assert capsys.readouterr().err == ""                               # one process: nothing to say
    monkeypatch.setattr(data.distributed, "world_size", lambda: 8)
    data.open_data(str(tmp_path / "all.npz"), num_classes=7)
    err = capsys.readouterr().err
    assert err.startswith("warning: every one of the 8 processes holds all of") \
        and err.count("\n") == 1
    assert "extract_latents.py --npy" in err
    data.open_data(str(tmp_path / "lat.npy"), num_classes=7)
    assert capsys.readouterr().err == ""                               # memory-mapped: shared


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet (Chrabaszcz et al. 2017): data uint8 [N, 3*S*S] = R, G, B planes, row-major

S = 64


def write_downsampled(path, rows, labels):
    np.savez(path, data=np.asarray(rows, dtype=np.uint8), labels=np.asarray(labels),
             mean=np.zeros(3 * S * S))  # the training files also carry the mean image, unused


def test_downsampled_imagenet_decodes_the_plane_layout(tmp_path):
    # Image 0 by hand: black but for red 200 and green 100 at (row 5, column 7), blue 50 at (63, 0).
    hand = np.zeros(3 * S * S, np.uint8)
    hand[0 * S * S + 5 * S + 7] = 200
    hand[1 * S * S + 5 * S + 7] = 100
    hand[2 * S * S + 63 * S + 0] = 50
    # (N, H, W, RGB)
    photos = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    planes = [np.concatenate([p[:, :, c].reshape(-1) for c in range(3)]) for p in photos]
    root = tmp_path / "Imagenet64_train"
    root.mkdir()
    write_downsampled(root / "Imagenet64_train_part1.npz", [hand, planes[0]], [1, 1000])
    write_downsampled(root / "Imagenet64_train_part2.npz", [planes[1]], [7])
    write_downsampled(root / "Imagenet64_val.npz", [planes[0]], [3])            # not training data

    d = data.open_data(str(root))
    assert (len(d.dataset), d.num_classes, d.image_size, d.channels, d.flip) \
        == (3, 1000, S, 3, True)
    assert [d.dataset[i][1] for i in range(3)] == [0, 999, 6]                  # 1-based -> 0-based
    x, _ = d.dataset[0]
    expected = -torch.ones(3, S, S)
    expected[0, 5, 7], expected[1, 5, 7], expected[2, 63, 0] = (200 / 127.5 - 1, 100 / 127.5 - 1,
                                                                50 / 127.5 - 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    for i, photo in zip((1, 2), photos):
        torch.testing.assert_close(d.dataset[i][0].permute(1, 2, 0),
                                   torch.from_numpy(photo / 127.5 - 1).float(), rtol=0, atol=1e-6)
    single = data.open_data(str(root / "Imagenet64_train_part2.npz"), image_size=S)
    assert len(single.dataset) == 1 and single.dataset[0][1] == 6


def test_downsampled_imagenet_errors(tmp_path):
    row = np.zeros(3 * S * S, np.uint8)
    write_downsampled(tmp_path / "train_zero.npz", [row], [0])
    with pytest.raises(ValueError, match=r"class ids in 1..1000 \(1-based\)"):
        data.open_data(str(tmp_path / "train_zero.npz"))
    write_downsampled(tmp_path / "train_ok.npz", [row], [1])
    with pytest.raises(ValueError, match="--image-size 32: .* holds 64x64 images"):
        data.open_data(str(tmp_path / "train_ok.npz"), image_size=32)
    with pytest.raises(ValueError, match="--num-classes applies to latents only"):
        data.open_data(str(tmp_path / "train_ok.npz"), num_classes=1000)
    np.savez(tmp_path / "train_odd.npz", data=np.zeros((1, 100), np.uint8), labels=[1])
    with pytest.raises(ValueError, match=r"data must be uint8 \[N, 3\*S\*S\]"):
        data.open_data(str(tmp_path / "train_odd.npz"))


# ----------------------------------------------------------------------------------------------
# ImageNet 64 as one memory-mapped file (tools/imagenet64.py)

def test_imagenet64_npy_equals_the_npz_files_and_the_conversion_resumes(tmp_path, monkeypatch):
    """tools/imagenet64.py writes the rows as they are (uint8 planes) in file order with 0-based
    labels: the same training data as the .npz files. Killed after its first file, the rerun
    converts the others only and gives the same file."""
    rng = np.random.default_rng(3)
    root = tmp_path / "in64"
    root.mkdir()
    for k, n in enumerate((5, 3, 4)):
        write_downsampled(root / f"train_data_batch_{k + 1}.npz",
                          rng.integers(0, 256, (n, 3 * S * S)), rng.integers(1, 1001, n))
    write_downsampled(root / "val_data.npz", rng.integers(0, 256, (2, 3 * S * S)), [1, 2])
    imagenet64.main([str(root), "--out", str(tmp_path / "whole.npy"), "--chunk", "2"])

    copied, copy_rows = [], imagenet64.copy_rows

    def killed_after_one(path, *args):
        if copied:
            raise KeyboardInterrupt
        copied.append(path)
        copy_rows(path, *args)

    monkeypatch.setattr(imagenet64, "copy_rows", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        imagenet64.main([str(root), "--out", str(tmp_path / "resumed.npy")])
    assert not (tmp_path / "resumed.npy").exists()
    monkeypatch.setattr(imagenet64, "copy_rows", lambda path, *args: copied.append(path)
                        or copy_rows(path, *args))
    imagenet64.main([str(root), "--out", str(tmp_path / "resumed.npy")])
    assert [p.name for p in copied] == [f"train_data_batch_{k}.npz" for k in (1, 2, 3)]
    assert (tmp_path / "resumed.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()

    from_npy, from_npz = data.open_data(str(tmp_path / "whole.npy")), data.open_data(str(root))
    assert isinstance(np.load(tmp_path / "whole.npy", mmap_mode="r"), np.memmap)
    assert (len(from_npy.dataset), from_npy.image_size, from_npy.flip) == (12, S, True)
    for i in range(12):
        x, y = from_npy.dataset[i]
        assert torch.equal(x, from_npz.dataset[i][0]) and y == from_npz.dataset[i][1]
    rows = from_npy.dataset.__getitems__([7, 2, 11])  # one read of the map per micro-batch
    assert all(torch.equal(x, from_npz.dataset[i][0]) and y == from_npz.dataset[i][1]
               for (x, y), i in zip(rows, [7, 2, 11]))


def test_two_processes_share_the_memory_mapped_images(tmp_path):
    """Two training steps under torchrun with 2 processes from a 400 MB .npy: each process's
    private memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup) grows by far less
    than the data's size, because the processes read the rows they train on from the shared page
    cache (the file is sparse: made in no time, read as zeros)."""
    n = 32_768                                                           # 32768 x 12288 B = 403 MB
    images = np.lib.format.open_memmap(tmp_path / "in64.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, 3, S, S))
    images[:64] = 7
    del images
    np.save(data.labels_npy_path(tmp_path / "in64.npy"), np.arange(n) % 1000)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         str(Path(__file__).parent / "private_memory.py"), "--variant", "m",
         "--arch", "depths=2,2,2", "widths=16,8,4", "num_heads=2", "--data",
         str(tmp_path / "in64.npy"), "--batch-size", "8", "--steps", "2", "--log-every", "1",
         "--sample-every", "0", "--workers", "0", "--results-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    growth = {int(rank): (int(during) - int(before)) * 1024 for rank, before, during in
              re.findall(r"private_memory (\d+) (\d+) (\d+)", result.stdout)}
    size = n * 3 * S * S
    assert sorted(growth) == [0, 1] and all(g < size / 2 for g in growth.values()), (growth, size)
