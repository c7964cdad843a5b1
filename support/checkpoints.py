"""Files that are never half-written, checkpoints read without unpickling code, and the authors'
released checkpoints converted to ours.

Every file the project writes for later use (checkpoints, statistics, sample .npz and parts,
latent shards, run logs) goes through `atomic_write`: it is written to a temporary file beside the
target, flushed to disk and renamed over it, so a crash, a preemption or a full disk mid-write
leaves the previous file intact and no temporary file behind, and the error says in one line which
file and why ("no space left on device"). Checkpoints are plain dicts of tensors and Python values
(config dict, step, RNG states) read with weights_only=True.

The release (github.com/qihao067/DiMR) stores its network under other names: `from_official`
infers the config from the tensor shapes and renames the keys (OFFICIAL_KEYS); `python -m
tools.convert` writes the result as one of our checkpoints.
"""
import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path

import torch

from dimr import VARIANTS, DiMR, DiMRConfig, config_from_dict


class WriteError(OSError):
    """A file could not be written; the message names it and the cause in plain words."""


def plain_cause(error):
    """'no space left on device' for ENOSPC and the like, also where torch's zip writer raised its
    own RuntimeError ("unexpected pos ...") while the OSError of a write was unwinding (the
    OSError is then its context); else the first line of the message."""
    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return os.strerror(cause.errno).lower()
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


@contextlib.contextmanager
def atomic_write(path, suffix="", fsync=True):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it (unless not asked:
    per-image PNGs) and rename it over `path` (`suffix` keeps an extension that a writer such as
    np.savez or PIL insists on). Any failure removes the temporary file, keeps `path` as it was
    and raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except (OSError, RuntimeError) as e:  # torch reports some write errors as RuntimeError
        raise WriteError(f"cannot write {path}: {plain_cause(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def save(obj, path):
    """torch.save, atomically. Through a Python file, so that a full disk raises an OSError
    (ENOSPC) from its write: torch's zip writer may replace it by a RuntimeError ("unexpected
    pos"), but one that keeps it as its context, where plain_cause finds it."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: all one line
        raise ValueError(f"cannot read checkpoint {path}: {why_unreadable(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def why_unreadable(error):
    """torch.load's reason in one line, without its advice to retry with weights_only=False,
    which would run whatever code the file carries."""
    text = str(error)
    code = re.search(r"GLOBAL (\S+)", text)                  # a class or function it would import
    if code:
        return (f"it carries pickled Python code ({code.group(1)}) besides tensors and plain "
                f"values, and checkpoints are only read in a way that runs no code")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # what follows is the hint
    detail = unpickler.group(1) if unpickler else text.split(". ")[0].split("\n")[0]
    reason = f"{type(error).__name__}: {detail[:200]}" if detail else type(error).__name__
    return f"not a PyTorch checkpoint, or a truncated or corrupted one ({reason})"


# ----------------------------------------------------------------------------------------------
# Our checkpoints: train.py's and tools/convert.py's

def load_model(path, weights="ema", device="cpu"):
    """Rebuild a DiMR from one of our checkpoints. Returns (model in eval mode, checkpoint)."""
    ckpt = load(path)
    if "config" not in ckpt or weights not in ckpt:
        hint = ("; it looks like the authors' release: convert it with `python -m tools.convert`"
                if any(str(k).startswith("stages.") for k in ckpt) else "")
        raise ValueError(f"{path}: not a DiMR checkpoint with '{weights}' weights "
                         f"({len(ckpt)} keys, e.g. {', '.join(map(str, list(ckpt)[:3]))}){hint}")
    model = DiMR(config_from_dict(ckpt["config"]))
    load_state_dict_strict(model, ckpt[weights], source=str(path))
    return model.to(device).eval(), ckpt


def load_state_dict_strict(model, sd, source):
    """load_state_dict with one clear line per kind of mismatch instead of a long RuntimeError."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(ours[k].shape)}"
              for k in ours if k in sd and sd[k].shape != ours[k].shape]
    for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if names:
            raise ValueError(f"{source}: {len(names)} {what}, e.g. {', '.join(names[:3])}")
    model.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# The authors' release

# Their key -> ours, applied in order (regexes on the full key).
OFFICIAL_KEYS = [
    (r"^stages\.0\.class_embeds\.", "class_embed."),
    (r"^stages\.(\d+)\.", r"branches.\1."),
    (r"\.input_layer\.1\.", ".patch_embed."),
    (r"\.input_layer\.3\.position_embeddings\.weight$", ".pos_embed"),
    (r"\.block1\.norm\.scale\.", ".norm1.gamma."),
    (r"\.block1\.query_key_value\.", ".attn.qkv."),
    (r"\.block1\.dense\.", ".attn.proj."),
    (r"\.block1\.1\.", ".dwconv."),
    (r"\.block2\.norm\.scale\.", ".NORM2.gamma."),
    (r"\.block2\.(w\d)\.", r".mlp.\1."),
    (r"\.skip_denses\.", ".skips."),
    (r"\.output_layer\.0\.", ".head.norm."),
    (r"\.output_layer\.2\.", ".head.conv."),
    (r"\.upsample\.0\.", ".cascade.norm_in."),
    (r"\.upsample\.1\.kernel\.", ".cascade.proj."),
    (r"\.upsample\.2\.", ".cascade.norm_out."),
    (r"\.norm(_in|_out)?\.weight\.", r".norm\1.gamma."),
    (r"\.norm(_in|_out)?\.bias\.", r".norm\1.beta."),
    (r"\.param0$", ".p0"), (r"\.param1$", ".p1"),
    (r"\.nodecay_weight$", ".w"), (r"\.nodecay_bias$", ".b"),
]


def official_key(key):
    for pattern, repl in OFFICIAL_KEYS:
        key = re.sub(pattern, repl, key)
    # the second norm is `norm2` in a Transformer block and `norm` in a ConvNeXt block
    return key.replace(".NORM2.", ".norm2." if key.startswith("branches.0.") else ".norm.")


def config_from_official(sd, num_heads):
    """Infer the config from the release's tensor shapes (only the head count is not in them)."""
    try:
        R = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))
        widths, depths = [], []
        for r in range(R):
            D, C, p, _ = sd[f"stages.{r}.input_layer.1.weight"].shape
            widths.append(D)
            depths.append(1 + max(int(k.split(".")[3]) for k in sd
                                  if k.startswith(f"stages.{r}.blocks.")))
            if r == 0:
                patch, in_channels = p, C
                grid = math.isqrt(sd["stages.0.input_layer.3.position_embeddings.weight"].shape[0])
        num_classes = sd["stages.0.class_embeds.weight"].shape[0] - 1
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"not a DiMR release state_dict (could not read {e})") from None
    config = DiMRConfig(grid * patch, in_channels, num_classes, patch, tuple(depths), tuple(widths),
                     num_heads)
    # prefer the registry's config (the same model, with its configured depths)
    for variant in VARIANTS.values():
        if dataclasses.replace(variant, depths=variant.blocks) == config:
            return variant
    return config


def from_official(state_dict, num_heads):
    """Build the model matching a released state_dict (sizes from its shapes) and load it."""
    sd = state_dict.get("state_dict", state_dict.get("model", state_dict))
    config = config_from_official(sd, num_heads)
    model = DiMR(config)
    load_state_dict_strict(model, {official_key(k): v for k, v in sd.items()},
                           source="release checkpoint")
    return model
