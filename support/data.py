"""Training data in the model's space: the digits demo, ImageNet 64, class-per-folder images,
VAE latents.

The paper trains on ImageNet: in pixel space at 64x64 (DiMR-M/3R, L/3R; Table 2), and on the
Stable Diffusion VAE's latents at 256 and 512 px (XL/2R, G/2R, XL/3R; Tables 3, 4). Each source
here is a Dataset of (x float32 [C, H, W], y int64) in the space the network sees:

- digits (the laptop demo, support/digits.py): scikit-learn's 1,797 real 8x8 grey digits.
- ImageNet 64 (downsampled ImageNet, Chrabaszcz et al. 2017, the ImageNet 64 of the diffusion
  literature), in one of
    * one .npy of uint8 [N, 3, S, S] with its labels beside it in X_labels.npy (0-based), written
      by tools/imagenet64.py from the .npz files below. It is memory-mapped, so the processes of a
      node share one copy in the page cache;
    * the .npz files themselves (Imagenet64_train_part1.npz, ... or train_data_batch_1.npz, ...;
      every *train*.npz of the directory) with DOWNSAMPLED_KEYS: data uint8 [N, 3 S^2], each row
      the R, G and B planes one after the other, each plane row-major, and labels 1..1000 (made
      0-based here). np.load decompresses them, so every process holds all of them (14.7 GiB at
      64 px): fine on one GPU, not on eight.
  Pixels -> [-1, 1]; random flips as for image folders.
- a folder of images, one sub-folder per class (torchvision's ImageFolder layout, classes in
  sorted order, none of them empty), read with pillow and center-cropped as ADM does
  (center_crop_arr), pixels -> [-1, 1]. Random horizontal flips are drawn by train.py together
  with the diffusion noise, so that they too are a function of the seed and the step
  (`TrainingData.flip`). An unreadable file stops the run with one line naming it;
  `python -m tools.check_images DIR` finds every such file beforehand.
- latents (written by tools/extract_latents.py, already multiplied by vae.LATENT_SCALE), in one of
    * one .npz with keys LATENTS_KEY (float16/32 [N, 4, h, w]) and LABELS_KEY (int [N]);
    * a directory of shards SHARD_NAME.format(0), .format(1), ..., each such an .npz;
    * an .npy of latents X.npy with its labels in X_labels.npy, memory-mapped.
  The release stores horizontally flipped copies at extraction, so no flips here. Rows that are
  not finite are an error naming them, found once at start-up (each process scans a share).
Arrays that are not memory-mapped are held by every process; under torchrun rank 0 says so.
"""
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from support import digits, distributed
from support.images import IMAGE_EXTENSIONS

# the training files of a downsampled ImageNet directory (not val_data.npz)
DOWNSAMPLED_GLOB = "*train*.npz"
DOWNSAMPLED_KEYS = ("data", "labels")
DOWNSAMPLED_LAYOUT = ("downsampled ImageNet: data uint8 [N, 3*S*S] (R, G, B planes) and "
                      "labels 1..1000")
IMAGENET_CLASSES = 1000
LATENTS_KEY = "latents"
LABELS_KEY = "labels"
LATENT_LAYOUT = f"latents: {LATENTS_KEY} float [N, C, h, h] and {LABELS_KEY} int [N]"
SHARD_NAME = "shard_{:05d}.npz"
LABELS_NPY_SUFFIX = "_labels.npy"
FINITE_CHUNK = 4096  # rows per chunk of the start-up scan for non-finite latents


@dataclass
class TrainingData:
    dataset: Dataset          # items (x float32 [channels, size, size], y int64)
    num_classes: int
    image_size: int
    channels: int
    flip: bool                # train.py flips each sample with probability 1/2
    description: str
    class_names: list = None  # sub-folder names of an image folder, index = class id
    # The data's own metric of a trained model's samples, where it has one (the digits: class
    # accuracy), called as evaluate(images uint8 (N, H, W, 3), labels (N,), run_dir, step,
    # settings) -> the line to print.
    evaluate: Callable = None


def open_data(spec, image_size=None, num_classes=None, variant_size=None, variant_classes=None,
              pixel_model=None):
    """'digits', ImageNet 64, a class-per-folder image directory, or latents (see above).

    image_size: digits 8 (default), 16 or 32; an image folder's crop size (default variant_size);
    ImageNet 64 and latents come at their stored size. num_classes: latents only (default
    variant_classes), as their labels alone do not tell; the other sources know theirs.
    pixel_model: the name of a model that works on pixels, to which latents are an error (a float
    .npy is read as latents, and would otherwise train as such).
    """
    path = Path(spec)
    if spec != "digits" and not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or directory (or give 'digits')")
    kind = "digits" if spec == "digits" else data_kind(path)
    if kind == "latents" and pixel_model:
        found = np.load(path, mmap_mode="r") if path.suffix == ".npy" else None
        what = f"{found.dtype} {list(found.shape)}" if found is not None else "latents"
        raise ValueError(f"--data {path} holds {what}, read as VAE latents, but {pixel_model} "
                         f"works on pixels: give uint8 pixels [N, 3, {variant_size}, "
                         f"{variant_size}] (tools/imagenet64.py writes ImageNet 64 so) or an "
                         "image folder")
    if kind == "latents":
        if image_size is not None:
            raise ValueError(f"--image-size does not apply to latents ({path}): "
                             "their size is stored")
        return latents(path, num_classes or variant_classes)
    if num_classes is not None:
        raise ValueError(f"--num-classes applies to latents only; the {kind} data know "
                         "their classes")
    if kind == "digits":
        return digits_data(image_size or digits.DIGITS_SIZE)
    if kind == "folder":
        return image_folder(path, image_size or variant_size)
    return downsampled_imagenet(path, image_size)


def digits_data(image_size=digits.DIGITS_SIZE):
    """All 1,797 digits, x = 2 v / 16 - 1 in [-1, 1], (1797, 1, S, S) for S in DIGITS_SIZES
    (8, or bilinearly upsampled)."""
    sizes = digits.DIGITS_SIZES
    if image_size not in sizes:
        raise ValueError(f"digits come at {sizes[0]} px or upsampled to {sizes[1:]}, "
                         f"not {image_size}")
    images, labels = digits.load_real_digits()                           # (1797, 8, 8) in [0, 1]
    x = torch.from_numpy(images).float()[:, None] * 2 - 1               # (1797, 1, 8, 8)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    classes = digits.DIGITS_CLASSES
    return TrainingData(TensorDataset(x, torch.from_numpy(labels)), classes, image_size, 1,
                        flip=False, description=f"scikit-learn digits: {len(x)} images, "
                        f"{classes} classes, {image_size}x{image_size}x1",
                        evaluate=digits.evaluate)


def data_kind(path):
    """'pixels' (ImageNet 64), 'latents' or 'folder', from what the file or directory holds."""
    npz = sorted(path.glob("*.npz")) if path.is_dir() else [path] * (path.suffix == ".npz")
    if path.suffix == ".npy":
        return "pixels" if np.load(path, mmap_mode="r").dtype == np.uint8 else "latents"
    if npz and (path / SHARD_NAME.format(0)).is_file():
        return "latents"
    if npz:
        keys = npz_keys(npz[0])
        if set(DOWNSAMPLED_KEYS) <= keys:
            return "pixels"
        if {LATENTS_KEY, LABELS_KEY} <= keys:
            return "latents"
        raise ValueError(f"{npz[0]}: keys {sorted(keys)}, expected those of {DOWNSAMPLED_LAYOUT}"
                         f", or {LATENT_LAYOUT}")
    if path.is_dir():
        return "folder"
    raise ValueError(f"--data {path}: expected 'digits', ImageNet 64 (.npy or .npz), an image "
                     f"folder, latents (.npz, .npy or a directory of {SHARD_NAME.format(0)}, ...)")


def npz_keys(path):
    try:
        with np.load(path) as f:
            return set(f.files)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # np.load refuses pickles
        raise ValueError(f"cannot read {path} as an .npz: {e}") from None


# ----------------------------------------------------------------------------------------------
# Arrays -> model space, shared by the sources below

def pixels_to_model(pixels):
    """uint8 pixels (..., C, H, W) -> float32 in [-1, 1], p / 127.5 - 1. A copy: a read-only
    (memory-mapped or pillow) array would make torch.from_numpy warn, and the batch must not
    alias the source."""
    return torch.from_numpy(np.array(pixels, dtype=np.float32)) / 127.5 - 1


def latents_to_model(latents):
    """Stored latents (..., C, h, w), float16 or float32 -> a float32 copy (see pixels_to_model)."""
    return torch.from_numpy(np.array(latents, dtype=np.float32))


class ArrayDataset(Dataset):
    """Rows of an array (in memory or memory-mapped) with their labels, through `to_model`.
    A micro-batch is read as one fancy index of the array (__getitems__), not row by row."""

    def __init__(self, array, labels, to_model):
        self.array, self.labels, self.to_model = array, labels, to_model

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.to_model(self.array[i]), int(self.labels[i])

    def __getitems__(self, indices):
        order = np.argsort(indices)  # ascending offsets in the file, then back to the given order
        rows = np.empty_like(order)
        rows[order] = np.arange(len(order))
        x = self.to_model(self.array[np.asarray(indices)[order]])[rows]
        return [(x_i, int(y)) for x_i, y in zip(x, self.labels[indices])]


def _warn_held_by_every_process(what, nbytes, hint=""):
    """Under torchrun, say once that each process keeps its own copy of an in-memory array."""
    if distributed.world_size() > 1 and distributed.is_main():
        print(f"warning: every one of the {distributed.world_size()} processes holds all of "
              f"{what} in RAM ({nbytes / 2 ** 30:.1f} GiB each){hint}",
              file=sys.stderr, flush=True)


def _npz_arrays(path, keys, layout):
    """The arrays `keys` of an .npz; one-line errors for an unreadable file or a missing key."""
    try:
        with np.load(path) as f:
            found, names = {k: f[k] for k in keys if k in f.files}, f.files
    except (OSError, EOFError, ValueError, TypeError,
            zipfile.BadZipFile) as e:  # np.load refuses pickles
        raise ValueError(f"cannot read {path} as an .npz: {e}") from None
    if len(found) < len(keys):
        raise ValueError(f"{path}: no {sorted(set(keys) - set(found))} (keys: {names}); "
                         f"expected {layout}")
    return [found[k] for k in keys]


def labels_npy_path(array_npy):
    """X.npy -> X_labels.npy, where the labels of an .npy of images or latents live."""
    path = Path(array_npy)
    return path.with_name(path.stem + LABELS_NPY_SUFFIX)


def load_npy(path):
    """(array memory-mapped, labels int64) of X.npy and X_labels.npy."""
    labels_path = labels_npy_path(path)
    if not labels_path.is_file():
        raise FileNotFoundError(f"{path}: its labels {labels_path.name} are missing beside it")
    try:
        return np.load(path, mmap_mode="r"), np.load(labels_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} / {labels_path.name}: {e}") from None


# ----------------------------------------------------------------------------------------------
# ImageNet 64 (DiMR-M/3R and L/3R)

def read_downsampled(path):
    """One downsampled ImageNet .npz -> uint8 images [N, 3, S, S] (a view of `data`), labels
    0..999."""
    flat, labels = _npz_arrays(path, DOWNSAMPLED_KEYS, DOWNSAMPLED_LAYOUT)
    return check_pixels(path, flat, np.asarray(labels), base=1)


def check_pixels(path, images, labels, base):
    """uint8 images [N, 3*S*S] or [N, 3, S, S] and labels base..999 + base -> the images
    [N, 3, S, S] (a view) and 0-based labels."""
    n = len(images)
    side = math.isqrt(images[0].size // 3) if images.ndim in (2, 4) and n else 0
    if images.dtype != np.uint8 or side < 1 or images[0].size != 3 * side * side \
            or (images.ndim == 4 and images.shape[1:] != (3, side, side)):
        raise ValueError(f"{path}: data must be uint8 [N, 3*S*S] (R, G, B planes) or "
                         f"[N, 3, S, S], got {images.dtype} {list(images.shape)}")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) \
            or labels.min() < base or labels.max() >= IMAGENET_CLASSES + base:
        raise ValueError(f"{path}: labels must be {n} class ids in "
                         f"{base}..{IMAGENET_CLASSES - 1 + base}"
                         + (" (1-based)" if base else " (0-based)"))
    return images.reshape(n, 3, side, side), labels.astype(np.int64) - base


def downsampled_imagenet(path, image_size=None):
    """ImageNet 64 from tools/imagenet64.py's .npy (memory-mapped) or from the .npz files."""
    if path.suffix == ".npy":
        parts = [check_pixels(path, *load_npy(path), base=0)]
        files = [path]
    else:
        files = sorted(path.glob(DOWNSAMPLED_GLOB)) if path.is_dir() else [path]
        parts = [read_downsampled(f) for f in files]
    sides = sorted({images.shape[-1] for images, _ in parts})
    if len(sides) > 1:
        raise ValueError(f"{path}: files of different image sizes {sides}")
    if image_size not in (None, sides[0]):
        raise ValueError(f"--image-size {image_size}: {path} holds {sides[0]}x{sides[0]} images")
    side, n = sides[0], sum(len(labels) for _, labels in parts)
    if path.suffix != ".npy":
        _warn_held_by_every_process(path, n * 3 * side * side, "; `python -m tools.imagenet64` "
                                    "writes one memory-mapped .npy that they share")
    datasets = [ArrayDataset(images, labels, pixels_to_model) for images, labels in parts]
    return TrainingData(datasets[0] if len(datasets) == 1 else ConcatDataset(datasets),
                        IMAGENET_CLASSES, side, 3, flip=True,
                        description=f"ImageNet {side}x{side} {path}: {n} images in "
                                    f"{len(files)} file(s), {IMAGENET_CLASSES} classes")


# ----------------------------------------------------------------------------------------------
# Image folder (ImageNet at other sizes, or any labelled image collection)

def center_crop_arr(image, image_size):
    """ADM's preprocessing: halve with a box filter while the short side is >= 2 * image_size,
    resize with bicubic so the short side is image_size, take the center square.
    image: an RGB PIL image -> uint8 (S, S, 3)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def read_image(path, image_size):
    """An image file -> uint8 (S, S, 3) center-cropped; any failure names the file."""
    try:
        with Image.open(path) as image:
            return center_crop_arr(image.convert("RGB"), image_size)
    except Exception as e:  # pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


class ImageFolderDataset(Dataset):
    def __init__(self, samples, image_size):
        self.samples, self.image_size = samples, image_size       # [(path, class id)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        arr = read_image(path, self.image_size)
        return pixels_to_model(arr.transpose(2, 0, 1)), label         # (3, S, S) in [-1, 1]


def folder_samples(root):
    """[(path, class id)] of a class-per-folder directory, and the classes (sorted folder names,
    as torchvision's ImageFolder and ADM number them). A class without images is an error, as in
    ImageFolder: its id would exist with nothing to learn from."""
    root = Path(root)
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = [(os.path.join(dirpath, f), label)
                 for dirpath, _, files in sorted(os.walk(root / name)) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        empty += [name] * (not found)
        samples += found
    if not samples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: expected one "
                         f"sub-folder per class holding its images (found {len(classes)} "
                         "sub-folders)")
    if empty:
        raise ValueError(f"{root}: {len(empty)} of {len(classes)} class folders hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {empty[0]}: remove them or add "
                         "images")
    return samples, classes


def image_folder(root, image_size):
    samples, classes = folder_samples(root)
    return TrainingData(ImageFolderDataset(samples, image_size), len(classes), image_size, 3,
                        flip=True, description=f"image folder {root}: {len(samples)} images, "
                        f"{len(classes)} classes, center-cropped to {image_size}x{image_size}x3",
                        class_names=classes)


def batches(loader):
    """A DataLoader's batches; an error of the data (a bad file) becomes a ValueError with its own
    one-line message: in a DataLoader worker torch re-raises it with the worker's traceback, whose
    last line is 'Type: message'. (distributed.run_main then stops the workers, which may ignore
    SIGTERM, before the process ends.)"""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            kind, sep, message = last.partition(": ")
            raise ValueError(message if sep and kind.isidentifier() else last) from None
        yield batch


# ----------------------------------------------------------------------------------------------
# Latents (ImageNet 256 / 512 through the VAE)

def _latent_npz(path):
    return _npz_arrays(path, (LATENTS_KEY, LABELS_KEY), LATENT_LAYOUT)


def load_latents(path):
    """(latents [N, C, h, w] as stored, labels int64 [N]) as numpy arrays; an .npy is
    memory-mapped."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(SHARD_NAME.replace("{:05d}", "*")))
        expected = [path / SHARD_NAME.format(i) for i in range(len(shards))]
        if shards != expected:
            missing = sorted(set(expected) - set(shards))
            raise ValueError(f"{path}: shards must be numbered {SHARD_NAME.format(0)}, "
                             f"{SHARD_NAME.format(1)}, ... without gaps; "
                             f"{missing[0].name if missing else 'the first'} is missing")
        parts = [_latent_npz(p) for p in shards]
        latents, labels = (np.concatenate([p[0] for p in parts]),
                           np.concatenate([p[1] for p in parts]))
    elif path.suffix == ".npz":
        latents, labels = _latent_npz(path)
    else:
        latents, labels = load_npy(path)
    if latents.ndim != 4 or latents.shape[2] != latents.shape[3] \
            or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(f"{path}: latents must be float [N, C, h, h], "
                         f"got {latents.dtype} {list(latents.shape)}")
    if labels.shape != latents.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers [{len(latents)}], "
                         f"got {labels.dtype} {list(labels.shape)}")
    if len(labels) == 0 or labels.min() < 0:
        raise ValueError(f"{path}: " + ("no latents" if len(labels) == 0 else "negative class ids"))
    return latents, labels.astype(np.int64)


def non_finite_rows(array, start=0, stop=None):
    """Indices of the rows of array[start:stop] holding NaN or inf, read FINITE_CHUNK at a time."""
    stop = len(array) if stop is None else stop
    bad = [np.zeros(0, np.int64)]
    for lo in range(start, stop, FINITE_CHUNK):
        chunk = np.asarray(array[lo:min(lo + FINITE_CHUNK, stop)])
        bad.append(lo + np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(1)))
    return np.concatenate(bad)


def latents(path, num_classes):
    lat, labels = load_latents(path)
    if labels.max() >= num_classes:
        raise ValueError(f"{path}: class ids up to {labels.max()}, but {num_classes} classes "
                         "(--num-classes)")
    rank, world = distributed.rank(), distributed.world_size()
    bad = non_finite_rows(lat, len(lat) * rank // world, len(lat) * (rank + 1) // world)
    if len(bad):
        raise ValueError(f"{path}: {len(bad)} latent(s) with NaN or inf, rows "
                         f"{', '.join(map(str, bad[:5]))}{', ...' * (len(bad) > 5)}")
    if not isinstance(lat, np.memmap):
        _warn_held_by_every_process(path, lat.nbytes, "; `tools/extract_latents.py --npy OUT.npy` "
                                    "writes one memory-mapped .npy that the processes of a node "
                                    "share")
    N, C, h, _ = lat.shape
    return TrainingData(ArrayDataset(lat, labels, latents_to_model), num_classes, h, C, flip=False,
                        description=f"latents {path}: {N} of {C}x{h}x{h} ({lat.dtype}), "
                                    f"{num_classes} classes")
