"""``minidiff`` command line: a thin shell over the library.

Every user error ends as one line on stderr (``minidiff: error: ...``) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import MinidiffError

EXAMPLES = {
    "data": "examples:\n  minidiff data list\n"
            "  minidiff data fetch mnist    # into ~/.cache/minidiff/data/mnist",
    "models": "example:\n  minidiff models",
    "train": (
        "examples:\n"
        "  minidiff train --preset reduced --epochs 5 --out runs/reduced\n"
        "  minidiff train --preset baseline --steps 2000 --batch-size 64 --out runs/base\n"
        "  minidiff train --out runs/reduced --resume      # continue a stopped run\n"
        "  minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned   # fine-tune"
    ),
    "prune": (
        "examples:\n"
        "  minidiff prune runs/base --structured 0.1 --unstructured 0.3 --out runs/pruned0\n"
        "  minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned"
    ),
    "quantize": (
        "examples:\n"
        "  minidiff quantize runs/demo --out runs/demo-int8\n"
        "  minidiff quantize runs/demo --mode fp16 --out runs/demo-fp16"
    ),
    "study": (
        "examples:\n"
        "  minidiff study --preset smoke --out runs/study-smoke     # about a minute\n"
        "  minidiff study --preset standard --out runs/study   # ~90 min; re-run to resume"
    ),
    "sample": (
        "examples:\n"
        "  minidiff sample runs/demo --n 100 --out samples.npz --grid grid.png\n"
        "  minidiff sample runs/demo/model.safetensors --n 64 --steps 250 --out s.npz\n"
        "  minidiff sample runs/demo --sampler dpmpp --steps 20 --n 64 --out fast.npz"
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
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _channels(s: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,32,64, "
                                         f"got {s!r}") from None
    if not ch or any(c <= 0 for c in ch):
        raise argparse.ArgumentTypeError(f"channels must be positive, got {s!r}")
    return ch


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .diffusion import SPACINGS
    from .original import RECIPES
    from .samplers import SAMPLERS
    from .sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS
    from .study import PRESETS as STUDY_PRESETS
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
    df.add_argument("--dest", help="target folder (default: ~/.cache/minidiff/data/NAME, "
                    "or $MINIDIFF_CACHE/data/NAME)")

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
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional (learned class embedding; labels dropped at "
                        "--label-dropout so one model also samples unconditionally)")
    t.add_argument("--label-dropout", type=float,
                   help="with --conditional: share of labels replaced by 'no label' "
                        "(default 0.1)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=_positive_float, help="passes over the data (default 10)")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float,
                   help="peak learning rate (default 1e-3, or the --recipe's)")
    t.add_argument("--init", metavar="CKPT",
                   help="fine-tune: start from this checkpoint (its layout, e.g. pruned widths, "
                        "and its zeros after unstructured pruning are kept)")
    t.add_argument("--recipe", choices=list(RECIPES),
                   help="with --init: the study's fine-tuning epochs and lr ("
                        + "; ".join(f"{k}: {v['epochs']} epochs at {v['lr']:g}"
                                    for k, v in RECIPES.items()) + ")")
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
    s.add_argument("checkpoint", help="run folder, .safetensors file or shipped model name")
    s.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"network evaluations, timesteps respaced over T (default "
                        f"{DEFAULT_STEPS}; T=1000 is the original DDPM)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="ddpm (ancestral), ddim (eta 0: deterministic), dpmpp "
                        "(DPM-Solver++(2M)), dpmpp-sde (SDE-DPM-Solver++(2M), the default: "
                        f"within 10%% of DDPM-1000's quality in {DEFAULT_STEPS} steps)")
    s.add_argument("--eta", type=float, help="DDIM's noise scale (0..1; default 0)")
    s.add_argument("--spacing", choices=list(SPACINGS), default=DEFAULT_SPACING,
                   help=f"which timesteps --steps keeps: uniform, trailing (default "
                        f"{DEFAULT_SPACING}), quadratic (denser at low noise)")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--batch-size", type=_positive_int, default=256)
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast where the CPU/GPU supports it")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--out", required=True, help="output .npz (images uint8 [N x 28 x 28])")
    s.add_argument("--grid", help="also write a PNG grid of the samples")
    s.add_argument("--class", dest="classes", metavar="C",
                   help="a conditional model's class id, or all for a balanced set "
                        "(n / 10 each, labels stored in the .npz, one grid row per class)")
    s.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance scale with --class (0 unconditional, "
                        f"1 conditional; default {DEFAULT_GUIDANCE}, see "
                        "benchmarks/results/guidance_sweep.md)")
    s.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (eager if compiling fails); "
                        "pays off only for long runs, see benchmarks/results/bench.md")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    gr = sub.add_parser("grid", help="render a sample file as a PNG grid",
                        epilog="example:\n  minidiff grid samples.npz --out grid.png --n 64",
                        formatter_class=fmt)
    gr.add_argument("samples", help="an .npz written by `minidiff sample`")
    gr.add_argument("--out", required=True, help="output .png")
    gr.add_argument("--n", type=_positive_int, default=100, help="at most this many (default 100)")
    gr.add_argument("--nrow", type=_positive_int, help="images per row (default ~sqrt n)")

    c = sub.add_parser("classifier", help="train or evaluate the metrics' feature classifier",
                       epilog="examples:\n  minidiff classifier evaluate\n"
                              "  minidiff classifier train --dataset fashion-mnist",
                       formatter_class=fmt)
    csub = c.add_subparsers(dest="classifier_command", parser_class=_Parser)
    ct = csub.add_parser("train", help="rebuild a shipped classifier from its recipe")
    ct.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    ct.add_argument("--epochs", type=_positive_int, help="default: the recipe's")
    ct.add_argument("--data-dir", help="folder holding the dataset's IDX files")
    ct.add_argument("--out", help="folder for weights + card (default: the package's assets)")
    ce = csub.add_parser("evaluate", help="test accuracy of the shipped classifier")
    ce.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    ce.add_argument("--data-dir", help="folder holding the dataset's IDX files")
    ce.add_argument("--json", metavar="OUT", help="also write {\"test_accuracy\": ...} here")

    e = sub.add_parser("eval", help="quality metrics of samples, with real-data floors",
                       epilog="examples:\n  minidiff eval runs/demo/samples.npz\n"
                              "  minidiff eval --real --n 10000\n"
                              "  minidiff eval --model runs/demo --steps 100 --time-n 256",
                       formatter_class=fmt)
    e.add_argument("samples", nargs="?", help="an .npz written by `minidiff sample`")
    e.add_argument("--real", action="store_true", help="print the real-data floors alone")
    e.add_argument("--model", metavar="CKPT", help="efficiency of a checkpoint instead")
    e.add_argument("--n", type=_positive_int, default=10000, help="with --real: images")
    e.add_argument("--reference", choices=["test", "train"], default="test")
    e.add_argument("--dataset", choices=list(DATASETS), help="default: the samples' dataset")
    e.add_argument("--data-dir", help="folder holding the dataset's IDX files")
    e.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    e.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="with --model (default: `minidiff sample`'s)")
    e.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help="with --model: sampler steps (default: `minidiff sample`'s)")
    e.add_argument("--spacing", choices=list(SPACINGS), default=DEFAULT_SPACING,
                   help="with --model")
    e.add_argument("--time-n", type=_positive_int, default=256,
                   help="with --model: samples actually timed; the 10,000-sample time is "
                        "extrapolated from them (default 256; 10000 times the real thing)")

    de = sub.add_parser("demo", help="train the reduced model briefly, sample, write a report",
                        epilog=EXAMPLES["demo"], formatter_class=fmt)
    de.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    de.add_argument("--steps", type=_positive_int, help="training steps (default: the demo's)")
    de.add_argument("--n", type=_positive_int, default=100, help="images to sample (default 100)")
    de.add_argument("--data-dir", help="folder holding MNIST's IDX files")
    de.add_argument("--force", action="store_true", help="overwrite an existing demo run")
    b = sub.add_parser("bench", help="training and sampling speed beside diffusers, vs the "
                       "matmul peak", epilog="examples:\n  minidiff bench\n"
                       "  minidiff bench --presets reduced --n 100 --out /tmp/bench",
                       formatter_class=fmt)
    b.add_argument("--presets", nargs="+", choices=list(PRESETS),
                   default=["reduced", "baseline", "shallow"])
    b.add_argument("--n", type=_positive_int, default=500,
                   help="samples timed per sampling job, scaled to 10,000 (default 500)")
    b.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"network evaluations per sample (default {DEFAULT_STEPS}, the default "
                        "sampler's)")
    b.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 where the CPU runs it natively, else fp32; bf16 "
                        "is refused where it is emulated")
    b.add_argument("--no-anchor", action="store_true", help="skip the diffusers rows")
    b.add_argument("--compile", action="store_true",
                   help="also time the default sampler through torch.compile")
    b.add_argument("--out", default="benchmarks/results",
                   help="folder for bench.json and bench.md (default benchmarks/results)")
    pr = sub.add_parser("prune", help="structured / unstructured pruning of a checkpoint",
                        epilog=EXAMPLES["prune"], formatter_class=fmt)
    pr.add_argument("checkpoint", help="run folder, .safetensors file or shipped model name")
    pr.add_argument("--structured", type=_fraction, metavar="RATIO",
                    help="remove this share of channels (L1, Torch-Pruning), e.g. 0.1")
    pr.add_argument("--unstructured", type=_fraction, metavar="RATIO",
                    help="zero this share of conv/linear weights (global magnitude), e.g. 0.3")
    pr.add_argument("--out", required=True, help="folder to write the pruned model to")

    q = sub.add_parser("quantize", help="store a checkpoint as int8 (or fp16) weights",
                       epilog=EXAMPLES["quantize"], formatter_class=fmt)
    q.add_argument("checkpoint", help="run folder, .safetensors file or shipped model name")
    q.add_argument("--mode", choices=["int8", "fp16"], default="int8")
    q.add_argument("--out", required=True, help="folder to write the stored model to")

    st = sub.add_parser("study", help="the whole compression study, resumable, with a report",
                        epilog=EXAMPLES["study"], formatter_class=fmt)
    st.add_argument("--preset", choices=list(STUDY_PRESETS), default="smoke",
                    help="smoke ~1 min, quick <= 30 min, standard ~90 min (2-core CPU), "
                         "paper: the study's epochs, for a GPU")
    st.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    st.add_argument("--data-dir", help="folder holding the dataset's IDX files")
    st.add_argument("--out", required=True,
                    help="study folder; re-running the same command resumes it")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    sv = sub.add_parser("serve", help="a local web page to sample the shipped models",
                        epilog="example:\n  minidiff serve            # then open "
                        "http://127.0.0.1:7860", formatter_class=fmt)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive_int, default=7860)
    sv.add_argument("--max-seconds", type=_positive_float, default=60.0,
                    help="stop one request's sampling after this long (default 60)")
    st.add_argument("--export", metavar="DIR",
                    help="after the study, copy its models to DIR (e.g. "
                         "src/minidiff/assets/models/, where the shipped ones live) by name")
    return p


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {s}")
    return v


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
    from .original import STUDY
    from .unet import PRESETS, UNet, count_macs, count_params

    rows = []
    for name, cfg in PRESETS.items():
        model = UNet(cfg)
        rows.append({"preset": name, "channels": list(cfg.channels),
                     "params": count_params(model), "study_params": STUDY[name]["params"],
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
    from .original import RECIPES
    from .train import TrainConfig, train
    from .unet import PRESETS, UNetConfig

    if args.label_dropout is not None and not args.conditional:
        raise MinidiffError("--label-dropout applies to --conditional training only")
    if args.recipe and not args.init:
        raise MinidiffError("--recipe is a fine-tuning recipe: give --init CKPT too")
    if args.init and (args.conditional or args.channels):
        raise MinidiffError("--init takes the model's layout from the checkpoint; drop "
                            "--conditional / --channels")
    recipe = RECIPES[args.recipe] if args.recipe else {}
    epochs = args.epochs if args.epochs or args.steps else recipe.get("epochs")
    cfg = TrainConfig(dataset=args.dataset, epochs=epochs, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr or recipe.get("lr", 1e-3),
                      seed=args.seed, init=args.init,
                      precision=args.precision, device=args.device,
                      checkpoint_every=args.checkpoint_every,
                      keep_checkpoints=args.keep_checkpoints, subset=args.subset,
                      **({} if args.label_dropout is None
                         else {"label_dropout": args.label_dropout}))
    model_cfg = PRESETS[args.preset]
    if args.channels:
        try:
            model_cfg = UNetConfig(**{**model_cfg.to_dict(), "channels": args.channels})
        except ValueError as e:
            raise MinidiffError(f"--channels: {e}") from None
    if args.conditional:
        from .data import get_spec

        model_cfg = UNetConfig(**{**model_cfg.to_dict(),
                                  "num_classes": len(get_spec(args.dataset).classes)})
    summary = train(model_cfg, DiffusionConfig(schedule=args.schedule), cfg,
                    args.out, data_dir=args.data_dir, resume=args.resume,
                    progress=not args.no_progress,
                    preset=None if args.init else args.preset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps({"out": args.out, **summary}))
    return 0


def cmd_sample(args) -> int:
    from .sampling import sample_to_file

    meta = sample_to_file(args.checkpoint, args.out, n=args.n, steps=args.steps,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                          precision=args.precision, device=args.device, grid=args.grid,
                          progress=not args.no_progress, eta=args.eta, spacing=args.spacing,
                          compile=args.compile, classes=args.classes,
                          guidance=args.guidance)
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


def cmd_classifier(args) -> int:
    import dataclasses

    from .classifier import RECIPES, accuracy, load_classifier, save_classifier, train_classifier
    from .data import load_split
    from .io import atomic_write_text

    if args.classifier_command == "train":
        recipe = RECIPES[args.dataset]
        if args.epochs:
            recipe = dataclasses.replace(recipe, epochs=args.epochs)
        model, card = train_classifier(recipe, args.data_dir)
        path = save_classifier(model, card, Path(args.out) if args.out else None)
        print(f"{args.dataset}: test accuracy {card['test_accuracy']:.4f}; wrote {path}")
        return 0
    if args.classifier_command != "evaluate":
        raise MinidiffError("choose `minidiff classifier train` or `minidiff classifier evaluate`")
    model, card = load_classifier(args.dataset)
    x, y = load_split(args.dataset, "test", args.data_dir)
    acc = accuracy(model, x, y)
    print(f"{args.dataset} classifier: test accuracy {acc:.4f} on {len(x)} images "
          f"(card: {card['test_accuracy']:.4f})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"test_accuracy": acc}) + "\n")
    return 0


def _metrics_table(res: dict, floor: dict | None, label: str = "samples") -> str:
    rows = [("pseudo_fid", "lower"), ("kid", "lower"), ("precision", "higher"),
            ("recall", "higher"), ("ssim", "see docs"), ("ssim_nearest", "see docs"),
            ("class_max_dev", "lower"), ("confidence", "higher"), ("memorization", "lower")]
    lines = [f"{'metric':<14} {label:>10} {'real floor' if floor else '':>11}  better"]
    for key, better in rows:
        f = f"{floor[key]:>11.4f}" if floor else f"{'':>11}"
        lines.append(f"{key:<14} {res[key]:>10.4f} {f}  {better}")
    hist = " ".join(f"{v:.3f}" for v in res["class_histogram"])
    lines.append(f"{'classes 0-9':<14} {hist}")
    lines.append(f"n = {res['n']}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .io import atomic_write_text

    if args.model:
        from .efficiency import efficiency

        res = efficiency(args.model, sampler=args.sampler, steps=args.steps,
                         spacing=args.spacing, time_n=args.time_n)
        for k, v in res.items():
            print(f"{k:<22} {v}")
    elif args.real:
        from .metrics import Reference, floor

        ref = Reference(args.dataset or "mnist", args.reference, args.data_dir)
        res = floor(ref, args.n)
        print(f"real-data floor: {args.n} real images vs the {args.reference} split")
        print(_metrics_table(res, None, label="real"))
    else:
        if not args.samples:
            raise MinidiffError("give a sample file (`minidiff eval samples.npz`), --real or "
                                "--model CKPT")
        import torch

        from .metrics import evaluate
        from .sampling import load_labels, load_samples

        images = torch.from_numpy(load_samples(args.samples))
        labels = load_labels(args.samples, len(images))
        dataset = args.dataset
        side = Path(args.samples).with_suffix(".json")
        if dataset is None and side.is_file():
            try:
                dataset = json.loads(side.read_text()).get("dataset")
            except ValueError:
                dataset = None
        res = evaluate(images, dataset or "mnist", args.reference, args.data_dir,
                       labels=None if labels is None else torch.from_numpy(labels))
        print(_metrics_table(res, res["floor"]))
        if labels is not None:
            print(f"\nconditional accuracy (the classifier agrees with the requested class): "
                  f"{res['conditional_accuracy']:.4f}")
            print(f"{'class':>5} {'n':>6} {'accuracy':>9} {'pseudo-FID':>11}")
            for c, e in res["per_class"].items():
                fid = f"{e['pseudo_fid']:.3f}" if "pseudo_fid" in e else "(n<10)"
                print(f"{c:>5} {e['n']:>6} {e['accuracy']:>9.4f} {fid:>11}")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, steps=args.steps, n=args.n, data_dir=args.data_dir,
                      force=args.force)
    print(f"demo finished: {report}")
    return 0


def cmd_bench(args) -> int:
    from .bench import report, run_bench
    from .io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    def log(row, partial):  # print each row; keep what is measured if the run is stopped
        print(json.dumps(row) if isinstance(row, dict) else row, flush=True)
        atomic_write_text(out / "bench.partial.json", json.dumps(partial, indent=2) + "\n")

    res = run_bench(presets=tuple(args.presets), n=args.n, steps=args.steps,
                    precision=args.precision, anchor=not args.no_anchor,
                    compile_=args.compile, log=log)
    (out / "bench.partial.json").unlink(missing_ok=True)
    command = "minidiff bench " + " ".join(sys.argv[2:])
    atomic_write_text(out / "bench.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "bench.md", report(res, command.strip()))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def cmd_prune(args) -> int:
    from .compress import prune_checkpoint

    print(json.dumps(prune_checkpoint(args.checkpoint, args.out, structured=args.structured,
                                      unstructured=args.unstructured)))
    return 0


def cmd_quantize(args) -> int:
    from .compress import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.checkpoint, args.out, mode=args.mode)))
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    rows = run_study(args.preset, args.out, dataset=args.dataset, data_dir=args.data_dir,
                     progress=not args.no_progress)
    for r in rows:
        print(f"{r['model']:>14}  params {r['params']:>9,}  {r['size_mb']:6.2f} MiB  "
              f"pseudo-FID {r['pseudo_fid']:7.3f}  10k {r['latency_10k_s']:7.1f} s")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    if args.export:
        from .study import export

        names = export(args.out, args.export)
        print(f"exported {', '.join(names)} to {args.export}")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    print(f"minidiff serve: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    serve(args.host, args.port, args.max_seconds)
    return 0


COMMANDS = {"bench": cmd_bench, "serve": cmd_serve, "prune": cmd_prune, "quantize": cmd_quantize,
            "study": cmd_study, "data": cmd_data, "models": cmd_models, "train": cmd_train,
            "sample": cmd_sample,
            "grid": cmd_grid, "classifier": cmd_classifier, "eval": cmd_eval,
            "demo": cmd_demo}


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
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # disk full, permission denied, ...: name the file and the reason, no traceback
        import errno

        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        fix = ("free some disk space and run the command again (a training run continues "
               "with --resume)" if e.errno == errno.ENOSPC
               else "check the path and its permissions")
        print(f"minidiff: error: {where}{e.strerror or e}; {fix}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
