"""tools/bench.py: the docs' command runs, its rows parse, and its FLOPs are docs/speed.md's count
(2 FLOPs per MAC of tools.count.count at batch 1, 3 forward passes per training image, 4 with
gradient checkpointing), recomputed here; MFU is TFLOP/s over the given peak."""
import math

import pytest

from tools import bench
from tools.count import count
import dimr
import sample

pytestmark = pytest.mark.usefixtures("single_thread")
TINY_ARCH = ("widths=32,16", "depths=3,2")


def rows(output):
    """The markdown table's data rows as dicts keyed by the header."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1] == "|" + "---|" * len(header)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in cells]


def run(capsys, *argv):
    bench.main(["--threads", "1", *argv])
    return rows(capsys.readouterr().out)


def expected_gflop_per_image(cfg, forwards):
    macs = sum(macs for _, _, macs in count(cfg))
    return 2 * macs * forwards / 1e9


def check_row(row, gflop, peak=None):
    assert float(row["GFLOP/img"]) == pytest.approx(gflop, rel=1e-5)  # printed to 6 digits
    images_per_s, tflops = float(row["train img/s"]), float(row["TFLOP/s"])
    assert images_per_s > 0
    assert tflops == pytest.approx(gflop * images_per_s / 1e3, rel=2e-3)  # 4 digits each
    assert float(row["peak memory"].removesuffix(" GiB")) > 0
    if peak is not None:
        mfu = 100 * tflops / peak  # printed to 0.1, from TFLOP/s before its rounding to 4 digits
        assert float(row["MFU"].removesuffix("%")) == pytest.approx(mfu, abs=0.05 + 1e-3 * mfu)


def test_the_readme_command_for_the_demo_variant(capsys):
    """`python -m tools.bench --variant s`: one row, 3 forward passes per training image,
    sampling."""
    (row,) = run(capsys, "--variant", "s")
    assert row["variant"] == "DiMR-S/2R" and row["precision"] == "fp32"
    assert row["micro-batch"] == "32" and row["grad. ckpt"] == "off" and row["MFU"] == "-"
    check_row(row, expected_gflop_per_image(dimr.get_config("s"), forwards=3))
    rate, evals = row["sample img/s"].split(" (")
    assert float(rate) > 0 and evals == f"{sample.DEFAULT_STEPS} evals)"  # the default sampler


def test_several_configurations_with_gradient_checkpointing(capsys):
    """--batch x --precision gives one row each; checkpointing counts 4 forward passes."""
    table = run(capsys, "--variant", "s", "--arch", *TINY_ARCH, "--batch", "2", "3",
                "--precision", "fp32", "bf16", "--grad-checkpointing", "--steps", "2",
                "--warmup", "1", "--sample-steps", "3", "--peak-tflops", "0.002")
    assert [(r["precision"], r["micro-batch"]) for r in table] == [
        ("fp32", "2"), ("fp32", "3"), ("bf16", "2"), ("bf16", "3")]
    tiny = dimr.get_config("s", widths=(32, 16), depths=(3, 2))
    for row in table:
        assert row["variant"] == "DiMR-S/2R " + " ".join(TINY_ARCH) and row["grad. ckpt"] == "on"
        check_row(row, expected_gflop_per_image(tiny, forwards=4), peak=0.002)
        assert math.isfinite(float(row["sample img/s"].split(" (")[0]))


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--peak-tflops", "-1"], "argument --peak-tflops: must be a finite number > 0, got -1"),
    (["--arch", "widths=a"], "--arch widths=a: widths must be integers a,b,..."),
])
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert str(e.value) == f"error: {message}"
