"""``minidiff`` command line: a thin shell over the library.

Each subcommand's handler in :mod:`.commands` carries its parser's flags as decorators
(:mod:`.common`) and imports the library inside itself, so ``minidiff --help`` and
``--version`` never import torch (a test checks it). A user error ends as one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
import time

from ... import __version__
from ...allocator import keep_freed_memory
from ...errors import MinidiffError, os_error_message
from . import commands  # noqa: F401  (its @command s fill COMMANDS, in --help's order)
from .common import COMMANDS, Parser, add_command


def build_parser() -> Parser:
    p = Parser(prog="minidiff", description="Train, sample and inspect small DDPMs on MNIST.")
    p.add_argument("--version", action="version", version=__version__,
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for name, handler in COMMANDS.items():
        if " " not in name:  # sub-subcommands go under their group
            add_command(sub, name, handler)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    keep_freed_memory()  # a quarter of sampling's time on a 2-core CPU was page faults
    t0 = time.perf_counter()
    try:
        return args.handler(args) or 0
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
