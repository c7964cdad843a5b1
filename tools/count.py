"""Parameters and multiply-accumulates of DiMR, per branch, counted without allocating weights.

    python -m tools.count xl          # DiMR-XL/2R: 505,046,408 parameters, 160.18 GMACs
    python -m tools.count --table5    # the Table 5 ablations' parameters beside the paper's

The model is built on the meta device and its MACs at batch 1 are torch's FLOP counter's count
halved: the paper's "GFLOPs" are multiply-accumulates.
"""
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

import dimr
from support import distributed
from support.cli import Parser

# Table 5 (ImageNet 64, 300K steps): U-ViT-M/4 -> DiMR-M/3R, with the paper's parameter counts.
# Single-branch rows are the Transformer branch alone, with patch size 4 (16x16 tokens).
TABLE5 = [
    ("U-ViT-M/4 baseline", dict(depths=(17,), widths=(768,), norm="ln", mlp="gelu"), 130.9),
    ("+ adaLN-Zero", dict(depths=(17,), widths=(768,), norm="adaln_zero", mlp="gelu"), 202.4),
    ("adaLN-Zero + multi-branch", dict(norm="adaln_zero", mlp="gelu"), 217.9),
    ("TD-LN + multi-branch", dict(mlp="gelu"), 154.0),
    ("+ GLU (= DiMR-M/3R)", dict(), 132.9),
]


def count(config):
    """[(label, parameters, MACs at batch 1)] per branch, then the embeddings."""
    with torch.device("meta"):
        model = dimr.DiMR(config)
        x = torch.zeros(1, config.in_channels, config.input_size, config.input_size)
        n, y = torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, n, y)
    flops = counter.get_flop_counts()
    rows = []
    for r, b in enumerate(model.branches):
        kind = "Transformer" if r == 0 else "ConvNeXt"
        name = f"branch {r + 1} ({kind}, {config.widths[r]}-d, {len(b.blocks)} blocks, " \
               f"{config.input_size // config.patch_sizes[r]}^2)"
        macs = sum(flops.get(f"DiMR.branches.{r}", {}).values()) // 2
        rows.append((name, sum(p.numel() for p in b.parameters()), macs))
    rest = sum(p.numel() for p in model.parameters()) - sum(r[1] for r in rows)
    rows.append(("embeddings (class, time)", rest, 0))
    return rows


def print_summary(name, config):
    rows = count(config)
    print(f"{name}: input {config.input_size}x{config.input_size}x{config.in_channels}, "
          f"norm={config.norm}, mlp={config.mlp}")
    for label, params, macs in rows:
        print(f"  {label:<58} {params:>15,} params {macs / 1e9:9.2f} GMACs")
    print(f"  {'total':<58} {sum(r[1] for r in rows):>15,} params "
          f"{sum(r[2] for r in rows) / 1e9:9.2f} GMACs")


def table5_config(base, overrides):
    """A Table 5 row's config on `base`: one branch means the Transformer branch alone."""
    if len(overrides.get("depths", base.depths)) == 1:
        overrides = dict(overrides, patch_size=base.patch_size, widths=overrides.get(
            "widths", base.widths[:1]))
    return dataclasses.replace(base, **overrides)


def run(args):
    if args.table5:
        base = dimr.VARIANTS["DiMR-M/3R"]
        for label, overrides, paper in TABLE5:
            params = sum(r[1] for r in count(table5_config(base, overrides)))
            print(f"{label:<28} {params / 1e6:7.1f}M params (paper: {paper}M)")
    else:
        print_summary(dimr.ALIASES.get(args.variant, args.variant), dimr.get_config(args.variant))


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", nargs="?", choices=dimr.VARIANT_CHOICES, default="xl",
                   metavar="VARIANT", help=f"{', '.join(dimr.ALIASES)} or the full name "
                                           "(default xl)")
    p.add_argument("--table5", action="store_true",
                   help="parameter counts of the Table 5 ablations")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
