"""Command-line plumbing shared by the entry points, so that they can read like the method.

- `Parser`: argparse whose errors are one line,
  `error: argument --steps: must be an integer >= 1, got 0`,
  with exit status 1, like every other bad input (distributed.run_main).
- `number`: an argparse `type` that accepts finite numbers in a range, so that a flag is checked
  as it is parsed, before any work starts.
- `add_dataclass_flags` / `check_fields`: flags made from the fields of a dataclass (train.py's
  TrainConfig), each field with its default, one line of help and, where it has them, its
  constraints (a range, the allowed values, a field it must be a multiple of) and its flag.
- `add_threads_flag`: --threads, the same in every entry point.
- `parse_overrides`: `--arch KEY=VALUE` items as typed overrides of a DiMRConfig.
"""
import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import field


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message}")


def describe(low, high, kind, above=None):
    lo = f"> {above}" if above is not None else "" if low is None else f">= {low}"
    hi = "" if high is None else f"< {high}"
    bounds = " and ".join(filter(None, [lo, hi]))
    return ("an integer " if kind is int else "a finite number ") + bounds


def number(kind=float, low=None, high=None, above=None):
    """argparse type: a finite int or float with low <= value < high, or above < value (each
    bound optional)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or out_of_range(value, low, high) or (above is not None
                                                               and value <= above):
            raise argparse.ArgumentTypeError(f"must be {describe(low, high, kind, above)}, "
                                             f"got {text}")
        return value
    return parse


THREADS_HELP = ("CPU threads per process (default torch's: OMP_NUM_THREADS, as torchrun sets "
                "it, else the cores)")


def add_threads_flag(parser):
    """--threads, the one rule of every entry point (distributed.set_threads)."""
    parser.add_argument("--threads", type=number(int, 1), default=None, help=THREADS_HELP)


def out_of_range(value, low, high):
    return (not math.isfinite(value) or (low is not None and value < low)
            or (high is not None and value >= high))


def opt(default, help, *, low=None, high=None, choices=None, multiple_of=None, flag=None):
    """A dataclass field with its help, its constraints (the range low <= value < high, each bound
    optional; the allowed values; another field whose value this one must be a multiple of) and
    its flag (default --field-name), for add_dataclass_flags and check_fields."""
    return field(default=default, metadata={"help": help, "low": low, "high": high,
                                            "choices": choices, "multiple_of": multiple_of,
                                            "flag": flag})


def flag(name, cls=None):
    """--name-with-dashes, or the flag that field `name` of the dataclass `cls` declares."""
    declared = cls and {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("flag")
    return declared or "--" + name.replace("_", "-")


def check_fields(obj):
    """Every field of a dataclass made with `opt` within its constraints (a range applies to
    each entry of a tuple): one ValueError naming every problem."""
    problems, cls = [], type(obj)
    for f in dataclasses.fields(obj):
        low, high = f.metadata.get("low"), f.metadata.get("high")
        choices, unit = f.metadata.get("choices"), f.metadata.get("multiple_of")
        value = getattr(obj, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if (low is not None or high is not None) and value is not None and any(
                out_of_range(v, low, high) for v in values):
            kind = int if all(isinstance(v, int) for v in values) else float
            problems.append(f"{flag(f.name, cls)} must be {describe(low, high, kind)}, "
                            f"got {value}")
        if choices and value not in choices:
            problems.append(f"{flag(f.name, cls)} must be one of {', '.join(choices)}, "
                            f"not {value}")
        if unit and getattr(obj, unit) and value % getattr(obj, unit):
            problems.append(f"{flag(f.name, cls)} {value} must be a multiple of "
                            f"{flag(unit, cls)} {getattr(obj, unit)}")
    if problems:
        raise ValueError("; ".join(problems))


def flag_kwargs(f):
    """argparse keyword arguments for a dataclass field, from its type annotation."""
    kind = f.type
    if isinstance(kind, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if f.metadata.get("choices"):
        return dict(type=kind, choices=f.metadata["choices"])
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return dict(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args), metavar="X")
    return dict(type=kind, metavar="X")


def add_dataclass_flags(parser, cls, shown=None, **extra):
    """One flag per field of `cls` (flag()), help '... (default D; demo E)' where `shown`, a
    second instance, differs. extra: argparse keywords for some fields, by field name."""
    for f in dataclasses.fields(cls):
        kwargs = {**flag_kwargs(f), **extra.get(f.name, {})}
        text, other = f.metadata["help"], getattr(shown, f.name, f.default)
        if not (f.default is None and "default" in text):  # else the help says what None means
            text += f" (default {f.default}" + ("" if other == f.default else f"; demo {other}")
            text += ")"
        parser.add_argument(flag(f.name, cls), dest=f.name, help=text, **kwargs)


def parse_overrides(items, cls, keys):
    """KEY=VALUE items -> {key: value} typed as the fields of `cls` (tuples from 'a,b,c')."""
    types_ = {f.name: f.type for f in dataclasses.fields(cls)}
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--arch {item}: expected KEY=VALUE with KEY one of {', '.join(keys)}")
        try:
            overrides[key] = (tuple(int(v) for v in value.split(",")) if types_[key] is tuple
                              else types_[key](value))
        except ValueError:
            kind = "integers a,b,..." if types_[key] is tuple else types_[key].__name__
            raise ValueError(f"--arch {item}: {key} must be {kind}") from None
    return overrides
