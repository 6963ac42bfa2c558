"""Datasets and models: ``data``, ``models``, ``classifier``, ``train``, ``prune``,
``quantize``, ``study``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MinidiffError
from ..original import RECIPES
from ..settings import DATASET_NAMES, DEVICES, MODEL_PRESETS, PRECISIONS, SCHEDULES, STUDY_PRESETS
from .common import (
    CKPT,
    channels,
    command,
    data_dir,
    flag,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
)

# TrainConfig's fields that `train` takes from the flags of the same name
TRAIN_FLAGS = ("dataset", "epochs", "steps", "batch_size", "lr", "seed", "init", "precision",
               "device", "checkpoint_every", "keep_checkpoints", "subset", "label_dropout")


def add_data(sub) -> None:
    d = command(sub, "data", "list or fetch datasets", cmd_data, "minidiff data list",
                "minidiff data fetch mnist    # into ~/.cache/minidiff/data/mnist")
    ds = d.add_subparsers(dest="data_command", parser_class=type(d))
    ls = ds.add_parser("list", help="datasets, where each was found, whether it verified")
    ls.add_argument("--data-dir", help="folder searched first")
    flag(ls, "--json", "print JSON")
    get = ds.add_parser("fetch", help="download a dataset from its official mirror")
    get.add_argument("name", choices=DATASET_NAMES)
    get.add_argument("--dest", help="target folder (default: ~/.cache/minidiff/data/NAME, "
                     "or $MINIDIFF_CACHE/data/NAME)")


def cmd_data(args) -> int:
    from ..data import dataset_status, fetch, status_table

    if args.data_command == "fetch":
        print(f"{args.name}: downloaded and verified in {fetch(args.name, args.dest)}")
    elif args.data_command == "list":
        rows = [dataset_status(name, args.data_dir) for name in DATASET_NAMES]
        print(json.dumps(rows, indent=2) if args.json else status_table(rows))
    else:
        raise MinidiffError("choose a data command: `minidiff data list` or "
                            "`minidiff data fetch NAME`")
    return 0


def add_models(sub) -> None:
    flag(command(sub, "models", "model presets with parameters and MACs", cmd_models,
                 "minidiff models"), "--json", "print JSON")


def cmd_models(args) -> int:
    from ..original import STUDY
    from ..unet import PRESETS, UNet, count_macs, count_params

    nets = {name: UNet(cfg) for name, cfg in PRESETS.items()}
    rows = [{"preset": name, "channels": list(net.config.channels), "params": count_params(net),
             "study_params": STUDY[name]["params"], "macs_per_image": count_macs(net)}
            for name, net in nets.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<10} {'channels':<15} {'params':>10} {'study':>10} {'MACs/image':>12}")
    for r in rows:
        print(f"{r['preset']:<10} {str(tuple(r['channels'])):<15} {r['params']:>10,} "
              f"{r['study_params']:>10,} {r['macs_per_image'] / 1e6:>10.1f} M")
    return 0


def add_classifier(sub) -> None:
    c = command(sub, "classifier", "train or evaluate the metrics' feature classifier",
                cmd_classifier, "minidiff classifier evaluate",
                "minidiff classifier train --dataset fashion-mnist")
    cs = c.add_subparsers(dest="classifier_command", parser_class=type(c))
    tr = cs.add_parser("train", help="rebuild a shipped classifier from its recipe")
    tr.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    tr.add_argument("--epochs", type=positive_int, help="default: the recipe's")
    data_dir(tr)
    tr.add_argument("--out", help="folder for weights + card (default: the package's assets)")
    ev = cs.add_parser("evaluate", help="test accuracy of the shipped classifier")
    ev.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    data_dir(ev)
    ev.add_argument("--json", metavar="OUT", help="also write {\"test_accuracy\": ...} here")


def cmd_classifier(args) -> int:
    from ..classifier import retrain, shipped_accuracy
    from ..io import atomic_write_text

    if args.classifier_command == "train":
        path, card = retrain(args.dataset, epochs=args.epochs, data_dir=args.data_dir,
                             out=args.out)
        print(f"{args.dataset}: test accuracy {card['test_accuracy']:.4f}; wrote {path}")
        return 0
    if args.classifier_command != "evaluate":
        raise MinidiffError("choose `minidiff classifier train` or `minidiff classifier evaluate`")
    acc, n, card = shipped_accuracy(args.dataset, args.data_dir)
    print(f"{args.dataset} classifier: test accuracy {acc:.4f} on {n} images "
          f"(card: {card['test_accuracy']:.4f})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"test_accuracy": acc}) + "\n")
    return 0


def add_train(sub) -> None:
    t = command(sub, "train", "train a DDPM noise predictor", cmd_train,
                "minidiff train --preset reduced --epochs 5 --out runs/reduced",
                "minidiff train --preset baseline --steps 2000 --batch-size 64 --out runs/base",
                "minidiff train --out runs/reduced --resume      # continue a stopped run",
                "minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned   "
                "# fine-tune")
    t.add_argument("--preset", choices=MODEL_PRESETS, default="reduced",
                   help="model architecture (default: reduced)")
    t.add_argument("--channels", type=channels, metavar="C1,C2,...",
                   help="override the preset's channel widths, e.g. 8,16 (multiples of 8)")
    t.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    flag(t, "--conditional", "class-conditional (learned class embedding; labels dropped at "
                             "--label-dropout so one model also samples unconditionally)")
    t.add_argument("--label-dropout", type=float, help="with --conditional: share of labels "
                   "replaced by 'no label' (default 0.1)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=positive_float, help="passes over the data (default 10)")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=positive_float,
                   help="peak learning rate (default 1e-3, or the --recipe's)")
    t.add_argument("--init", metavar="CKPT", help="fine-tune: start from this checkpoint (its "
                   "layout, e.g. pruned widths, and its zeros after unstructured pruning are kept)")
    t.add_argument("--recipe", choices=list(RECIPES), help="with --init: the study's fine-tuning "
                   "epochs and lr (" + "; ".join(f"{k}: {v['epochs']} epochs at {v['lr']:g}"
                                                 for k, v in RECIPES.items()) + ")")
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast where the CPU/GPU supports it, else fp32")
    t.add_argument("--device", choices=DEVICES, default="auto")
    data_dir(t)
    t.add_argument("--checkpoint-every", type=positive_int, default=500, metavar="N",
                   help="write a checkpoint every N steps (default 500)")
    t.add_argument("--keep-checkpoints", type=positive_int, default=3, metavar="K",
                   help="keep the newest K training checkpoints (default 3)")
    t.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="beta schedule (default linear 1e-4..0.02, T=1000)")
    t.add_argument("--subset", type=positive_int, help="train on the first N images only")
    t.add_argument("--out", required=True, help="run folder to create")
    flag(t, "--resume", "continue the run in --out from its last checkpoint")
    flag(t, "--no-progress", "no progress bar")


def cmd_train(args) -> int:
    from ..diffusion import DiffusionConfig
    from ..train import model_config, train, train_config

    if args.label_dropout is not None and not args.conditional:
        raise MinidiffError("--label-dropout applies to --conditional training only")
    if args.init and (args.conditional or args.channels):
        raise MinidiffError("--init takes the model's layout from the checkpoint; drop "
                            "--conditional / --channels")
    cfg = train_config(args.recipe, **{k: getattr(args, k) for k in TRAIN_FLAGS})
    model = model_config(args.preset, channels=args.channels, conditional=args.conditional,
                         dataset=args.dataset)
    summary = train(model, DiffusionConfig(schedule=args.schedule), cfg, args.out,
                    data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress,
                    preset=None if args.init else args.preset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps({"out": args.out, **summary}))
    return 0


def add_prune(sub) -> None:
    p = command(sub, "prune", "structured / unstructured pruning of a checkpoint", cmd_prune,
                "minidiff prune runs/base --structured 0.1 --unstructured 0.3 --out runs/pruned0",
                "minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned")
    p.add_argument("checkpoint", help=CKPT)
    p.add_argument("--structured", type=fraction, metavar="RATIO",
                   help="remove this share of channels (L1, Torch-Pruning), e.g. 0.1")
    p.add_argument("--unstructured", type=fraction, metavar="RATIO",
                   help="zero this share of conv/linear weights (global magnitude), e.g. 0.3")
    p.add_argument("--out", required=True, help="folder to write the pruned model to")


def cmd_prune(args) -> int:
    from ..compress import prune_checkpoint

    print(json.dumps(prune_checkpoint(args.checkpoint, args.out, structured=args.structured,
                                      unstructured=args.unstructured)))
    return 0


def add_quantize(sub) -> None:
    q = command(sub, "quantize", "store a checkpoint as int8 (or fp16) weights", cmd_quantize,
                "minidiff quantize runs/demo --out runs/demo-int8",
                "minidiff quantize runs/demo --mode fp16 --out runs/demo-fp16")
    q.add_argument("checkpoint", help=CKPT)
    q.add_argument("--mode", choices=["int8", "fp16"], default="int8")
    q.add_argument("--out", required=True, help="folder to write the stored model to")


def cmd_quantize(args) -> int:
    from ..compress import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.checkpoint, args.out, mode=args.mode)))
    return 0


def add_study(sub) -> None:
    s = command(sub, "study", "the whole compression study, resumable, with a report", cmd_study,
                "minidiff study --preset smoke --out runs/study-smoke     # about a minute",
                "minidiff study --preset standard --out runs/study   # ~90 min; re-run to resume")
    s.add_argument("--preset", choices=STUDY_PRESETS, default="smoke", help="smoke ~1 min, "
                   "quick <= 30 min, standard ~90 min (2-core CPU), paper: the study's epochs, "
                   "for a GPU")
    s.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    data_dir(s)
    s.add_argument("--out", required=True,
                   help="study folder; re-running the same command resumes it")
    flag(s, "--no-progress", "no progress bars")
    s.add_argument("--export", metavar="DIR", help="after the study, copy its models to DIR "
                   "(e.g. src/minidiff/assets/models/, where the shipped ones live) by name")


def cmd_study(args) -> int:
    from ..study import export, run_study, summary_lines

    rows = run_study(args.preset, args.out, dataset=args.dataset, data_dir=args.data_dir,
                     progress=not args.no_progress)
    print(summary_lines(rows, Path(args.out)))
    if args.export:
        print(f"exported {', '.join(export(args.out, args.export))} to {args.export}")
    return 0
