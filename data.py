"""Training data in the model's space: the digits demo, class-per-folder images, VAE latents.

The paper trains on ImageNet: in pixel space at 64x64 (DiMR-M/3R, L/3R; Table 2), and on the
Stable Diffusion VAE's latents at 256 and 512 px (XL/2R, G/2R, XL/3R; Tables 3, 4). Each source
here is a Dataset of (x float32 [C, H, W], y int64) in the space the network sees:

- digits (the laptop demo): scikit-learn's load_digits, 1,797 real 8x8 grey digits, 10 classes,
  pixels 0..16 -> [-1, 1]; 8x8 natively, bilinearly upsampled to 16 or 32 px on request.
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
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from fid import DIGITS_CLASSES, IMAGE_EXTENSIONS, load_real_digits

LATENTS_KEY = "latents"
LABELS_KEY = "labels"
SHARD_NAME = "shard_{:05d}.npz"
LABELS_NPY_SUFFIX = "_labels.npy"
DIGITS_SIZES = (8, 16, 32)  # native, and the two upsampled options (each doubling costs ~4x)


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
    """'digits', a class-per-folder image directory, or latents (.npz, .npy, shard directory).

    image_size: digits 8 (default), 16 or 32; an image folder's crop size (default variant_size);
    latents come at their stored size. num_classes: latents only (default variant_classes), as
    their labels alone do not tell; digits and image folders know theirs.
    """
    path = Path(spec)
    if spec == "digits":
        kind = "digits"
    elif not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or directory (or give 'digits')")
    elif path.suffix in (".npz", ".npy") or (path / SHARD_NAME.format(0)).is_file():
        kind = "latents"
    elif path.is_dir():
        kind = "folder"
    else:
        raise ValueError(f"--data {spec}: expected 'digits', an image folder, a latent .npz/.npy "
                         f"or a directory of {SHARD_NAME.format(0)}, ...")
    if kind == "latents":
        if image_size is not None:
            raise ValueError(f"--image-size does not apply to latents ({path}): their size is stored")
        return latents(path, num_classes or variant_classes)
    if num_classes is not None:
        raise ValueError(f"--num-classes applies to latents only; the {kind} data know their classes")
    return digits(image_size or DIGITS_SIZES[0]) if kind == "digits" else image_folder(path, image_size or variant_size)


# ----------------------------------------------------------------------------------------------
# Digits demo

def digits(image_size=8):
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
# Image folder (ImageNet at 64 px for DiMR-M/3R and L/3R)

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
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1   # (3, S, S) in [-1, 1]
        return x, label


def image_folder(root, image_size):
    root = Path(root)
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: expected one sub-folder "
                         f"per class holding its images (found {len(classes)} sub-folders)")
    return TrainingData(ImageFolderDataset(samples, image_size), len(classes), image_size, 3, flip=True,
                        description=f"image folder {root}: {len(samples)} images, {len(classes)} classes, "
                        f"center-cropped to {image_size}x{image_size}x3", class_names=classes)


# ----------------------------------------------------------------------------------------------
# Latents (ImageNet 256 / 512 through the VAE)

def labels_npy_path(latents_npy):
    """X.npy -> X_labels.npy, where the labels of an .npy of latents live."""
    path = Path(latents_npy)
    return path.with_name(path.stem + LABELS_NPY_SUFFIX)


def _read_npz(path):
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in (LATENTS_KEY, LABELS_KEY) if k in f.files}
            keys = f.files
    except (OSError, EOFError, ValueError, AttributeError) as e:  # not a zip: np.load tries pickle, refused
        raise ValueError(f"cannot read {path} as an .npz: {e}") from None
    if len(arrays) < 2:
        raise ValueError(f"{path}: no {sorted({LATENTS_KEY, LABELS_KEY} - set(arrays))} (keys: {keys}); expected "
                         f"{LATENTS_KEY} [N, C, h, w] and {LABELS_KEY} [N]")
    return arrays[LATENTS_KEY], arrays[LABELS_KEY]


def _read_latents(path):
    """(latents [N, C, h, w], labels [N]) as numpy arrays; an .npy is memory-mapped."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(SHARD_NAME.replace("{:05d}", "*")))
        expected = [path / SHARD_NAME.format(i) for i in range(len(shards))]
        if shards != expected:
            missing = sorted(set(expected) - set(shards))
            raise ValueError(f"{path}: shards must be numbered {SHARD_NAME.format(0)}, {SHARD_NAME.format(1)}, "
                             f"... without gaps; {missing[0].name if missing else 'the first'} is missing")
        parts = [_read_npz(p) for p in shards]
        latents, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    elif path.suffix == ".npz":
        latents, labels = _read_npz(path)
    else:
        labels_path = labels_npy_path(path)
        if not labels_path.is_file():
            raise FileNotFoundError(f"{path}: its labels {labels_path.name} are missing beside it")
        try:
            latents, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} / {labels_path.name}: {e}") from None
    if latents.ndim != 4 or latents.shape[2] != latents.shape[3] or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(f"{path}: latents must be float [N, C, h, h], got {latents.dtype} {list(latents.shape)}")
    if labels.shape != latents.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers [{len(latents)}], got {labels.dtype} {list(labels.shape)}")
    if len(labels) == 0 or labels.min() < 0:
        raise ValueError(f"{path}: " + ("no latents" if len(labels) == 0 else "negative class ids"))
    return latents, labels.astype(np.int64)


def load_latents(path):
    """Latents as stored (dtype kept) and int64 labels, as torch tensors in memory."""
    latents, labels = _read_latents(path)
    return torch.from_numpy(np.array(latents)), torch.from_numpy(labels)  # a copy: memory-mapped .npy are read-only


class LatentDataset(Dataset):
    def __init__(self, latents, labels):
        self.latents, self.labels = latents, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.latents[i], dtype=np.float32)), int(self.labels[i])


def latents(path, num_classes):
    lat, labels = _read_latents(path)
    if labels.max() >= num_classes:
        raise ValueError(f"{path}: class ids up to {labels.max()}, but {num_classes} classes (--num-classes)")
    N, C, h, _ = lat.shape
    return TrainingData(LatentDataset(lat, labels), num_classes, h, C, flip=False,
                        description=f"latents {path}: {N} of {C}x{h}x{h} ({lat.dtype}), {num_classes} classes")
