"""The DiMR network: the authors' parameter counts and MACs, shapes, errors, gradients (gradcheck
per component and of the whole network), the pixel-shuffle layout, safe checkpoint loading, and
equality with an independent statement of the release's forward pass on release-format weights
(tests/release_reference.py) on mixed-time batches."""
import ast
import copy
import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

from support import checkpoints, depthwise
from tools import convert
from tools.count import count
import dimr
import td_ln
from release_reference import release_forward, release_state_dict
from util import gradcheck_module

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.usefixtures("single_thread")
TINY_2R = dimr.get_config("s", widths=(32, 16), depths=(3, 2), num_heads=4)
TINY_3R = dimr.DiMRConfig(16, 3, 7, 4, (3, 2, 2), (32, 16, 8), 4)
MICRO = dimr.DiMRConfig(8, 2, 3, 2, (3, 2), (8, 4), 2)              # small enough for gradcheck


def meta_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in dimr.DiMR(cfg).parameters())


def randomise(model, seed=0):
    """Random weights everywhere (the TD parameters too, so time matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def inputs(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    n = torch.tensor([1.0, 250.0, 999.0, 600.5, 37.0, 1000.0][:B])
    y = torch.tensor([0, cfg.num_classes, 3, 1, 2, 5][:B])        # includes the null class
    return x, n, y


@pytest.mark.parametrize("name, params", [
    ("DiMR-XL/2R", 505_046_408),      # the release checkpoint's tensor sizes, summed
    ("DiMR-G/2R", 1_056_352_904),
    ("DiMR-XL/3R", 525_027_372),
    ("DiMR-M/3R", 132_828_681),
])
def test_parameter_counts_exact(name, params):
    assert meta_params(dimr.get_config(name)) == params


def test_parameter_count_equals_release_file():
    total = 0
    for line in (DATA / "official_xl_2r_state_dict.txt").read_text().splitlines():
        shape = ast.literal_eval(line.split(" ", 1)[1])
        total += torch.Size(shape).numel()
    assert total == meta_params(dimr.get_config("xl"))


@pytest.mark.parametrize("name, gmacs", [("xl", 160), ("g", 331), ("xl_3r", 206), ("m", 53.5)])
def test_macs_match_paper(name, gmacs):
    macs = sum(row[2] for row in count(dimr.get_config(name)))
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01


def test_release_key_names_map_onto_ours():
    """Every key of the authors' XL/2R checkpoint maps to one of ours with the same shape."""
    theirs = {}
    for line in (DATA / "official_xl_2r_state_dict.txt").read_text().splitlines():
        k, shape = line.split(" ", 1)
        theirs[checkpoints.official_key(k)] = tuple(ast.literal_eval(shape))
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in dimr.DiMR(dimr.get_config("xl")).state_dict().items()}
    assert theirs == ours
    meta_sd = {line.split(" ", 1)[0]: torch.empty(ast.literal_eval(line.split(" ", 1)[1]),
                                                  device="meta")
               for line in (DATA / "official_xl_2r_state_dict.txt").read_text().splitlines()}
    assert checkpoints.config_from_official(meta_sd, 16) == dimr.get_config("xl")


def test_reference_generator_matches_release_file():
    """The random release-format state_dicts the tests use have the release's exact names."""
    sd = release_state_dict(4, 1000, 2, 16, (39, 21), (960, 480), device="meta")
    listed = {l.split(" ", 1)[0]: tuple(ast.literal_eval(l.split(" ", 1)[1]))
              for l in (DATA / "official_xl_2r_state_dict.txt").read_text().splitlines()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == listed


@pytest.mark.parametrize("cfg", [TINY_2R, TINY_3R], ids=["2R", "3R"])
def test_output_shapes(cfg):
    x, n, y = inputs(cfg)
    outs = dimr.DiMR(cfg)(x, n, y)
    sizes = [cfg.input_size // (cfg.patch_size // 2 ** r) for r in range(cfg.num_branches)]
    assert [tuple(o.shape) for o in outs] == [(4, cfg.in_channels, s, s) for s in sizes]
    assert sizes[-1] == cfg.input_size


@pytest.mark.parametrize("blocks", [(5, 7), (7, 5, 7)], ids=["2R", "3R"])
def test_from_official_equals_release_forward(blocks):
    """from_official + our forward == the release's forward (tests/release_reference.py), same
    random weights, TD parameters included (p0 != p1, w and b non-zero). 5 to 7 blocks per branch
    give 2 or 3 long skips, so the order in which they are popped matters. The batch mixes times,
    and rows 0 and 1 differ only in n. float64: differences are rounding, 1e-10; float32 to 1e-4
    relative."""
    R = len(blocks)
    widths = (32, 16, 8)[:R]
    g = torch.Generator().manual_seed(1)
    sd = release_state_dict(3, 5, 2 ** (R - 1), 4, blocks, widths, dtype=torch.float32, generator=g)
    model = checkpoints.from_official(sd, num_heads=4).double()
    sd = {k: v.double() for k, v in sd.items()}
    assert model.config.widths == widths and model.config.input_size == 4 * 2 ** (R - 1)
    assert [len(b.skips) for b in model.branches] == [n // 2 for n in blocks]
    x = torch.randn(4, 3, model.config.input_size, model.config.input_size, dtype=torch.float64,
                    generator=g)
    x[1] = x[0]
    n = torch.tensor([1.0, 500.0, 873.0, 1000.0], dtype=torch.float64)
    y = torch.tensor([2, 2, 5, 4])                                     # 5 = null class
    ours, ref = model(x, n, y), release_forward(sd, x, n, y, heads=4)
    assert len(ours) == R
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-10 * (1 + b.abs().max())
        assert (b[0] - b[1]).abs().max() > 0.1                         # time changes the output
    ours32 = model.float()(x.float(), n.float(), y)
    for a, b in zip(ours32, ref):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-4


def test_from_official_errors():
    sd = release_state_dict(3, 5, 2, 4, (3, 3), (32, 16),
                            generator=torch.Generator().manual_seed(0))
    extra = dict(sd, **{"stages.0.bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys"):
        checkpoints.from_official(extra, 4)
    missing = {k: v for k, v in sd.items() if "skip_denses.0.bias" not in k}
    with pytest.raises(ValueError, match="missing keys"):
        checkpoints.from_official(missing, 4)
    bad = dict(sd, **{"stages.1.blocks.0.block2.w0.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape mismatch"):
        checkpoints.from_official(bad, 4)
    with pytest.raises(ValueError, match="not a DiMR release"):
        checkpoints.from_official({"foo": torch.zeros(2)}, 4)


def test_convert_command_roundtrip(tmp_path):
    sd = release_state_dict(3, 5, 2, 4, (3, 3), (32, 16), dtype=torch.float32,
                            generator=torch.Generator().manual_seed(2))
    torch.save(sd, tmp_path / "release.pth")
    convert.main([str(tmp_path / "release.pth"), str(tmp_path / "ours.pt"), "--heads", "4"])
    model, _ = checkpoints.load_model(tmp_path / "ours.pt")
    x, n, y = inputs(model.config)
    ref = release_forward({k: v.double() for k, v in sd.items()}, x.double(), n.double(), y,
                          heads=4)
    for a, b in zip(model(x, n, y), ref):
        assert (a.double() - b).abs().max() / b.abs().max() < 1e-4
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        convert.main([str(tmp_path / "bad.pth"), str(tmp_path / "x.pt"), "--heads", "4"])
    with pytest.raises(SystemExit, match="error: checkpoint not found"):
        convert.main([str(tmp_path / "none.pth"), str(tmp_path / "x.pt"), "--heads", "4"])
    with pytest.raises(ValueError,
                       match=r"136 keys, e\.g\. stages\.0\..*looks like the authors' release"):
        checkpoints.load_model(tmp_path / "release.pth")
    with pytest.raises(SystemExit, match="error: cannot write /proc/ours.pt: "):
        convert.main([str(tmp_path / "release.pth"), "/proc/ours.pt", "--heads", "4"])


def test_bad_configs_raise_clear_errors():
    """The registry and the config check every size; the forward pass trusts its callers (the
    entry points check what users give: sample.generate the class ids, the loaders the data)."""
    model = dimr.DiMR(TINY_2R)
    x, _, y = inputs(TINY_2R)
    outs = model(x, torch.tensor([0.0, 1000.0, 0.0, 1000.0]), y)         # the ends are valid steps
    assert [tuple(o.shape) for o in outs] == [(4, 1, 4, 4), (4, 1, 8, 8)]
    with pytest.raises(ValueError, match="unknown variant 'XXL'"):
        dimr.get_config("XXL")
    with pytest.raises(ValueError, match="patch_size must be"):
        dimr.get_config("s", patch_size=4)
    with pytest.raises(ValueError, match="norm must be one of"):
        dimr.get_config("s", norm="batchnorm")
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        dimr.get_config("s", num_heads=0)
    with pytest.raises(ValueError, match=r"depths must all be >= 1, got \(0, 0\)"):
        dimr.get_config("s", depths=(0, 0))
    with pytest.raises(ValueError, match="widths must all be >= 1"):
        dimr.get_config("s", widths=(0, 0))


def test_every_parameter_gets_a_gradient():
    model = randomise(dimr.DiMR(TINY_3R))
    x, n, y = inputs(TINY_3R)
    sum(o.sum() for o in model(x, n, y)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []
    # only the class rows that no sample in the batch uses stay untouched
    used = model.class_embed.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [i in y.tolist() for i in range(TINY_3R.num_classes + 1)]


def f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


# Per component: the output shape, and gradcheck in float64 with respect to the inputs (features
# and t~) and every parameter, with all parameters random so the TD parameters vary in time.
B, H, W, D = 2, 3, 4, 8


def test_glu_shape_and_gradients():
    glu = randomise(dimr.GLU(D)).double()
    x = f64(B, 5, D)
    assert glu(x).shape == (B, 5, D) and glu.w0.out_features == 2 * D       # hidden width 2D
    assert gradcheck_module(glu, x)


@pytest.mark.parametrize("Block, shape", [(dimr.TransformerBlock, (B, 5, D)),
                                          (dimr.ConvNeXtBlock, (B, H, W, D))],
                         ids=["transformer", "convnext"])
def test_block_shape_and_gradients(Block, shape):
    block = randomise(Block(MICRO, D)).double()
    x, t_tilde = f64(*shape), f64(B, seed=1)
    assert block(x, t_tilde).shape == shape
    assert gradcheck_module(block, x, t_tilde)


def test_the_cpu_depthwise_kernel_equals_torchs_convolution():
    """support/depthwise.py: a ConvNeXt block with the opt-in CPU backward and channels-last
    kernels gives torch's own outputs and gradients (float32 rounding), passes gradcheck in
    float64, and keeps its parameter names."""
    plain = randomise(dimr.ConvNeXtBlock(TINY_2R, 16))
    fast = depthwise.use_fast_depthwise_backward(depthwise.channels_last_kernels(
        copy.deepcopy(plain)))
    assert list(dict(fast.named_parameters())) == list(dict(plain.named_parameters()))
    assert fast.dwconv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 6, 5, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t_tilde = torch.tensor([0.3, -0.5, 0.9])
    outs, grads = [], []
    for block in (plain, fast):
        out = block(x, t_tilde)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(),
                                         [x, *block.dwconv.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    double = depthwise.use_fast_depthwise_backward(randomise(dimr.ConvNeXtBlock(MICRO, D)))
    assert gradcheck_module(double.double(), f64(B, H, W, D), f64(B, seed=1))


def test_cascade_shape_and_gradients():
    """3 feature maps of width 4 at 3x4 -> one map of width 6 at 6x8 (ratio 2)."""
    cascade = randomise(dimr.Cascade(MICRO, 3 * 4, 6, 2)).double()
    maps, t_tilde = [f64(B, H, W, 4, seed=k) for k in range(3)], f64(B, seed=3)
    assert cascade(maps, t_tilde).shape == (B, 2 * H, 2 * W, 6)
    assert gradcheck_module(cascade, *maps, t_tilde, pack=lambda *a: (list(a[:-1]), a[-1]))


@pytest.mark.parametrize("patch", [1, 2])
def test_head_shape_and_gradients(patch):
    head = randomise(dimr.Head(MICRO, D, patch)).double()
    x, t_tilde = f64(B, H, W, D), f64(B, seed=1)
    assert head(x, t_tilde).shape == (B, MICRO.in_channels, H * patch, W * patch)
    assert gradcheck_module(head, x, t_tilde)


def test_dimr_shapes_and_gradients():
    """The whole network, x and the DDPM step n as inputs (y, an index, has no gradient)."""
    cfg = MICRO
    model = randomise(dimr.DiMR(cfg)).double()
    x = f64(B, cfg.in_channels, cfg.input_size, cfg.input_size)
    n = torch.tensor([130.0, 870.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, cfg.num_classes])
    sizes = [cfg.input_size // p for p in cfg.patch_sizes]
    assert [tuple(o.shape) for o in model(x, n, y)] == [(B, cfg.in_channels, s, s) for s in sizes]
    assert gradcheck_module(model, x, n, pack=lambda x, n: (x, n, y))


def test_gradient_checkpointing_gives_identical_gradients():
    model = randomise(dimr.DiMR(TINY_2R))
    x, n, y = inputs(TINY_2R)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        sum(o.square().mean() for o in model(x, n, y)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_pixel_shuffle_layout_against_index_loop():
    B, h, w, k, D = 2, 3, 4, 2, 5
    x = torch.randn(B, h, w, k * k * D)
    out = dimr.pixel_shuffle(x, k)
    for hh in range(h):
        for ww in range(w):
            for i in range(k):
                for j in range(k):
                    for c in range(D):
                        assert out[:, hh * k + i, ww * k + j, c].equal(
                            x[:, hh, ww, (i * k + j) * D + c])


def test_position_embedding_index():
    """Token (h, w) gets row h * max_w + w of the table (also for inputs smaller than the max)."""
    cfg = TINY_2R
    model = dimr.DiMR(cfg)
    branch = model.branches[1]
    with torch.no_grad():
        branch.patch_embed.weight.zero_()
        branch.patch_embed.bias.zero_()
    seen = {}
    branch.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    branch(torch.zeros(1, 1, 4, 4), td_ln.t_tilde(torch.ones(1)), None, None)  # half the max grid
    grid = cfg.input_size
    for a in range(4):
        for b in range(4):
            assert torch.equal(seen["x"][0, a, b], branch.pos_embed[a * grid + b])


def test_adaln_zero_blocks_start_as_identity():
    cfg = dataclasses.replace(TINY_2R, norm="adaln_zero")
    model = dimr.DiMR(cfg)
    x, n, y = inputs(cfg)
    c, _ = model.condition(n, y)
    tokens = torch.randn(4, 5, 32)
    assert torch.equal(model.branches[0].blocks[0](tokens, c), tokens)


def test_ln_ablation_prepends_a_time_token_and_a_class_token():
    """U-ViT (Table 5's LN baseline): the Transformer branch sees [time token, class token,
    patches], the time token the sinusoidal embedding of n (cos, then sin, of
    n * 10000^(-i / (D / 2)))."""
    cfg = dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2, norm="ln")
    model = dimr.DiMR(cfg).eval()
    x, n, y = torch.randn(2, 1, 8, 8), torch.tensor([7.0, 800.0]), torch.tensor([3, 10])
    seen = []
    model.branches[0].blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(x, n, y)
    tokens = seen[0]                                                     # (B, 2 + 16, D)
    half = cfg.widths[0] // 2
    angles = n[:, None] * torch.tensor([10000.0 ** (-i / half) for i in range(half)])
    torch.testing.assert_close(tokens[:, 0], torch.cat([angles.cos(), angles.sin()], -1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1], model.class_embed.weight[y])
    assert tokens.shape[1] == 2 + (8 // cfg.patch_size) ** 2


@pytest.mark.parametrize("norm, mlp, depths, widths", [
    ("ln", "gelu", (3,), (32,)), ("adaln_zero", "gelu", (3, 2), (32, 16)),
    ("td", "gelu", (3, 2), (32, 16)),
])
def test_table5_ablations_run(norm, mlp, depths, widths):
    patch = 2 if len(depths) > 1 else 4
    cfg = dimr.get_config("s", norm=norm, mlp=mlp, depths=depths, widths=widths, patch_size=patch)
    model = randomise(dimr.DiMR(cfg))
    x, n, y = inputs(cfg)
    outs = model(x, n, y)
    assert outs[-1].shape == x.shape  # the single-branch model un-patchifies to full resolution
    # GELU MLP has 8 D^2 weights per block against GLU's 6 D^2
    glu = meta_params(dataclasses.replace(cfg, mlp="glu"))
    blocks = [2 * (n // 2) + 1 for n in depths]
    assert meta_params(cfg) - glu == sum(b * 2 * w * w for b, w in zip(blocks, widths))


class Payload:
    """A class instance: torch.load(weights_only=True) refuses it, as it refuses any code."""


class MakesDirectory:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):                                 # unpickling would call os.mkdir(path)
        return os.mkdir, (str(self.path),)


def test_checkpoint_save_is_atomic_and_load_is_safe(tmp_path):
    path = tmp_path / "c.pt"
    checkpoints.save({"a": torch.ones(2)}, path)
    assert torch.equal(checkpoints.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    good = path.read_bytes()

    def error(data):
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            checkpoints.load(path)
        message = str(e.value)
        assert message.startswith(f"cannot read checkpoint {path}: ") and "\n" not in message
        assert "weights_only" not in message and "False" not in message  # no unsafe advice
        return message

    not_a_checkpoint = "not a PyTorch checkpoint, or a truncated or corrupted one"
    noise = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    assert not_a_checkpoint in error(bytes(noise.tolist()))
    assert not_a_checkpoint in error(good[:len(good) // 2])
    checkpoints.save({"a": Payload()}, path)
    assert re.search(r"carries pickled Python code \(\S*Payload\)", error(path.read_bytes()))
    checkpoints.save({"model": MakesDirectory(tmp_path / "ran")}, path)
    assert f"carries pickled Python code ({os.mkdir.__module__}.mkdir)" in error(path.read_bytes())
    assert not (tmp_path / "ran").exists()
