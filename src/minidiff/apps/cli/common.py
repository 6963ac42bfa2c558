"""How subcommands are declared (click-style decorators over argparse), flags generated from a
config's fields, one-line errors, checked value types, and the flags several subcommands share."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ...errors import MinidiffError
from ...settings import DATASET_NAMES

COMMANDS: dict = {}  # "name" (or "name sub" for a sub-subcommand) -> handler, set by @command

# flags that several subcommands take with one meaning: `@shared("--dataset", ...)`
SHARED = {
    "checkpoint": dict(help="run folder, .safetensors file or shipped model name"),
    "--dataset": dict(choices=DATASET_NAMES, default="mnist"),
    "--data-dir": dict(help="folder holding the dataset's IDX files"),
    "--json": dict(action="store_true", help="print JSON"),
    "--no-progress": dict(action="store_true", help="no progress bar"),
    "--force": dict(action="store_true", help="replace outputs that already exist"),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (no usage dump) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"minidiff: error: {message} (see `{self.prog} --help`)\n")


def command(name: str, help: str, *examples: str):
    """Decorator: the function below, ``handler(args)``, runs subcommand ``name`` (exit status
    0, or what it returns); its ``--help`` ends in ``examples``."""
    def register(handler):
        handler.help, handler.examples = help, examples
        COMMANDS[name] = handler
        return handler
    return register


def group(name: str, help: str, *examples: str) -> None:
    """Subcommand ``name`` that only holds sub-subcommands (``"name sub"``); alone, it names
    them."""
    def choose(args):
        subs = " or ".join(f"`minidiff {c}`" for c in COMMANDS if c.startswith(name + " "))
        raise MinidiffError(f"choose a {name} command: {subs}")
    command(name, help, *examples)(choose)


def arg(*names: str, exclusive: str | None = None, section: str | None = None, **kw):
    """Decorator under :func:`command`, one per flag as in click: the subcommand takes
    ``add_argument(*names, **kw)``; flags with the same ``exclusive`` key exclude each other,
    and ``--help`` lists those of one ``section`` under that title."""
    def add(handler):
        handler.args = [(names, exclusive, section, kw), *getattr(handler, "args", [])]  # bottom-up
        return handler
    return add


def shared(*names: str):
    """Decorator: the subcommand takes these :data:`SHARED` flags."""
    def add(handler):
        for name in reversed(names):
            handler = arg(name, **SHARED[name])(handler)
        return handler
    return add


def options(config, *names: str, **kw):
    """Decorator: the subcommand takes ``--name`` for each of these fields of the dataclass
    ``config``, with the help, choices and type the field declares (:func:`settings.option`)
    and its default shown. The flag's own default is None, so that :func:`given` holds only what
    the user typed; ``kw`` go to every flag (``exclusive=...``)."""
    def add(handler):
        by_name = {f.name: f for f in fields(config)}
        for f in (by_name[name] for name in reversed(names)):
            meta = {"help": "", **f.metadata}
            kind = meta.pop("type", f.type.split(" | ")[0])  # "int | None" -> "int"
            if f.default is not None:
                shown = f"default {f.default}"
                meta["help"] = f"{meta['help']} ({shown})" if meta["help"] else shown
            if kind == "bool":  # a switch: typed -> True, else None (the field's default)
                handler = arg("--" + f.name.replace("_", "-"), action="store_const", const=True,
                              **meta, **kw)(handler)
                continue
            handler = arg("--" + f.name.replace("_", "-"), type=TYPES[kind], **meta, **kw)(handler)
        return handler
    return add


def given(args, config) -> dict:
    """The values of ``config``'s fields that the command line gave (None: not given)."""
    return {f.name: getattr(args, f.name) for f in fields(config)
            if getattr(args, f.name, None) is not None}


def add_command(sub, name: str, handler) -> Parser:
    """Subcommand ``name``'s parser from its :func:`command` and :func:`arg` s, with the
    sub-subcommands ``"name sub"`` that :data:`COMMANDS` holds."""
    ex = handler.examples
    epilog = "\n  ".join(("example:" if len(ex) == 1 else "examples:", *ex)) if ex else None
    p = sub.add_parser(name.split()[-1], help=handler.help, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    groups = {}  # exclusive key or section title -> its argparse group
    for names, exclusive, section, kw in getattr(handler, "args", []):
        if exclusive and exclusive not in groups:
            groups[exclusive] = p.add_mutually_exclusive_group()
        if section and section not in groups:
            groups[section] = p.add_argument_group(section)
        groups.get(exclusive or section, p).add_argument(*names, **kw)
    children = [c for c in COMMANDS if c.startswith(name + " ")]
    if children:
        nested = p.add_subparsers(parser_class=Parser)
        for child in children:
            add_command(nested, child, COMMANDS[child])
    return p


def refuse_existing(args, **outputs) -> None:
    """Unless ``args.force``: refuse, before any work, to replace an output file that exists.
    ``outputs`` maps the flag that named each path (``out="s.npz"``) to it (None: not given)."""
    for flag, path in outputs.items():
        if path is not None and not args.force and Path(path).exists():
            raise MinidiffError(f"{path} already exists; pass --force to replace it or choose "
                                f"another --{flag.replace('_', '-')}")


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
channels = _checked(lambda s: tuple(int(c) for c in s.split(",")), lambda ch: min(ch) > 0,
                    "comma-separated integers like 16,32,64", "positive widths")
steps = _checked(lambda s: tuple(int(k) for k in s.split(",")) if "," in s else int(s),
                 lambda v: min(v if isinstance(v, tuple) else (v,)) > 0,
                 "a step count or comma-separated steps like 500,1000", "> 0")

# a config field's flag type: by its annotation, or the `type` its metadata names
TYPES = {"int": positive_int, "float": positive_float, "str": str, "nonneg_int": nonneg_int,
         "number": float, "steps": steps}
