"""``minidiff`` command line: a thin shell over the library.

Every user error ends as one line on stderr (``minidiff: error: ...``) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import MinidiffError

EXAMPLES = {
    "data": "examples:\n  minidiff data list\n  minidiff data fetch mnist --dest data/mnist",
    "models": "example:\n  minidiff models",
    "train": (
        "examples:\n"
        "  minidiff train --preset reduced --epochs 5 --out runs/reduced\n"
        "  minidiff train --preset baseline --steps 2000 --batch-size 64 --out runs/base\n"
        "  minidiff train --out runs/reduced --resume      # continue a stopped run"
    ),
    "sample": (
        "examples:\n"
        "  minidiff sample runs/demo --n 100 --out samples.npz --grid grid.png\n"
        "  minidiff sample runs/demo/model.safetensors --n 64 --steps 250 --out s.npz"
    ),
    "demo": "example:\n  minidiff demo            # ~10 minutes on a 2-core CPU, writes runs/demo/",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (no usage dump) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"minidiff: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _channels(s: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,32,64, "
                                         f"got {s!r}")
    if not ch or any(c <= 0 for c in ch):
        raise argparse.ArgumentTypeError(f"channels must be positive, got {s!r}")
    return ch


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .unet import PRESETS

    p = _Parser(prog="minidiff", description="Train, sample and inspect small DDPMs on MNIST.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser("data", help="list or fetch datasets", epilog=EXAMPLES["data"],
                       formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", parser_class=_Parser)
    dl = dsub.add_parser("list", help="datasets, where each was found, whether it verified")
    dl.add_argument("--data-dir", help="folder searched first")
    dl.add_argument("--json", action="store_true", help="print JSON")
    df = dsub.add_parser("fetch", help="download a dataset from its official mirror")
    df.add_argument("name", choices=list(DATASETS))
    df.add_argument("--dest", help="target folder (default: the repository's data/NAME)")

    m = sub.add_parser("models", help="model presets with parameters and MACs",
                       epilog=EXAMPLES["models"], formatter_class=fmt)
    m.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("train", help="train a DDPM noise predictor", epilog=EXAMPLES["train"],
                       formatter_class=fmt)
    t.add_argument("--preset", choices=list(PRESETS), default="reduced",
                   help="model architecture (default: reduced)")
    t.add_argument("--channels", type=_channels, metavar="C1,C2,...",
                   help="override the preset's channel widths, e.g. 8,16 (multiples of 8)")
    t.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=_positive_float, help="passes over the data (default 10)")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the CPU/GPU supports it, else fp32")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--data-dir", help="folder holding the dataset's IDX files")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500, metavar="N",
                   help="write a checkpoint every N steps (default 500)")
    t.add_argument("--keep-checkpoints", type=_positive_int, default=3, metavar="K",
                   help="keep the newest K training checkpoints (default 3)")
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="beta schedule (default linear 1e-4..0.02, T=1000)")
    t.add_argument("--subset", type=_positive_int, help="train on the first N images only")
    t.add_argument("--out", required=True, help="run folder to create")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate images from a checkpoint",
                       epilog=EXAMPLES["sample"], formatter_class=fmt)
    s.add_argument("checkpoint", help="run folder or .safetensors file")
    s.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--steps", type=_positive_int,
                   help="denoising steps, respaced evenly over T (default: all T)")
    s.add_argument("--sampler", choices=["ddpm"], default="ddpm")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--batch-size", type=_positive_int, default=256)
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--out", required=True, help="output .npz (images uint8 [N x 28 x 28])")
    s.add_argument("--grid", help="also write a PNG grid of the samples")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    gr = sub.add_parser("grid", help="render a sample file as a PNG grid",
                        epilog="example:\n  minidiff grid samples.npz --out grid.png --n 64",
                        formatter_class=fmt)
    gr.add_argument("samples", help="an .npz written by `minidiff sample`")
    gr.add_argument("--out", required=True, help="output .png")
    gr.add_argument("--n", type=_positive_int, default=100, help="at most this many (default 100)")
    gr.add_argument("--nrow", type=_positive_int, help="images per row (default ~sqrt n)")

    de = sub.add_parser("demo", help="train the reduced model briefly, sample, write a report",
                        epilog=EXAMPLES["demo"], formatter_class=fmt)
    de.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    de.add_argument("--steps", type=_positive_int, help="training steps (default: the demo's)")
    de.add_argument("--n", type=_positive_int, default=100, help="images to sample (default 100)")
    de.add_argument("--data-dir", help="folder holding MNIST's IDX files")
    de.add_argument("--force", action="store_true", help="overwrite an existing demo run")
    return p


# --------------------------------------------------------------------------- commands


def cmd_data(args) -> int:
    from .data import DATASETS, dataset_status, fetch

    if args.data_command == "fetch":
        dest = fetch(args.name, args.dest)
        print(f"{args.name}: downloaded and verified in {dest}")
        return 0
    if args.data_command != "list":
        raise MinidiffError("choose a data command: `minidiff data list` or "
                            "`minidiff data fetch NAME`")
    rows = [dataset_status(name, args.data_dir) for name in DATASETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "verified" if r["verified"] else ("NOT FOUND" if r["found"] is None else "FAILED")
        print(f"{r['name']:<14} {state:<9} {r['found'] or ''}")
        if r["error"]:
            print(f"{'':<14} {r['error']}")
    return 0


def cmd_models(args) -> int:
    from .unet import PRESETS, STUDY_PARAMS, UNet, count_macs, count_params

    rows = []
    for name, cfg in PRESETS.items():
        model = UNet(cfg)
        rows.append({"preset": name, "channels": list(cfg.channels),
                     "params": count_params(model), "study_params": STUDY_PARAMS[name],
                     "macs_per_image": count_macs(model)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<10} {'channels':<15} {'params':>10} {'study':>10} {'MACs/image':>12}")
    for r in rows:
        print(f"{r['preset']:<10} {str(tuple(r['channels'])):<15} {r['params']:>10,} "
              f"{r['study_params']:>10,} {r['macs_per_image'] / 1e6:>10.1f} M")
    return 0


def cmd_train(args) -> int:
    from .diffusion import DiffusionConfig
    from .train import TrainConfig, train
    from .unet import PRESETS, UNetConfig

    cfg = TrainConfig(dataset=args.dataset, epochs=args.epochs, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      precision=args.precision, device=args.device,
                      checkpoint_every=args.checkpoint_every,
                      keep_checkpoints=args.keep_checkpoints, subset=args.subset)
    model_cfg = PRESETS[args.preset]
    if args.channels:
        try:
            model_cfg = UNetConfig(**{**model_cfg.to_dict(), "channels": args.channels})
        except ValueError as e:
            raise MinidiffError(f"--channels: {e}")
    summary = train(model_cfg, DiffusionConfig(schedule=args.schedule), cfg,
                    args.out, data_dir=args.data_dir, resume=args.resume,
                    progress=not args.no_progress, preset=args.preset)
    print(json.dumps({"out": args.out, **summary}))
    return 0


def cmd_sample(args) -> int:
    from .sampling import sample_to_file

    meta = sample_to_file(args.checkpoint, args.out, n=args.n, steps=args.steps,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                          precision=args.precision, device=args.device, grid=args.grid,
                          progress=not args.no_progress)
    print(json.dumps(meta))
    return 0


def cmd_grid(args) -> int:
    from .io import save_grid
    from .sampling import load_samples

    if Path(args.out).suffix.lower() != ".png":
        raise MinidiffError(f"--out {args.out}: the grid must be a .png file")
    images = load_samples(args.samples)[: args.n]
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.out} ({len(images)} images)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, steps=args.steps, n=args.n, data_dir=args.data_dir,
                      force=args.force)
    print(f"demo finished: {report}")
    return 0


COMMANDS = {"data": cmd_data, "models": cmd_models, "train": cmd_train, "sample": cmd_sample,
            "grid": cmd_grid, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    t0 = time.perf_counter()
    try:
        return COMMANDS[args.command](args)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minidiff: interrupted after {time.perf_counter() - t0:.0f} s; checkpoints "
              "written so far are kept (resume with --resume)", file=sys.stderr)
        return 130
    except OSError as e:
        # disk full, permission denied, ...: name the file and the reason, no traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"minidiff: error:{where} {e.strerror or e}; check the path and free disk space",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
