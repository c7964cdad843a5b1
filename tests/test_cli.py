"""support/cli.py: a dataclass field's declared constraints (range, choices, multiple of another
field, flag name) are what the flags and check_fields enforce, each problem named in one line."""
import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.cli import Parser, add_dataclass_flags, check_fields, opt

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Options:
    every: int = opt(10, "steps per tick", low=1)
    save_every: int = opt(20, "steps per save", low=1, multiple_of="every")
    mode: str = opt("a", "a mode", choices=("a", "b"), flag="--old-name")


@pytest.mark.parametrize("fields, message", [
    (dict(every=0), "--every must be an integer >= 1, got 0"),
    (dict(save_every=25), "--save-every 25 must be a multiple of --every 10"),
    (dict(mode="c"), "--old-name must be one of a, b, not c"),
    (dict(every=3, mode="c"), "--save-every 20 must be a multiple of --every 3; "
                              "--old-name must be one of a, b, not c"),
])
def test_each_declared_constraint_is_checked(fields, message):
    check_fields(Options())
    with pytest.raises(ValueError) as error:
        check_fields(Options(**fields))
    assert str(error.value) == message


def test_flags_carry_the_declared_name_and_choices():
    """As train.py parses: only the flags given come back, under the field's name."""
    parser = Parser(argument_default=argparse.SUPPRESS)
    add_dataclass_flags(parser, Options)
    args = parser.parse_args(["--old-name", "b", "--save-every", "30"])
    assert vars(args) == {"mode": "b", "save_every": 30}
    with pytest.raises(SystemExit, match="argument --old-name: invalid choice: 'c'"):
        parser.parse_args(["--old-name", "c"])


@pytest.mark.parametrize("flags, message", [
    (["--ckpt-every", "30", "--log-every", "20"],
     "error: --ckpt-every 30 must be a multiple of --log-every 20"),
    (["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
])
def test_train_py_says_which_flags_disagree(flags, message):
    run = subprocess.run([sys.executable, "train.py", *flags, "--steps", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message), \
        run.stderr[-500:]
