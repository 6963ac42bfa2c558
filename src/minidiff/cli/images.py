"""Images, their quality and their speed: ``sample``, ``grid``, ``eval``, ``demo``, ``bench``,
``serve``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinidiffError
from ..settings import DATASET_NAMES, MODEL_PRESETS, PRECISIONS, SAMPLER_NAMES, SPACINGS
from ..settings import SamplingConfig as Sampling
from .common import arg, command, nonneg_int, positive_float, positive_int, shared

D = Sampling()  # the sampling defaults, as --help shows them


@command("sample", "generate images from a checkpoint",
         "minidiff sample runs/demo --n 100 --out samples.npz --grid grid.png",
         "minidiff sample runs/demo --sampler ddpm --steps 1000 --out ddpm.npz")
@shared("checkpoint")
@arg("--out", required=True, help="output .npz (images uint8 [N x 28 x 28])")
@arg("--grid", help="also write a PNG grid of the samples")
@arg("--n", type=positive_int, default=64, help="number of images (default %(default)s)")
@arg("--sampler", choices=SAMPLER_NAMES, default=D.sampler, help="default %(default)s; "
     "docs/sampling.md compares them")
@arg("--steps", type=positive_int, default=D.steps, help="network evaluations (default "
     "%(default)s; the original DDPM takes 1000)")
@arg("--spacing", choices=SPACINGS, default=D.spacing, help="timesteps --steps keeps "
     "(default %(default)s)")
@arg("--eta", type=float, help="DDIM's noise scale (0..1; default 0)")
@arg("--class", dest="classes", metavar="C", help="a conditional model's class, or all (n/10 each)")
@arg("--guidance", type=float, help=f"with --class: classifier-free guidance scale (default "
     f"{D.guidance}; 0 unconditional)")
@arg("--seed", type=nonneg_int, default=D.seed)
@arg("--batch-size", type=positive_int, default=D.batch_size, help="default: 256 bf16, 128 fp32")
@arg("--precision", choices=PRECISIONS, default=D.precision, help="auto (default): bf16 where "
     "the CPU/GPU runs it natively, else fp32")
@shared("--device", "--no-progress")
@arg("--compile", action="store_true", help="through torch.compile (pays off in long runs)")
def cmd_sample(args) -> int:
    from ..generation import sample_to_file

    if args.guidance is not None and args.classes is None:
        raise MinidiffError("--guidance needs --class (a digit or all)")
    given = {k: getattr(args, k) for k in ("eta", "guidance") if getattr(args, k) is not None}
    cfg = Sampling(args.sampler, args.steps, args.spacing, precision=args.precision,
                   batch_size=args.batch_size, seed=args.seed, **given)
    print(json.dumps(sample_to_file(args.checkpoint, args.out, cfg, n=args.n,
                                    classes=args.classes, device=args.device, grid=args.grid,
                                    progress=not args.no_progress, compile=args.compile)))
    return 0


@command("grid", "render a sample file as a PNG grid",
         "minidiff grid samples.npz --out grid.png --n 64")
@arg("samples", help="an .npz written by `minidiff sample`")
@arg("--out", required=True, help="output .png")
@arg("--n", type=positive_int, default=100, help="at most this many (default %(default)s)")
@arg("--nrow", type=positive_int, help="images per row (default ~sqrt n)")
def cmd_grid(args) -> int:
    from ..generation import load_samples
    from ..io import save_grid

    if Path(args.out).suffix.lower() != ".png":
        raise MinidiffError(f"--out {args.out}: the grid must be a .png file")
    images = load_samples(args.samples)[: args.n]
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.out} ({len(images)} images)")
    return 0


@command("eval", "quality metrics of samples, with real-data floors",
         "minidiff eval runs/demo/samples.npz", "minidiff eval --model runs/demo --steps 100")
@arg("samples", nargs="?", help="an .npz written by `minidiff sample`")
@arg("--real", action="store_true", help="print the real-data floors alone")
@arg("--model", metavar="CKPT", help="efficiency of a checkpoint instead")
@arg("--n", type=positive_int, default=10000, help="with --real: images")
@arg("--reference", choices=["test", "train"], default="test")
@arg("--dataset", choices=DATASET_NAMES, help="default: the samples' dataset")
@shared("--data-dir")
@arg("--json", metavar="OUT", help="also write the results as JSON")
@arg("--sampler", choices=SAMPLER_NAMES, default=D.sampler, help="with --model")
@arg("--steps", type=positive_int, default=D.steps, help="with --model")
@arg("--spacing", choices=SPACINGS, default=D.spacing, help="with --model")
@arg("--time-n", type=positive_int, default=256, help="with --model: samples timed, scaled to "
     "10,000 (default %(default)s)")
def cmd_eval(args) -> int:
    from ..io import atomic_write_text

    if args.model:
        from ..efficiency import efficiency

        res = efficiency(args.model, Sampling(args.sampler, args.steps, args.spacing),
                         time_n=args.time_n)
        print("\n".join(f"{k:<22} {v}" for k, v in res.items()))
    elif args.real:
        from ..metrics import Reference, floor, metrics_table

        res = floor(Reference(args.dataset or "mnist", args.reference, args.data_dir), args.n)
        print(f"real-data floor: {args.n} real images vs the {args.reference} split")
        print(metrics_table(res, label="real"))
    elif args.samples:
        from ..generation import read_samples
        from ..metrics import evaluate, metrics_table

        images, labels, meta = read_samples(args.samples)
        res = evaluate(images, args.dataset or meta.get("dataset") or "mnist", args.reference,
                       args.data_dir, labels=labels)
        print(metrics_table(res, res["floor"]))
    else:
        raise MinidiffError("give a sample file (`minidiff eval samples.npz`), --real or "
                            "--model CKPT")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


@command("demo", "train the reduced model briefly, sample, write a report",
         "minidiff demo            # ~10 minutes on a 2-core CPU, writes runs/demo/")
@arg("--out", default="runs/demo", help="run folder (default %(default)s)")
@arg("--steps", type=positive_int, help="training steps (default: the demo's)")
@arg("--n", type=positive_int, default=100, help="images to sample (default %(default)s)")
@shared("--data-dir")
@arg("--force", action="store_true", help="overwrite an existing demo run")
def cmd_demo(args) -> int:
    from ..demo import run_demo

    report = run_demo(args.out, steps=args.steps, n=args.n, data_dir=args.data_dir,
                      force=args.force)
    print(f"demo finished: {report}")
    return 0


@command("bench", "training and sampling speed beside diffusers, vs the matmul peak",
         "minidiff bench", "minidiff bench --presets reduced --n 100 --out /tmp/bench")
@arg("--presets", nargs="+", choices=MODEL_PRESETS, default=["reduced", "baseline", "shallow"])
@arg("--n", type=positive_int, default=500, help="samples timed per job (default %(default)s)")
@arg("--steps", type=positive_int, default=D.steps, help="network evaluations per sample")
@shared("--precision")
@arg("--no-anchor", action="store_true", help="skip the diffusers rows")
@arg("--compile", action="store_true", help="also time the default sampler compiled")
@arg("--out", default="benchmarks/results", help="folder for bench.json and bench.md")
def cmd_bench(args) -> int:
    from ..bench import write_bench

    written = write_bench(args.out, ("minidiff bench " + " ".join(sys.argv[2:])).strip(),
                          presets=tuple(args.presets), n=args.n, steps=args.steps,
                          precision=args.precision, anchor=not args.no_anchor,
                          compile_=args.compile)
    print("wrote {} and {}".format(*written))
    return 0


@command("serve", "a local web page to sample the shipped models",
         "minidiff serve            # then open http://127.0.0.1:7860")
@arg("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
@arg("--port", type=positive_int, default=7860)
@arg("--max-seconds", type=positive_float, default=60.0, help="one request's sampling limit")
def cmd_serve(args) -> int:
    from ..serve import serve

    print(f"minidiff serve: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    serve(args.host, args.port, args.max_seconds)
    return 0
