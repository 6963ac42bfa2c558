"""What the subcommands' parsers share: one-line errors, value types, repeated flags."""

from __future__ import annotations

import argparse

CKPT = "run folder, .safetensors file or shipped model name"  # a checkpoint argument's help


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (no usage dump) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"minidiff: error: {message} (see `{self.prog} --help`)\n")


def command(sub, name: str, help: str, handler, *examples: str) -> Parser:
    """Subcommand ``name``'s parser, run by ``handler(args)``, its help ending in ``examples``."""
    head = "example:" if len(examples) == 1 else "examples:"
    p = sub.add_parser(name, help=help, epilog="\n  ".join((head, *examples)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def _checked(convert, ok, expected: str, need: str):
    """An argparse type: ``convert`` the text (else "expected ..."), then check ``ok(value)``."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            shown = v if isinstance(v, int) else s
            raise argparse.ArgumentTypeError(f"must be {need}, got {shown}")
        return v
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer", "> 0")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer", ">= 0")
positive_float = _checked(float, lambda v: v > 0, "a number", "> 0")
fraction = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)", "in (0, 1)")


def channels(s: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,32,64, "
                                         f"got {s!r}") from None
    if any(c <= 0 for c in ch):
        raise argparse.ArgumentTypeError(f"channels must be positive, got {s!r}")
    return ch


def data_dir(p, whose: str = "the dataset's") -> None:
    p.add_argument("--data-dir", help=f"folder holding {whose} IDX files")


def flag(p, name: str, help: str) -> None:
    p.add_argument(name, action="store_true", help=help)
