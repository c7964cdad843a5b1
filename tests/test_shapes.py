"""docs/shapes.md follows one forward pass of DiMR-M/3R and DiMR-XL/2R; this test builds both
models on the meta device (no memory, no arithmetic), hooks every module the table names, and
checks every shape in it, so that the page cannot go stale.

A row's code cell names where its tensor is: `PATH` in[i] (the i-th argument of the module PATH's
forward), `PATH` out (its output) or out[i]; `DiMR` is the model itself; `PATH.*` is every module
of a list, and the cell then reads `N x (shape)`. A cell of `-` says that the model has no such
module."""
import re
from pathlib import Path

import pytest
import torch

import dimr

PAGE = Path(__file__).resolve().parents[1] / "docs" / "shapes.md"
MODELS = ("DiMR-M/3R", "DiMR-XL/2R")
B = 7  # the batch of the traced pass, written B on the page
CODE = re.compile(r"`(\w+(?:\.\w+)*?)(\.\*)?` (in|out)(?:\[(\d+)\])?$")


def table():
    """[(stage, code, {model: cell})] of the page's shape table (its columns: stage, code, one per
    model)."""
    lines = [line for line in PAGE.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:] == list(MODELS), header
    rows = []
    for line in lines[2:]:
        stage, code, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((stage, code, dict(zip(MODELS, cells))))
    return rows


def shape(value):
    if isinstance(value, (list, tuple)):
        shapes = [shape(v) for v in value]
        if len(set(shapes)) == 1 and len(shapes) > 1:
            return f"{len(shapes)} x {shapes[0]}"
        return "[" + ", ".join(shapes) + "]"
    assert value.shape[0] == B
    return "(" + ", ".join(["B", *map(str, value.shape[1:])]) + (",)" if value.dim() == 1 else ")")


def trace(name, codes):
    """{code: shape} of one meta-device forward pass of the variant, for every code cell."""
    config = dimr.get_config(name)
    with torch.device("meta"):
        model = dimr.DiMR(config)
    seen, wanted = {}, {}
    for code in codes:
        path, star, kind, index = CODE.match(code).groups()
        path = "" if path == "DiMR" else path
        try:
            modules = list(model.get_submodule(path)) if star else [model.get_submodule(path)]
        except AttributeError:
            seen[code] = "-"
            continue
        wanted[code] = (modules, star, kind, None if index is None else int(index))
    captured = {}
    for code, (modules, _, kind, _) in wanted.items():
        for m in modules:
            if kind == "in":
                m.register_forward_pre_hook(
                    lambda mod, args, code=code: captured.setdefault(code, []).append(args))
            else:
                m.register_forward_hook(
                    lambda mod, args, out, code=code: captured.setdefault(code, []).append(out))
    x = torch.empty(B, config.in_channels, config.input_size, config.input_size, device="meta")
    n = torch.empty(B, device="meta")
    y = torch.zeros(B, dtype=torch.long, device="meta")
    model(x, n, y)
    for code, (modules, star, kind, index) in wanted.items():
        values = captured[code]
        assert len(values) == len(modules), code  # each module ran once
        values = [v if index is None else v[index] for v in values]
        seen[code] = shape(values if star else values[0])
    return seen


@pytest.mark.parametrize("name", MODELS)
def test_every_shape_of_the_page_is_the_models(name):
    rows = table()
    assert len(rows) >= 25
    got = trace(name, [code for _, code, _ in rows])
    for stage, code, cells in rows:
        assert cells[name] == got[code], (name, stage, code, cells[name], got[code])


def test_the_page_covers_every_branch_and_cascade():
    codes = {code for _, code, _ in table()}
    for name in MODELS:
        for r in range(dimr.get_config(name).num_branches):
            for part in ("patch_embed` out", "blocks.*` out", "head` out", "` out[1]"):
                assert any(c.startswith(f"`branches.{r}") and c.endswith(part) for c in codes), \
                    (name, r, part)
            if r:
                assert f"`branches.{r}.cascade` out" in codes
