"""``minidiff`` command line: a thin shell over the library.

Each subcommand's handler ``cmd_<name>`` in :mod:`.models` or :mod:`.images` carries its
parser's flags as decorators (:mod:`.common`). The parsers read only torch-free modules and
each handler imports the library inside itself, so ``minidiff --help`` and ``--version`` never
import torch (a test checks it). A user error ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
import time

from .. import __version__
from ..errors import MinidiffError, os_error_message
from . import images, models  # noqa: F401  (their @command s fill COMMANDS)
from .common import COMMANDS, Parser, add_command

# in the order `minidiff --help` lists them
ORDER = ("data", "models", "train", "sample", "grid", "classifier", "eval", "demo", "bench",
         "prune", "quantize", "distill", "study", "serve")


def build_parser() -> Parser:
    p = Parser(prog="minidiff", description="Train, sample and inspect small DDPMs on MNIST.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for name in ORDER:
        add_command(sub, name, COMMANDS[name])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    t0 = time.perf_counter()
    try:
        return args.handler(args)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minidiff: interrupted after {time.perf_counter() - t0:.0f} s; checkpoints "
              "written so far are kept (resume with --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, permission denied, ...: no traceback
        print(f"minidiff: error: {os_error_message(e)}", file=sys.stderr)
        return 1
