"""``minidiff`` command line: a thin shell over the library.

Each subcommand's ``add_<name>`` (in :mod:`.models` or :mod:`.images`) builds its parser beside
its handler ``cmd_<name>``. The parsers read only torch-free modules (:mod:`minidiff.settings`,
:mod:`minidiff.original`), and each handler imports the library modules it needs inside itself:
that is what lets ``minidiff --help`` and ``--version`` start without importing torch (a test
checks it). Every user error ends as one line on stderr (``minidiff: error: ...``) and a
non-zero exit.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from ..errors import MinidiffError
from . import images, models
from .common import Parser

# in the order `minidiff --help` lists them
SUBCOMMANDS = (models.add_data, models.add_models, models.add_train, images.add_sample,
               images.add_grid, models.add_classifier, images.add_eval, images.add_demo,
               images.add_bench, models.add_prune, models.add_quantize, models.add_study,
               images.add_serve)


def build_parser() -> Parser:
    p = Parser(prog="minidiff", description="Train, sample and inspect small DDPMs on MNIST.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

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
    except OSError as e:
        # disk full, permission denied, ...: name the file and the reason, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        fix = ("free some disk space and run the command again (a training run continues "
               "with --resume)" if e.errno == errno.ENOSPC
               else "check the path and its permissions")
        print(f"minidiff: error: {where}{e.strerror or e}; {fix}", file=sys.stderr)
        return 1
