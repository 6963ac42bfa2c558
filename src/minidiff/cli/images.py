"""Images, their quality and their speed: ``sample``, ``grid``, ``eval``, ``demo``, ``bench``,
``serve``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinidiffError
from ..settings import DATASET_NAMES, DEVICES, MODEL_PRESETS, PRECISIONS, SAMPLER_NAMES, SPACINGS
from ..settings import SamplingConfig as Sampling
from .common import CKPT, command, data_dir, flag, nonneg_int, positive_float, positive_int

D = Sampling()  # the sampling defaults, as --help shows them


def add_sample(sub) -> None:
    s = command(sub, "sample", "generate images from a checkpoint", cmd_sample,
                "minidiff sample runs/demo --n 100 --out samples.npz --grid grid.png",
                "minidiff sample runs/demo/model.safetensors --n 64 --steps 250 --out s.npz",
                "minidiff sample runs/demo --sampler dpmpp --steps 20 --n 64 --out fast.npz")
    s.add_argument("checkpoint", help=CKPT)
    s.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--steps", type=positive_int, default=D.steps, help="network evaluations, "
                   f"timesteps respaced over T (default {D.steps}; T=1000 is the original DDPM)")
    s.add_argument("--sampler", choices=SAMPLER_NAMES, default=D.sampler, help="ddpm "
                   "(ancestral), ddim (eta 0: deterministic), dpmpp (DPM-Solver++(2M)), dpmpp-sde "
                   f"(SDE-DPM-Solver++(2M), the default: within 10%% of DDPM-1000's quality in "
                   f"{D.steps} steps)")
    s.add_argument("--eta", type=float, help="DDIM's noise scale (0..1; default 0)")
    s.add_argument("--spacing", choices=SPACINGS, default=D.spacing, help="which timesteps "
                   f"--steps keeps: uniform, trailing (default {D.spacing}), quadratic (denser "
                   "at low noise)")
    s.add_argument("--seed", type=nonneg_int, default=D.seed)
    s.add_argument("--batch-size", type=positive_int, default=D.batch_size,
                   help="images per batch (default: 256 in bf16, 128 in fp32: the fastest "
                        "measured)")
    s.add_argument("--precision", choices=PRECISIONS, default=D.precision,
                   help="auto (default): bf16 autocast where the CPU/GPU supports it")
    s.add_argument("--device", choices=DEVICES, default="auto")
    s.add_argument("--out", required=True, help="output .npz (images uint8 [N x 28 x 28])")
    s.add_argument("--grid", help="also write a PNG grid of the samples")
    s.add_argument("--class", dest="classes", metavar="C", help="a conditional model's class "
                   "id, or all for a balanced set (n / 10 each, labels stored in the .npz, one "
                   "grid row per class)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale with --class "
                   f"(0 unconditional, 1 conditional; default {D.guidance}, see "
                   "benchmarks/results/guidance_sweep.md)")
    flag(s, "--compile", "run the network through torch.compile (eager if compiling fails); "
                         "pays off only for long runs, see benchmarks/results/bench.md")
    flag(s, "--no-progress", "no progress bar")


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


def add_grid(sub) -> None:
    g = command(sub, "grid", "render a sample file as a PNG grid", cmd_grid,
                "minidiff grid samples.npz --out grid.png --n 64")
    g.add_argument("samples", help="an .npz written by `minidiff sample`")
    g.add_argument("--out", required=True, help="output .png")
    g.add_argument("--n", type=positive_int, default=100, help="at most this many (default 100)")
    g.add_argument("--nrow", type=positive_int, help="images per row (default ~sqrt n)")


def cmd_grid(args) -> int:
    from ..generation import load_samples
    from ..io import save_grid

    if Path(args.out).suffix.lower() != ".png":
        raise MinidiffError(f"--out {args.out}: the grid must be a .png file")
    images = load_samples(args.samples)[: args.n]
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.out} ({len(images)} images)")
    return 0


def add_eval(sub) -> None:
    e = command(sub, "eval", "quality metrics of samples, with real-data floors", cmd_eval,
                "minidiff eval runs/demo/samples.npz", "minidiff eval --real --n 10000",
                "minidiff eval --model runs/demo --steps 100 --time-n 256")
    e.add_argument("samples", nargs="?", help="an .npz written by `minidiff sample`")
    flag(e, "--real", "print the real-data floors alone")
    e.add_argument("--model", metavar="CKPT", help="efficiency of a checkpoint instead")
    e.add_argument("--n", type=positive_int, default=10000, help="with --real: images")
    e.add_argument("--reference", choices=["test", "train"], default="test")
    e.add_argument("--dataset", choices=DATASET_NAMES, help="default: the samples' dataset")
    data_dir(e)
    e.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    e.add_argument("--sampler", choices=SAMPLER_NAMES, default=D.sampler,
                   help="with --model (default: `minidiff sample`'s)")
    e.add_argument("--steps", type=positive_int, default=D.steps,
                   help="with --model: sampler steps (default: `minidiff sample`'s)")
    e.add_argument("--spacing", choices=SPACINGS, default=D.spacing, help="with --model")
    e.add_argument("--time-n", type=positive_int, default=256, help="with --model: samples "
                   "actually timed; the 10,000-sample time is extrapolated from them (default "
                   "256; 10000 times the real thing)")


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


def add_demo(sub) -> None:
    d = command(sub, "demo", "train the reduced model briefly, sample, write a report", cmd_demo,
                "minidiff demo            # ~10 minutes on a 2-core CPU, writes runs/demo/")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--steps", type=positive_int, help="training steps (default: the demo's)")
    d.add_argument("--n", type=positive_int, default=100, help="images to sample (default 100)")
    data_dir(d, "MNIST's")
    flag(d, "--force", "overwrite an existing demo run")


def cmd_demo(args) -> int:
    from ..demo import run_demo

    report = run_demo(args.out, steps=args.steps, n=args.n, data_dir=args.data_dir,
                      force=args.force)
    print(f"demo finished: {report}")
    return 0


def add_bench(sub) -> None:
    b = command(sub, "bench", "training and sampling speed beside diffusers, vs the matmul "
                "peak", cmd_bench, "minidiff bench",
                "minidiff bench --presets reduced --n 100 --out /tmp/bench")
    b.add_argument("--presets", nargs="+", choices=MODEL_PRESETS,
                   default=["reduced", "baseline", "shallow"])
    b.add_argument("--n", type=positive_int, default=500,
                   help="samples timed per sampling job, scaled to 10,000 (default 500)")
    b.add_argument("--steps", type=positive_int, default=D.steps, help="network evaluations "
                   f"per sample (default {D.steps}, the default sampler's)")
    b.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto (default): "
                   "bf16 where the CPU runs it natively, else fp32; bf16 is refused where it "
                   "is emulated")
    flag(b, "--no-anchor", "skip the diffusers rows")
    flag(b, "--compile", "also time the default sampler through torch.compile")
    b.add_argument("--out", default="benchmarks/results",
                   help="folder for bench.json and bench.md (default benchmarks/results)")


def cmd_bench(args) -> int:
    from ..bench import write_bench

    written = write_bench(args.out, ("minidiff bench " + " ".join(sys.argv[2:])).strip(),
                          presets=tuple(args.presets), n=args.n, steps=args.steps,
                          precision=args.precision, anchor=not args.no_anchor,
                          compile_=args.compile)
    print("wrote {} and {}".format(*written))
    return 0


def add_serve(sub) -> None:
    s = command(sub, "serve", "a local web page to sample the shipped models", cmd_serve,
                "minidiff serve            # then open http://127.0.0.1:7860")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=positive_int, default=7860)
    s.add_argument("--max-seconds", type=positive_float, default=60.0,
                   help="stop one request's sampling after this long (default 60)")


def cmd_serve(args) -> int:
    from ..serve import serve

    print(f"minidiff serve: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    serve(args.host, args.port, args.max_seconds)
    return 0
