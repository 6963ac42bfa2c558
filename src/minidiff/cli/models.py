"""Datasets and models: ``data``, ``models``, ``classifier``, ``train``, ``prune``,
``quantize``, ``distill``, ``study``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MinidiffError
from ..original import RECIPES
from ..settings import (
    DATASET_NAMES,
    DISTILL_METHODS,
    LOSS_WEIGHTINGS,
    MODEL_PRESETS,
    PREDICTIONS,
    SCHEDULES,
    STUDY_PRESETS,
)
from .common import (
    arg,
    channels,
    command,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
    shared,
    steps,
)

# TrainConfig's fields that `train` takes from the flags of the same name
TRAIN_FLAGS = ("dataset", "epochs", "steps", "batch_size", "lr", "seed", "init", "precision",
               "device", "checkpoint_every", "keep_checkpoints", "subset", "label_dropout",
               "ema_power", "loss_weighting", "eval_every", "eval_n")
RECIPES_SHOWN = "; ".join(f"{k}: {r['epochs']} epochs, lr {r['lr']:g}" for k, r in RECIPES.items())


@command("data", "list or fetch datasets", "minidiff data list",
         "minidiff data fetch mnist    # into ~/.cache/minidiff/data/mnist")
def cmd_data(args) -> int:
    raise MinidiffError("choose a data command: `minidiff data list` or "
                        "`minidiff data fetch NAME`")


@command("data list", "datasets, where each was found, whether it verified")
@arg("--data-dir", help="folder searched first")
@shared("--json")
def cmd_data_list(args) -> int:
    from ..data import dataset_status, status_table

    rows = [dataset_status(name, args.data_dir) for name in DATASET_NAMES]
    print(json.dumps(rows, indent=2) if args.json else status_table(rows))
    return 0


@command("data fetch", "download a dataset from its official mirror")
@arg("name", choices=DATASET_NAMES)
@arg("--dest", help="target folder (default: the cache's data/NAME)")
def cmd_data_fetch(args) -> int:
    from ..data import fetch

    print(f"{args.name}: downloaded and verified in {fetch(args.name, args.dest)}")
    return 0


@command("models", "model presets with parameters and MACs", "minidiff models")
@shared("--json")
def cmd_models(args) -> int:
    from ..unet import preset_rows, preset_table

    rows = preset_rows()
    print(json.dumps(rows, indent=2) if args.json else preset_table(rows))
    return 0


@command("classifier", "train or evaluate the metrics' feature classifier",
         "minidiff classifier evaluate", "minidiff classifier train --dataset fashion-mnist")
def cmd_classifier(args) -> int:
    raise MinidiffError("choose `minidiff classifier train` or `minidiff classifier evaluate`")


@command("classifier train", "rebuild a shipped classifier from its recipe")
@shared("--dataset", "--data-dir")
@arg("--epochs", type=positive_int, help="default: the recipe's")
@arg("--out", help="folder for weights + card (default: the package's assets)")
def cmd_classifier_train(args) -> int:
    from ..classifier import retrain

    path, card = retrain(args.dataset, epochs=args.epochs, data_dir=args.data_dir, out=args.out)
    print(f"{args.dataset}: test accuracy {card['test_accuracy']:.4f}; wrote {path}")
    return 0


@command("classifier evaluate", "test accuracy of the shipped classifier")
@shared("--dataset", "--data-dir")
@arg("--json", metavar="OUT", help="also write {\"test_accuracy\": ...} here")
def cmd_classifier_evaluate(args) -> int:
    from ..classifier import shipped_accuracy
    from ..io import atomic_write_text

    acc, n, card = shipped_accuracy(args.dataset, args.data_dir)
    print(f"{args.dataset} classifier: test accuracy {acc:.4f} on {n} images "
          f"(card: {card['test_accuracy']:.4f})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"test_accuracy": acc}) + "\n")
    return 0


@command("train", "train a DDPM noise predictor",
         "minidiff train --preset reduced --epochs 5 --out runs/reduced",
         "minidiff train --out runs/reduced --resume    # continue a stopped run")
@arg("--out", required=True, help="run folder to create")
@arg("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
@arg("--preset", choices=MODEL_PRESETS, default="reduced", help="model architecture")
@arg("--channels", type=channels, metavar="C1,C2,...", help="the preset's widths replaced, "
     "e.g. 8,16 (multiples of 8)")
@arg("--conditional", action="store_true", help="class-conditional (and, by label dropout, "
     "unconditional)")
@arg("--label-dropout", type=float, help="with --conditional: labels dropped (default 0.1)")
@arg("--epochs", type=positive_float, exclusive="length", help="passes over the data (default 10)")
@arg("--steps", type=positive_int, exclusive="length", help="optimizer steps (or --epochs)")
@arg("--batch-size", type=positive_int, help="default 64")
@arg("--original-recipe", action="store_true", help="the recipe before the convergence "
     "benchmark (eps, linear, lr 1e-3, 200 warm-up steps, batch 128)")
@arg("--lr", type=positive_float, help="peak learning rate (default 2e-3 or the recipe's)")
@arg("--schedule", choices=SCHEDULES, help="beta schedule, T=1000 (default cosine)")
@arg("--init", metavar="CKPT", help="fine-tune this checkpoint, keeping its layout and zeros")
@arg("--recipe", choices=list(RECIPES), help=f"with --init: the study's ({RECIPES_SHOWN})")
@arg("--seed", type=nonneg_int, default=0)
@arg("--subset", type=positive_int, metavar="N", help="train on the first N images only")
@arg("--checkpoint-every", type=positive_int, default=500, metavar="N", help="save every N steps")
@arg("--keep-checkpoints", type=positive_int, default=3, metavar="K", help="keep the newest K")
@arg("--prediction", choices=PREDICTIONS, help="what the network predicts (default v)")
@arg("--loss-weighting", choices=LOSS_WEIGHTINGS, help="none or min-snr (gamma 5)")
@arg("--ema-power", type=positive_float, help="EMA power-law warm-up, e.g. 0.75")
@arg("--eval-every", type=steps, metavar="N|S1,S2", help="pseudo-FID of the EMA weights every N "
     "steps or at these steps, into metrics.jsonl")
@arg("--eval-n", type=positive_int, help="samples per evaluation (default 2000)")
@shared("--dataset", "--data-dir", "--precision", "--device", "--no-progress")
def cmd_train(args) -> int:
    from ..train import diffusion_config, model_config, train, train_config

    if args.label_dropout is not None and not args.conditional:
        raise MinidiffError("--label-dropout applies to --conditional training only")
    if args.init and (args.conditional or args.channels):
        raise MinidiffError("--init takes the model's layout from the checkpoint; drop "
                            "--conditional / --channels")
    cfg = train_config(args.recipe, args.original_recipe,
                       **{k: getattr(args, k) for k in TRAIN_FLAGS})
    model = model_config(args.preset, channels=args.channels, conditional=args.conditional,
                         dataset=args.dataset)
    diffusion = diffusion_config(args.original_recipe, schedule=args.schedule,
                                 prediction=args.prediction)
    summary = train(model, diffusion, cfg, args.out,
                    data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress,
                    preset=None if args.init else args.preset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps({"out": args.out, **summary}))
    return 0


@command("prune", "structured / unstructured pruning of a checkpoint",
         "minidiff prune runs/base --structured 0.1 --unstructured 0.3 --out runs/pruned0",
         "minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned")
@shared("checkpoint")
@arg("--structured", type=fraction, metavar="RATIO", help="share of channels removed (L1)")
@arg("--unstructured", type=fraction, metavar="RATIO", help="share of weights zeroed (magnitude)")
@arg("--out", required=True, help="folder to write the pruned model to")
def cmd_prune(args) -> int:
    from ..compress import prune_checkpoint

    print(json.dumps(prune_checkpoint(args.checkpoint, args.out, structured=args.structured,
                                      unstructured=args.unstructured)))
    return 0


@command("quantize", "store a checkpoint as int8 (or fp16) weights",
         "minidiff quantize runs/demo --mode fp16 --out runs/demo-fp16")
@shared("checkpoint")
@arg("--mode", choices=["int8", "fp16"], default="int8")
@arg("--out", required=True, help="folder to write the stored model to")
def cmd_quantize(args) -> int:
    from ..compress import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.checkpoint, args.out, mode=args.mode)))
    return 0


@command("distill", "a few-step student of a checkpoint (progressive or consistency)",
         "minidiff distill runs/reduced --out runs/reduced-2step   # progressive 64 -> 2 steps",
         "minidiff distill runs/reduced --method consistency --steps 1 --out runs/reduced-cd",
         "minidiff distill runs/reduced --out runs/reduced-2step --resume",
         "minidiff sample runs/reduced-2step --n 64 --out s.npz   # its own sampler and steps")
@arg("teacher", help="run folder, .safetensors file or shipped model name")
@arg("--out", required=True, help="student run folder to create")
@arg("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
@arg("--method", choices=DISTILL_METHODS, help="default: the first; every default is "
     "DistillConfig's (docs/distillation.md)")
@arg("--steps", type=positive_int, help="the student's network evaluations per image")
@arg("--teacher-steps", type=positive_int, help="progressive: the teacher's DDIM steps, halved "
     "each round; consistency: its solver grid")
@arg("--updates", type=positive_int, help="optimizer steps in all")
@arg("--batch-size", type=positive_int)
@arg("--lr", type=positive_float, help="peak learning rate of each round")
@arg("--seed", type=nonneg_int)
@arg("--subset", type=positive_int, metavar="N", help="distil on the first N images only")
@arg("--checkpoint-every", type=positive_int, metavar="N", help="save every N steps")
@shared("--data-dir", "--precision", "--device", "--no-progress")
def cmd_distill(args) -> int:
    from ..distill import DistillConfig, distill

    flags = ("method", "steps", "teacher_steps", "updates", "batch_size", "lr", "seed",
             "subset", "checkpoint_every", "precision", "device")
    cfg = DistillConfig(**{k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    summary = distill(args.teacher, args.out, cfg, data_dir=args.data_dir, resume=args.resume,
                      progress=not args.no_progress)
    print(json.dumps({"out": args.out, **summary}))
    return 0


@command("study", "the whole compression study, resumable, with a report",
         "minidiff study --preset smoke --out runs/study-smoke     # about a minute",
         "minidiff study --preset standard --out runs/study   # ~90 min; re-run to resume")
@arg("--out", required=True, help="study folder; the same command resumes it")
@arg("--preset", choices=STUDY_PRESETS, default="smoke", help="smoke ~1 min, quick ~35 min, "
     "standard ~90 min, long ~4.5 h (2-core CPU with bf16), paper: for a GPU")
@arg("--seed", type=nonneg_int, help="training and metrics seed (default 0)")
@arg("--only", type=lambda s: tuple(s.split(",")), default=(), metavar="ARCH[,ARCH]",
     help="train only these models' stages (baseline, pruned, reduced, shallow), then stop")
@arg("--export", metavar="DIR", help="then copy its models to DIR by name (the shipped ones: "
     "src/minidiff/assets/models)")
@shared("--dataset", "--data-dir", "--no-progress")
def cmd_study(args) -> int:
    from ..study import export, run_study, summary_lines

    if args.only and args.export:
        raise MinidiffError("--export needs the whole study: run it again without --only")
    seed = {} if args.seed is None else {"seed": args.seed}
    rows = run_study(args.preset, args.out, dataset=args.dataset, data_dir=args.data_dir,
                     progress=not args.no_progress, only=args.only, **seed)
    if args.only:
        return 0
    print(summary_lines(rows, Path(args.out)))
    if args.export:
        print(f"exported {', '.join(export(args.out, args.export))} to {args.export}")
    return 0
