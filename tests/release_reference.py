"""An independent, deliberately plain re-statement of the authors' DiMR forward pass, written
directly on the release's state_dict key names (tests/data/official_xl_2r_state_dict.txt) and
the facts of the paper: explicit softmax attention, index-loop pixel shuffle, hand-written norms.
It shares no code with dimr.py; tests compare checkpoints.from_official(...) against it."""
import math

import torch
import torch.nn.functional as F


def release_state_dict(in_ch, num_classes, patch, grid, blocks, widths, dtype=torch.float64,
                       device="cpu", generator=None):
    """A random state_dict with the release's names and shapes (`blocks` = built blocks per branch).

    TD parameters get p0 != p1 and non-zero slope/offset so time dependence is exercised."""
    shapes = {}
    for r, (D, n) in enumerate(zip(widths, blocks)):
        s, p = f"stages.{r}", patch // 2 ** r
        shapes[f"{s}.input_layer.1.weight"] = (D, in_ch, p, p)
        shapes[f"{s}.input_layer.1.bias"] = (D,)
        shapes[f"{s}.input_layer.3.position_embeddings.weight"] = ((grid * 2 ** r) ** 2, D)
        if r == 0:
            shapes[f"{s}.class_embeds.weight"] = (num_classes + 1, D)
        else:
            cat = (blocks[r - 1] + 1) * widths[r - 1]
            for i, dim in ((0, cat), (2, D)):
                for wb in ("weight", "bias"):
                    for q in ("param0", "param1", "nodecay_weight", "nodecay_bias"):
                        shapes[f"{s}.upsample.{i}.{wb}.{q}"] = (dim,)
            shapes[f"{s}.upsample.1.kernel.weight"] = (4 * D, cat)
            shapes[f"{s}.upsample.1.kernel.bias"] = (4 * D,)
        for b in range(n):
            k = f"{s}.blocks.{b}"
            if r == 0:
                for q in ("param0", "param1", "nodecay_weight", "nodecay_bias"):
                    shapes[f"{k}.block1.norm.scale.{q}"] = (D,)
                shapes[f"{k}.block1.query_key_value.weight"] = (3 * D, D)
                shapes[f"{k}.block1.dense.weight"] = (D, D)
                shapes[f"{k}.block1.dense.bias"] = (D,)
            else:
                shapes[f"{k}.block1.1.weight"] = (D, 1, 7, 7)
                shapes[f"{k}.block1.1.bias"] = (D,)
            for q in ("param0", "param1", "nodecay_weight", "nodecay_bias"):
                shapes[f"{k}.block2.norm.scale.{q}"] = (D,)
            shapes[f"{k}.block2.w0.weight"] = (2 * D, D)
            shapes[f"{k}.block2.w0.bias"] = (2 * D,)
            shapes[f"{k}.block2.w1.weight"] = (2 * D, D)
            shapes[f"{k}.block2.w1.bias"] = (2 * D,)
            shapes[f"{k}.block2.w2.weight"] = (D, 2 * D)
            shapes[f"{k}.block2.w2.bias"] = (D,)
        for j in range(n // 2):
            shapes[f"{s}.skip_denses.{j}.weight"] = (D, 2 * D)
            shapes[f"{s}.skip_denses.{j}.bias"] = (D,)
        for wb in ("weight", "bias"):
            for q in ("param0", "param1", "nodecay_weight", "nodecay_bias"):
                shapes[f"{s}.output_layer.0.{wb}.{q}"] = (D,)
        shapes[f"{s}.output_layer.2.weight"] = (in_ch, D, 3, 3)
        shapes[f"{s}.output_layer.2.bias"] = (in_ch,)
    if device == "meta":
        return {k: torch.empty(v, device="meta") for k, v in shapes.items()}

    sd = {}
    for k, shape in shapes.items():
        x = torch.randn(shape, dtype=dtype, generator=generator)
        if k.endswith(("param0", "param1")):
            init = 1.0 if ".weight." in k or ".scale." in k else 0.0
            sd[k] = init + 0.3 * x
        elif "nodecay" in k:
            sd[k] = 0.8 * x
        elif len(shape) > 1:
            fan_in = math.prod(shape[1:])
            sd[k] = x / math.sqrt(fan_in) if "embed" not in k else 0.5 * x
        else:
            sd[k] = 0.05 * x
    return sd


def td(sd, prefix, t):
    """value(t) = p1 + sigmoid((1 + w) t + b) (p0 - p1), per sample: (B, D)."""
    p0, p1 = sd[prefix + ".param0"], sd[prefix + ".param1"]
    w, b = sd[prefix + ".nodecay_weight"], sd[prefix + ".nodecay_bias"]
    return p1 + torch.sigmoid((1 + w) * t[:, None] + b) * (p0 - p1)


def rms_norm(x, g):                     # x (B, L, D), g (B, D)
    rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1])
    return x / (rms + 1e-8) * g[:, None, :]


def layer_norm(sd, prefix, x, t):       # x (B, L, D)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    g, b = td(sd, prefix + ".weight", t), td(sd, prefix + ".bias", t)
    return (x - mu) / torch.sqrt(var + 1e-5) * g[:, None, :] + b[:, None, :]


def linear(sd, prefix, x):
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


def glu(sd, k, x):
    return linear(sd, k + ".w2", F.gelu(linear(sd, k + ".w0", x)) * linear(sd, k + ".w1", x))


def attention(sd, k, x, heads):          # explicit softmax(q k^T / sqrt(d)) v
    B, L, D = x.shape
    d = D // heads
    qkv = x @ sd[k + ".query_key_value.weight"].T   # [q heads | k heads | v heads]
    out = torch.zeros_like(x)
    for h in range(heads):
        q = qkv[..., h * d:(h + 1) * d]
        kk = qkv[..., D + h * d:D + (h + 1) * d]
        v = qkv[..., 2 * D + h * d:2 * D + (h + 1) * d]
        a = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., h * d:(h + 1) * d] = a @ v
    return linear(sd, k + ".dense", out)


def shuffle(x, k, h, w):                 # tokens (B, h*w, k*k*D) -> (B, (h*k)*(w*k), D)
    B, _, C = x.shape
    D = C // (k * k)
    x = x.view(B, h, w, C)
    out = torch.zeros(B, h * k, w * k, D, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            out[:, i::k, j::k, :] = x[..., (i * k + j) * D:(i * k + j + 1) * D]
    return out.reshape(B, h * k * w * k, D)


def release_forward(sd, x, n, y, heads):
    """The release's model on its own state_dict: x (B, C, H, W), n DDPM steps (B,), y (B,)."""
    t = ((n / 1000) * 8 - 4) / 4
    R = 1 + max(int(k.split(".")[1]) for k in sd)
    outputs, prev = [], None
    for r in range(R):
        s = f"stages.{r}"
        conv = sd[f"{s}.input_layer.1.weight"]
        p = conv.shape[-1]
        e = F.conv2d(x, conv, sd[f"{s}.input_layer.1.bias"], stride=p)
        B, D, h, w = e.shape
        tokens = e.flatten(2).transpose(1, 2)                              # (B, h*w, D) row-major
        table = sd[f"{s}.input_layer.3.position_embeddings.weight"]
        grid = math.isqrt(table.shape[0])
        idx = torch.tensor([a * grid + b for a in range(h) for b in range(w)])
        tokens = tokens + table[idx]
        if prev is not None:
            u = layer_norm(sd, f"{s}.upsample.0", torch.cat(prev, dim=-1), t)
            u = shuffle(linear(sd, f"{s}.upsample.1.kernel", u), 2, h // 2, w // 2)
            tokens = tokens + layer_norm(sd, f"{s}.upsample.2", u, t)
        feats = [tokens]
        nb = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{s}.blocks."))
        z = (torch.cat([sd["stages.0.class_embeds.weight"][y][:, None], tokens], 1) if r == 0
             else tokens)
        extra = 1 if r == 0 else 0
        stack = []
        for b in range(nb):
            k = f"{s}.blocks.{b}"
            if b > nb // 2:  # last in, first out: block nb - 1 - i takes the output of block i
                z = linear(sd, f"{s}.skip_denses.{b - nb // 2 - 1}",
                           torch.cat([z, stack.pop()], -1))
            if r == 0:
                z = z + attention(sd, k + ".block1",
                                  rms_norm(z, td(sd, k + ".block1.norm.scale", t)), heads)
            else:
                m = z.transpose(1, 2).reshape(B, D, h, w)
                m = F.conv2d(m, sd[k + ".block1.1.weight"], sd[k + ".block1.1.bias"], padding=3,
                             groups=D)
                z = z + m.flatten(2).transpose(1, 2)
            z = z + glu(sd, k + ".block2", rms_norm(z, td(sd, k + ".block2.norm.scale", t)))
            if b < nb // 2:
                stack.append(z)
            feats.append(z[:, extra:])
        z = layer_norm(sd, f"{s}.output_layer.0", z[:, extra:], t)
        z = z.transpose(1, 2).reshape(B, D, h, w)
        outputs.append(F.conv2d(z, sd[f"{s}.output_layer.2.weight"],
                                sd[f"{s}.output_layer.2.bias"], padding=1))
        prev = feats
    return outputs
