"""The subcommands, in the order ``minidiff --help`` lists them: each one's flags as decorators
(:mod:`.common`) on its handler, which imports the library inside itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ... import settings as s
from ...errors import MinidiffError
from ...study.presets import PRESETS as STUDY_PRESETS
from ...study.reference import RECIPES
from . import common as c
from .common import arg, command, given, group, options, shared

S = s.SamplingConfig

group("data", "list or fetch datasets", "minidiff data list",
      "minidiff data fetch mnist    # into ~/.cache/minidiff/data/mnist")


@command("data list", "datasets, where each was found, whether it verified")
@arg("--data-dir", help="folder searched first")
@shared("--json")
def cmd_data_list(args):
    from ...data import dataset_status, status_table

    rows = [dataset_status(name, args.data_dir) for name in s.DATASET_NAMES]
    print(json.dumps(rows, indent=2) if args.json else status_table(rows))


@command("data fetch", "download a dataset from its official mirror")
@arg("name", choices=s.DATASET_NAMES)
@arg("--dest", help="target folder (default: the cache's data/NAME)")
def cmd_data_fetch(args):
    from ...data import fetch

    print(f"{args.name}: downloaded and verified in {fetch(args.name, args.dest)}")


@command("models", "model presets with parameters and MACs", "minidiff models")
@shared("--json")
def cmd_models(args):
    from ...study.report import preset_rows, preset_table

    rows = preset_rows()
    print(json.dumps(rows, indent=2) if args.json else preset_table(rows))


@command("train", "train a DDPM noise predictor",
         "minidiff train --preset reduced --epochs 5 --out runs/reduced",
         "minidiff train --out runs/reduced --resume    # continue a stopped run")
@arg("--out", required=True, help="run folder to create")
@arg("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
@arg("--preset", choices=s.MODEL_PRESETS, default="reduced", help="model architecture")
@arg("--channels", type=c.channels, metavar="C1,C2,...", help="the preset's widths replaced, "
     "e.g. 8,16 (multiples of 8)")
@arg("--conditional", action="store_true", help="class-conditional (and, by label dropout, "
     "unconditional)")
@options(s.TrainConfig, "label_dropout")
@options(s.TrainConfig, "epochs", "steps", exclusive="length")
@options(s.TrainConfig, "minutes", "batch_size", "lr")
@arg("--original-recipe", action="store_true", help="the recipe before the convergence "
     "benchmark (eps, linear, lr 1e-3, 200 warm-up steps, batch 128)")
@arg("--schedule", choices=s.SCHEDULES, help="beta schedule, T=1000 (default cosine)")
@options(s.TrainConfig, "init")
@arg("--recipe", choices=list(RECIPES), help="with --init: the study's (" + "; ".join(
     f"{k}: {r['epochs']} epochs, lr {r['lr']:g}" for k, r in RECIPES.items()) + ")")
@options(s.TrainConfig, "seed", "subset", "checkpoint_every", "keep_checkpoints")
@arg("--prediction", choices=s.PREDICTIONS, help="what the network predicts (default v)")
@options(s.TrainConfig, "loss_weighting", "noise_levels", "ema_power", "ema_std")
@options(s.TrainConfig, "eval_every", "eval_n", "dataset")
@shared("--data-dir")
@options(s.TrainConfig, "precision", "device")
@shared("--no-progress")
def cmd_train(args):
    from ...study.recipes import run_configs
    from ...train import train

    model, diffusion, cfg = run_configs(args.preset, args.recipe, args.original_recipe,
                                        channels=args.channels, conditional=args.conditional,
                                        schedule=args.schedule, prediction=args.prediction,
                                        **given(args, s.TrainConfig))
    summary = train(model, diffusion, cfg, args.out, data_dir=args.data_dir, resume=args.resume,
                    progress=not args.no_progress, preset=None if args.init else args.preset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps({"out": args.out, **summary}))


@command("sample", "generate images from a checkpoint",
         "minidiff sample runs/demo --n 100 --out samples.npz --grid grid.png",
         "minidiff sample runs/demo --sampler ddpm --steps 1000 --out ddpm.npz")
@shared("checkpoint")
@arg("--out", required=True, help="output .npz (images uint8 [N x 28 x 28])")
@arg("--grid", help="also write a PNG grid of the samples")
@arg("--n", type=c.positive_int, default=64, help="number of images (default %(default)s)")
@options(S, "sampler", "steps", "spacing", "rho", "eta")
@arg("--class", dest="classes", metavar="C", help="a conditional model's class, or all (n/10 each)")
@options(S, "guidance", "seed", "batch_size", "precision")
@arg("--device", choices=s.DEVICES, default="auto")
@shared("--no-progress")
@arg("--compile", action="store_true", help="through torch.compile (pays off in long runs)")
@shared("--force")
def cmd_sample(args):
    from ...generation import sample_to_file

    out = Path(args.out)
    c.refuse_existing(args, out=out, grid=args.grid)
    if out.suffix == ".npz":  # its sidecar, named after it
        c.refuse_existing(args, out=out.with_suffix(".json"))
    print(json.dumps(sample_to_file(args.checkpoint, args.out, S.from_flags(**given(args, S)),
                                    n=args.n, classes=args.classes, device=args.device,
                                    grid=args.grid, progress=not args.no_progress,
                                    compile=args.compile)))


@command("grid", "render a sample file as a PNG grid",
         "minidiff grid samples.npz --out grid.png --n 64")
@arg("samples", help="an .npz written by `minidiff sample`")
@arg("--out", required=True, help="output .png")
@arg("--n", type=c.positive_int, default=100, help="at most this many (default %(default)s)")
@arg("--nrow", type=c.positive_int, help="images per row (default ~sqrt n)")
@shared("--force")
def cmd_grid(args):
    from ...files import save_grid
    from ...samplefiles import load_samples

    c.refuse_existing(args, out=args.out)
    images = load_samples(args.samples)[: args.n]
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.out} ({len(images)} images)")


group("classifier", "train or evaluate the metrics' feature classifier",
      "minidiff classifier evaluate", "minidiff classifier train --dataset fashion-mnist")


@command("classifier train", "rebuild a shipped classifier from its recipe")
@shared("--dataset", "--data-dir")
@arg("--epochs", type=c.positive_int, help="default: the recipe's")
@arg("--out", help="folder for weights + card (default: the package's assets, which it "
     "rebuilds)")
@shared("--force")
def cmd_classifier_train(args):
    from ...classifier import retrain, weights_path

    if args.out:
        weights = weights_path(args.dataset, Path(args.out))
        c.refuse_existing(args, out=weights)
        c.refuse_existing(args, out=weights.with_suffix(".json"))
    path, card = retrain(args.dataset, epochs=args.epochs, data_dir=args.data_dir, out=args.out)
    print(f"{args.dataset}: test accuracy {card['test_accuracy']:.4f}; wrote {path}")


@command("classifier evaluate", "test accuracy of the shipped classifier")
@shared("--dataset", "--data-dir")
@arg("--json", metavar="OUT", help="also write {\"test_accuracy\": ...} here")
@shared("--force")
def cmd_classifier_evaluate(args):
    from ...classifier import shipped_accuracy
    from ...files import atomic_write_text

    c.refuse_existing(args, json=args.json)
    acc, n, card = shipped_accuracy(args.dataset, args.data_dir)
    print(f"{args.dataset} classifier: test accuracy {acc:.4f} on {n} images "
          f"(card: {card['test_accuracy']:.4f})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"test_accuracy": acc}) + "\n")


@command("eval", "quality metrics of samples, with real-data floors",
         "minidiff eval runs/demo/samples.npz", "minidiff eval --model runs/demo --steps 100")
@arg("samples", nargs="?", help="an .npz written by `minidiff sample`")
@arg("--real", action="store_true", help="print the real-data floors alone")
@arg("--model", metavar="CKPT", help="efficiency of a checkpoint instead")
@arg("--n", type=c.positive_int, default=10000, help="with --real: images")
@arg("--reference", choices=["test", "train"], default="test")
@arg("--dataset", choices=s.DATASET_NAMES, help="default: the samples' dataset")
@shared("--data-dir")
@arg("--json", metavar="OUT", help="also write the results as JSON")
@options(S, "sampler", "steps", "spacing", "rho", section="with --model")
@arg("--time-n", type=c.positive_int, default=256, section="with --model", help="samples timed, "
     "scaled to 10,000 (default %(default)s)")
@shared("--force")
def cmd_eval(args):
    from ...files import atomic_write_text

    c.refuse_existing(args, json=args.json)
    if args.model:
        from ..efficiency import efficiency

        res = efficiency(args.model, S.from_flags(**given(args, S)), time_n=args.time_n)
        print("\n".join(f"{k:<22} {v}" for k, v in res.items()))
    elif args.real:
        from ...metrics import Reference, floor, metrics_table

        res = floor(Reference(args.dataset or "mnist", args.reference, args.data_dir), args.n)
        print(f"real-data floor: {args.n} real images vs the {args.reference} split")
        print(metrics_table(res, label="real"))
    elif args.samples:
        from ...metrics import evaluate, metrics_table
        from ...samplefiles import read_samples

        images, labels, meta = read_samples(args.samples)
        res = evaluate(images, args.dataset or meta.get("dataset") or "mnist", args.reference,
                       args.data_dir, labels=labels)
        print(metrics_table(res, res["floor"]))
    else:
        raise MinidiffError("give a sample file (`minidiff eval samples.npz`), --real or "
                            "--model CKPT")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")


@command("demo", "train the reduced model briefly (class-conditional), draw each digit, write "
         "a report",
         "minidiff demo            # 8.5 minutes of training, 9-12 in all on 2 cores: runs/demo/",
         "minidiff demo --minutes 3 --out runs/demo3   # a shorter look",
         "minidiff demo --steps 3200 --out runs/demo-b   # a recorded step count, no probe")
@arg("--out", default="runs/demo", help="run folder (default %(default)s)")
@arg("--minutes", type=c.positive_float, default=s.DEMO_MINUTES, help="training time on this "
     "machine, turned into steps by a short probe (default %(default)s)")
@arg("--steps", type=c.positive_int, help="training steps instead of --minutes")
@arg("--n", type=c.positive_int, default=100, help="images to sample, n / 10 of each digit "
     "(default %(default)s)")
@shared("--data-dir")
@arg("--force", action="store_true", help="start over in --out (only the demo's own files "
     "are removed)")
def cmd_demo(args):
    from ..demo import run_demo

    report = run_demo(args.out, steps=args.steps, minutes=args.minutes, n=args.n,
                      data_dir=args.data_dir, force=args.force)
    print(f"demo finished: {report}")


@command("bench", "training and sampling speed beside diffusers, vs the matmul peak",
         "minidiff bench", "minidiff bench --presets reduced --n 100 --out /tmp/bench")
@arg("--presets", nargs="+", choices=s.MODEL_PRESETS, default=["reduced", "baseline", "shallow"])
@arg("--n", type=c.positive_int, default=500, help="samples timed per job (default %(default)s)")
@arg("--steps", type=c.positive_int, default=S.steps, help="network evaluations per sample")
@arg("--precision", default="auto", **s.PRECISION_FLAG)
@arg("--no-anchor", action="store_true", help="skip the diffusers rows")
@arg("--compile", action="store_true", help="also time the default sampler compiled")
@arg("--out", default="benchmarks/results", help="folder for bench.json and bench.md")
def cmd_bench(args):
    from ..bench import write_bench

    written = write_bench(args.out, ("minidiff bench " + " ".join(sys.argv[2:])).strip(),
                          presets=tuple(args.presets), n=args.n, steps=args.steps,
                          precision=args.precision, anchor=not args.no_anchor,
                          compile_=args.compile)
    print("wrote {} and {}".format(*written))


@command("prune", "structured / unstructured pruning of a checkpoint",
         "minidiff prune runs/base --structured 0.1 --unstructured 0.3 --out runs/pruned0",
         "minidiff train --init runs/pruned0 --recipe pruned --out runs/pruned")
@shared("checkpoint")
@arg("--structured", type=c.fraction, metavar="RATIO", help="share of channels removed (L1)")
@arg("--unstructured", type=c.fraction, metavar="RATIO", help="share of weights zeroed "
     "(magnitude)")
@arg("--out", required=True, help="folder to write the pruned model to")
@shared("--force")
def cmd_prune(args):
    from ...compress import prune_checkpoint

    print(json.dumps(prune_checkpoint(args.checkpoint, args.out, structured=args.structured,
                                      unstructured=args.unstructured, force=args.force)))


@command("quantize", "store a checkpoint as int8 (or fp16) weights",
         "minidiff quantize runs/demo --mode fp16 --out runs/demo-fp16")
@shared("checkpoint")
@arg("--mode", choices=["int8", "fp16"], default="int8")
@arg("--out", required=True, help="folder to write the stored model to")
@shared("--force")
def cmd_quantize(args):
    from ...compress import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.checkpoint, args.out, mode=args.mode,
                                         force=args.force)))


@command("distill", "a few-step student of a checkpoint (progressive, consistency, adversarial, "
         "ECT, distribution matching)",
         "minidiff distill runs/reduced --out runs/reduced-2step   # progressive 64 -> 2 steps",
         "minidiff distill runs/reduced --method consistency --steps 1 --out runs/reduced-cd",
         "minidiff distill runs/reduced --method ect --updates 20000 --lr 1e-4 --out runs/ect",
         "minidiff distill runs/reduced --method dmd --init runs/reduced-2step --lr 2.5e-5 "
         "--updates 750 --out runs/reduced-dmd   # refine a 2-step student",
         "minidiff distill runs/reduced --method dmd --pairs 16384 --distill-weight 1 --lr 1e-4 "
         "--updates 4500 --out runs/dmd   # from the teacher, held to its own samples",
         "minidiff distill runs/reduced --out runs/reduced-2step --resume",
         "minidiff sample runs/reduced-2step --n 64 --out s.npz   # its own sampler and steps")
@arg("teacher", help="run folder, .safetensors file or shipped model name")
@arg("--out", required=True, help="student run folder to create")
@arg("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
@options(s.DistillConfig, "method", "steps", "teacher_steps", "init", "distill_weight",
         "fake_updates", "simulate", "pairs", "pair_fraction", "gan_weight", "stages",
         "dropout", "updates", "batch_size", "lr", "seed", "subset", "checkpoint_every")
@shared("--data-dir")
@options(s.DistillConfig, "precision", "device")
@shared("--no-progress")
def cmd_distill(args):
    from ...distill import distill

    summary = distill(args.teacher, args.out, s.DistillConfig(**given(args, s.DistillConfig)),
                      data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({"out": args.out, **summary}))


@command("study", "the whole compression study, resumable, with a report",
         "minidiff study --preset smoke --out runs/study-smoke     # about a minute",
         "minidiff study --preset standard --out runs/study   # ~90 min; re-run to resume")
@arg("--out", required=True, help="study folder; the same command resumes it")
@arg("--preset", choices=list(STUDY_PRESETS), default="smoke", help="smoke ~1 min, quick ~35 min, "
     "standard ~90 min, long ~4.5 h (2-core CPU with bf16), paper: for a GPU")
@arg("--seed", type=c.nonneg_int, help="training and metrics seed (default 0)")
@arg("--only", type=lambda text: tuple(text.split(",")), default=(), metavar="ARCH[,ARCH]",
     help="train only these models' stages (baseline, pruned, reduced, shallow), then stop")
@arg("--export", metavar="DIR", help="then copy its models to DIR by name (the shipped ones: "
     "src/minidiff/assets/models; models already there need --force)")
@shared("--dataset", "--data-dir", "--no-progress")
@arg("--force", action="store_true", help="replace models already in --export DIR, and write "
     "into an --out that holds something other than this study")
def cmd_study(args):
    from ...study.pipeline import ARCH, export, refuse_export, run_study, summary_lines

    if args.only and args.export:
        raise MinidiffError("--export needs the whole study: run it again without --only")
    if args.export:  # the names every export writes, refused now rather than after the study
        refuse_export(args.export, ARCH, force=args.force)
    seed = {} if args.seed is None else {"seed": args.seed}
    rows = run_study(args.preset, args.out, dataset=args.dataset, data_dir=args.data_dir,
                     progress=not args.no_progress, only=args.only, force=args.force, **seed)
    if not args.only:
        print(summary_lines(rows, Path(args.out)))
    if args.export:
        written = export(args.out, args.export, force=args.force)
        print(f"exported {', '.join(written)} to {args.export}")


@command("serve", "a local web page to sample the shipped models",
         "minidiff serve            # then open http://127.0.0.1:7860",
         "minidiff serve --host 0.0.0.0 --allow-network   # open to every machine that reaches it")
@arg("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
@arg("--allow-network", action="store_true", help="allow a --host other than loopback: anyone "
     "who reaches it can use the page")
@arg("--port", type=c.positive_int, default=7860)
@arg("--max-seconds", type=c.positive_float, default=60.0, help="one request's sampling limit")
def cmd_serve(args):
    from ..serve import Binding, serve

    binding = Binding(args.host, args.port, network=args.allow_network)
    print(f"minidiff serve: {binding.url} (Ctrl-C to stop)", flush=True)
    if args.allow_network:
        print(f"note: --allow-network: the page is open to the network; every machine that "
              f"reaches {args.host}:{args.port} can run the models on this CPU", flush=True)
    serve(binding, args.max_seconds)
