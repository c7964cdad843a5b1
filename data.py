"""Training data in the model's space: the digits demo, ImageNet 64, class-per-folder images,
VAE latents.

The paper trains on ImageNet: in pixel space at 64x64 (DiMR-M/3R, L/3R; Table 2), and on the
Stable Diffusion VAE's latents at 256 and 512 px (XL/2R, G/2R, XL/3R; Tables 3, 4). Each source
here is a Dataset of (x float32 [C, H, W], y int64) in the space the network sees:

- digits (the laptop demo): scikit-learn's load_digits, 1,797 real 8x8 grey digits, 10 classes,
  pixels 0..16 -> [-1, 1]; 8x8 natively, bilinearly upsampled to 16 or 32 px on request.
- downsampled ImageNet (Chrabaszcz et al. 2017), the labelled 64x64 ImageNet of the diffusion
  literature's ImageNet 64 results: .npz files (Imagenet64_train_part1.npz, ... or
  train_data_batch_1.npz, ...; every *train*.npz of the directory) with DOWNSAMPLED_KEYS: data uint8
  [N, 3 S^2], each row the R, G and B planes one after the other, each plane row-major, and labels
  1..1000 (made 0-based here). Pixels -> [-1, 1]; random flips as for image folders.
- a folder of images, one sub-folder per class (torchvision's ImageFolder layout, classes in
  sorted order), read with pillow and center-cropped as ADM does (center_crop_arr below), pixels
  -> [-1, 1]. Random horizontal flips are drawn by train.py together with the diffusion noise,
  so that they too are a function of the seed and the step (`TrainingData.flip`).
- latents (written by extract_latents.py, already multiplied by vae.LATENT_SCALE), in one of
    * one .npz with keys LATENTS_KEY (float16/32 [N, 4, h, w]) and LABELS_KEY (int [N]);
    * a directory of shards SHARD_NAME.format(0), .format(1), ..., each such an .npz;
    * an .npy of latents X.npy with its labels beside it in X_labels.npy (labels_npy_path);
      the .npy is memory-mapped, so 8 processes on one node share one copy in the page cache.
  The release stores horizontally flipped copies at extraction, so no flips here.
Arrays that are not memory-mapped are held by every process; under torchrun rank 0 says so.
"""
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

import distributed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_SIZE = 8  # load_digits images are 8x8
# native, and upsampled (each doubling ~4x the cost)
DIGITS_SIZES = (DIGITS_SIZE, 2 * DIGITS_SIZE, 4 * DIGITS_SIZE)
DIGITS_LEVELS = 16  # load_digits pixels take the values 0..16
DIGITS_CLASSES = 10
# the training files of a downsampled ImageNet directory (not val_data.npz)
DOWNSAMPLED_GLOB = "*train*.npz"
DOWNSAMPLED_KEYS = ("data", "labels")
IMAGENET_CLASSES = 1000
LATENTS_KEY = "latents"
LABELS_KEY = "labels"
SHARD_NAME = "shard_{:05d}.npz"
LABELS_NPY_SUFFIX = "_labels.npy"


@dataclass
class TrainingData:
    dataset: Dataset          # items (x float32 [channels, size, size], y int64)
    num_classes: int
    image_size: int
    channels: int
    flip: bool                # train.py flips each sample with probability 1/2
    description: str
    class_names: list = None  # sub-folder names of an image folder, index = class id


def open_data(spec, image_size=None, num_classes=None, variant_size=None, variant_classes=None):
    """'digits', downsampled ImageNet .npz files, a class-per-folder image directory, or latents.

    image_size: digits 8 (default), 16 or 32; an image folder's crop size (default variant_size);
    downsampled ImageNet and latents come at their stored size. num_classes: latents only (default
    variant_classes), as their labels alone do not tell; the other sources know theirs.
    """
    path = Path(spec)
    if spec == "digits":
        kind = "digits"
    elif not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or directory (or give 'digits')")
    elif downsampled_files(path):
        kind = "downsampled ImageNet"
    elif path.suffix in (".npz", ".npy") or (path / SHARD_NAME.format(0)).is_file():
        kind = "latents"
    elif path.is_dir():
        kind = "folder"
    else:
        raise ValueError(f"--data {spec}: expected 'digits', downsampled ImageNet .npz files, "
                         f"an image folder, a latent .npz/.npy or a directory of "
                         f"{SHARD_NAME.format(0)}, ...")
    if kind == "latents":
        if image_size is not None:
            raise ValueError(f"--image-size does not apply to latents ({path}): "
                             "their size is stored")
        return latents(path, num_classes or variant_classes)
    if num_classes is not None:
        raise ValueError(f"--num-classes applies to latents only; the {kind} data know "
                         "their classes")
    if kind == "downsampled ImageNet":
        return downsampled_imagenet(path, image_size)
    return (digits(image_size or DIGITS_SIZE) if kind == "digits"
            else image_folder(path, image_size or variant_size))


# ----------------------------------------------------------------------------------------------
# Arrays -> model space, shared by the sources below

def pixels_to_model(pixels):
    """uint8 pixels (C, H, W) -> float32 in [-1, 1], p / 127.5 - 1. A copy: a read-only
    (memory-mapped or pillow) array would make torch.from_numpy warn, and the batch must not
    alias the source."""
    return torch.from_numpy(np.array(pixels, dtype=np.float32)) / 127.5 - 1


def latents_to_model(latents):
    """Stored latents (C, h, w), float16 or float32 -> a float32 copy (see pixels_to_model)."""
    return torch.from_numpy(np.array(latents, dtype=np.float32))


class ArrayDataset(Dataset):
    """Rows of an array (in memory or memory-mapped) with their labels, through `to_model`."""

    def __init__(self, array, labels, to_model):
        self.array, self.labels, self.to_model = array, labels, to_model

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.to_model(self.array[i]), int(self.labels[i])


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


# ----------------------------------------------------------------------------------------------
# Digits demo

def load_real_digits():
    """The real digits as images (1797, 8, 8) in [0, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images / DIGITS_LEVELS, digits.target.astype(np.int64)


def digits(image_size=DIGITS_SIZE):
    """All 1,797 digits, x = 2 v / 16 - 1 in [-1, 1], (1797, 1, S, S) for S in DIGITS_SIZES."""
    if image_size not in DIGITS_SIZES:
        raise ValueError(f"digits come at {DIGITS_SIZES[0]} px or upsampled to {DIGITS_SIZES[1:]}, "
                         f"not {image_size}")
    images, labels = load_real_digits()                                  # (1797, 8, 8) in [0, 1]
    x = torch.from_numpy(images).float()[:, None] * 2 - 1               # (1797, 1, 8, 8)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    return TrainingData(TensorDataset(x, torch.from_numpy(labels)), DIGITS_CLASSES, image_size, 1,
                        flip=False, description=f"scikit-learn digits: {len(x)} images, "
                        f"{DIGITS_CLASSES} classes, {image_size}x{image_size}x1")


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet (ImageNet 64 for DiMR-M/3R and L/3R)

def downsampled_files(path):
    """The downsampled ImageNet training files at `path` (one .npz, or a directory's *train*.npz
    files), or [] when `path` holds none: they are recognised by the key `data` of the first
    file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(DOWNSAMPLED_GLOB))
    else:
        files = [path] if path.suffix == ".npz" else []
    if not files:
        return []
    try:
        with np.load(files[0]) as f:
            return files if DOWNSAMPLED_KEYS[0] in f.files else []
    except (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile):
        return []  # not such a file: the latent reader reports what is wrong with it


def read_downsampled(path):
    """One downsampled ImageNet .npz -> uint8 images [N, 3, S, S] (a view of `data`), labels
    0..999."""
    flat, labels = _npz_arrays(path, DOWNSAMPLED_KEYS, "data uint8 [N, 3*S*S] and labels 1..1000")
    side = int(round((flat.shape[-1] / 3) ** 0.5)) if flat.ndim == 2 else 0
    if flat.dtype != np.uint8 or side < 1 or 3 * side * side != flat.shape[1]:
        raise ValueError(f"{path}: data must be uint8 [N, 3*S*S] (R, G, B planes), "
                         f"got {flat.dtype} {list(flat.shape)}")
    labels = np.asarray(labels)
    if labels.shape != flat.shape[:1] or not np.issubdtype(labels.dtype, np.integer) \
            or len(labels) == 0 or labels.min() < 1 or labels.max() > IMAGENET_CLASSES:
        raise ValueError(f"{path}: labels must be {len(flat)} class ids in "
                         f"1..{IMAGENET_CLASSES} (1-based)")
    # images (N, 3, S, S), labels 0-based
    return flat.reshape(len(flat), 3, side, side), labels.astype(np.int64) - 1


def downsampled_imagenet(path, image_size=None):
    files = downsampled_files(path)
    parts = [read_downsampled(f) for f in files]
    sides = sorted({images.shape[-1] for images, _ in parts})
    if len(sides) > 1:
        raise ValueError(f"{path}: files of different image sizes {sides}")
    if image_size not in (None, sides[0]):
        raise ValueError(f"--image-size {image_size}: {path} holds {sides[0]}x{sides[0]} images")
    side, n = sides[0], sum(len(labels) for _, labels in parts)
    _warn_held_by_every_process(path, n * 3 * side * side)
    return TrainingData(ConcatDataset([ArrayDataset(images, labels, pixels_to_model)
                                       for images, labels in parts]),
                        IMAGENET_CLASSES, side, 3, flip=True,
                        description=f"downsampled ImageNet {path}: {n} images in "
                                    f"{len(files)} file(s), {IMAGENET_CLASSES} classes, "
                                    f"{side}x{side}x3")


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


class ImageFolderDataset(Dataset):
    def __init__(self, samples, image_size):
        self.samples, self.image_size = samples, image_size       # [(path, class id)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                arr = center_crop_arr(image.convert("RGB"), self.image_size)
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return pixels_to_model(arr.transpose(2, 0, 1)), label         # (3, S, S) in [-1, 1]


def image_folder(root, image_size):
    root = Path(root)
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: expected one "
                         f"sub-folder per class holding its images (found {len(classes)} "
                         "sub-folders)")
    return TrainingData(ImageFolderDataset(samples, image_size), len(classes), image_size, 3,
                        flip=True, description=f"image folder {root}: {len(samples)} images, "
                        f"{len(classes)} classes, center-cropped to {image_size}x{image_size}x3",
                        class_names=classes)


# ----------------------------------------------------------------------------------------------
# Latents (ImageNet 256 / 512 through the VAE)

def labels_npy_path(latents_npy):
    """X.npy -> X_labels.npy, where the labels of an .npy of latents live."""
    path = Path(latents_npy)
    return path.with_name(path.stem + LABELS_NPY_SUFFIX)


def _latent_npz(path):
    return _npz_arrays(path, (LATENTS_KEY, LABELS_KEY),
                       f"{LATENTS_KEY} [N, C, h, w] and {LABELS_KEY} [N]")


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
        labels_path = labels_npy_path(path)
        if not labels_path.is_file():
            raise FileNotFoundError(f"{path}: its labels {labels_path.name} are missing beside it")
        try:
            latents, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} / {labels_path.name}: {e}") from None
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


def latents(path, num_classes):
    lat, labels = load_latents(path)
    if labels.max() >= num_classes:
        raise ValueError(f"{path}: class ids up to {labels.max()}, but {num_classes} classes "
                         "(--num-classes)")
    if not isinstance(lat, np.memmap):
        _warn_held_by_every_process(path, lat.nbytes, "; `extract_latents.py --npy OUT.npy` "
                                    "writes one memory-mapped .npy that the processes of a node "
                                    "share")
    N, C, h, _ = lat.shape
    return TrainingData(ArrayDataset(lat, labels, latents_to_model), num_classes, h, C, flip=False,
                        description=f"latents {path}: {N} of {C}x{h}x{h} ({lat.dtype}), "
                                    f"{num_classes} classes")
