"""Distilled students beside the teacher's own few-step samplers.

Run: .venv/bin/python benchmarks/distill.py reduced=runs/reduced baseline=runs/baseline \
         [--n 2000] [--time-n 10000] [--repeats 3] [--full-n 10000] [--runs runs/distill] \
         [--student NAME:METHOD=RUN ...] [--shipped NAME=CHECKPOINT ...]
  -> benchmarks/results/distill.{json,md,png}

For each teacher (NAME=CHECKPOINT), distils (or resumes) a progressive student down to 1 step
(its rounds/ keep the 8-, 4- and 2-step students) and a consistency student (sampled at 1, 2,
4, 8 steps), both with DistillConfig's defaults, into --runs/NAME-{progressive,consistency}
(or measures the run a --student names: a run already distilled is read, not re-run;
a progressive run that stopped at 2 steps gives no 1-step row).
An adversarial student is measured (at its own step count, also at --full-n) when
--student NAME:adversarial=RUN names it. A --shipped student (e.g. reduced=reduced-2step) is
measured at its own step count too.
Every row then samples --n images with seed 0 (pseudo-FID against the MNIST test split) and
times --time-n images (median of --repeats, in-process) at 1, 2, 4 and 8 network evaluations:
the students, and DDIM, DPM-Solver++(2M) and SDE-DPM-Solver++(2M) on the teacher; DDPM-1000 at
--n is the reference row (measured last: it costs about as much as all the others). The 2-step
students and the teacher's default sampler are also scored at --full-n. Distillation cost:
wall-clock hours (this machine) and training compute as a fraction of the teacher's
(forward-pass equivalents per image, PER_IMAGE; training: 3). Rows already in the JSON (same
teacher digest, n, time-n, precision) are kept, so an interrupted run resumes.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minidiff.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the command line does, so times match it

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.distill import distill  # noqa: E402
from minidiff.generation import resolve_sampling, time_generation  # noqa: E402
from minidiff.metrics import Reference, evaluate_images  # noqa: E402
from minidiff.runtime import environment, environment_line, resolve_precision  # noqa: E402
from minidiff.settings import DistillConfig, SamplingConfig  # noqa: E402

EVALS = (1, 2, 4, 8)
TEACHER_SAMPLERS = ("ddim", "dpmpp", "dpmpp-sde")

ap = argparse.ArgumentParser()
ap.add_argument("teachers", nargs="*", metavar="NAME=CHECKPOINT")
ap.add_argument("--n", type=int, default=2000)
ap.add_argument("--time-n", type=int, default=10000)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--full-n", type=int, default=10000)
ap.add_argument("--runs", default="runs/distill", help="folder for the students")
ap.add_argument("--student", nargs="*", default=[], metavar="NAME:METHOD=RUN",
                help="this run as the teacher NAME's METHOD student instead of --runs/NAME-METHOD")
ap.add_argument("--shipped", nargs="*", default=[], metavar="NAME=CHECKPOINT",
                help="a shipped student of teacher NAME, sampled as its config says")
ap.add_argument("--updates", type=int, help="DistillConfig.updates (default: its default)")
ap.add_argument("--curves", default="results/study/curves.json",
                help="the teachers' training (images seen, every stage) by NAME: a teacher "
                     "fine-tuned from another stage saw more than its own config's steps")
ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
ap.add_argument("--report", action="store_true",
                help="only write distill.md/png from the JSON (measure nothing)")
args = ap.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
path = out / "distill.json"
PRECISION = resolve_precision("auto", torch.device("cpu"))
settings = {"n": args.n, "time_n": args.time_n, "repeats": args.repeats, "full_n": args.full_n,
            "precision": PRECISION}
res = json.loads(path.read_text()) if path.is_file() else {}
if {k: res.get(k) for k in settings} != settings:
    res = {**settings, "teachers": {}}
res["environment"] = environment()
ref = Reference("mnist", "test")


def save():
    path.write_text(json.dumps(res, indent=2) + "\n")


STUDENTS = dict(s.split("=", 1) for s in args.student)
SHIPPED = dict(s.split("=", 1) for s in args.shipped)


def measure(ckpt, sampler, steps, spacing, n, timing=True):
    """pseudo-FID etc. of n images (seed 0) and the median seconds for time_n of them."""
    model, config, _ = load_checkpoint(ckpt)
    # every row names its sampler and steps: a student's own defaults would replace the ones
    # equal to SamplingConfig's, so its "sampling" entry is set aside here
    config = {k: v for k, v in config.items() if k != "sampling"}
    cfg = SamplingConfig(sampler, steps, spacing, precision=PRECISION, seed=0, guidance=None)
    cfg, sched = resolve_sampling(cfg, config, torch.device("cpu"))
    m = evaluate_images(time_generation(model, sched, cfg, n).result, ref)
    row = {k: round(m[k], 4) for k in ("pseudo_fid", "precision", "recall")}
    if timing:
        row["seconds_time_n"] = round(time_generation(model, sched, cfg, args.time_n,
                                                      warmup=min(256, args.time_n),
                                                      repeats=args.repeats).seconds, 2)
    return row


def run_seconds(metrics):
    """Wall-clock seconds of a distillation run over all its sittings (``elapsed_s`` restarts
    at each resume)."""
    total = last = 0.0
    for line in metrics.read_text().splitlines():
        t = json.loads(line)["elapsed_s"]
        if t < last:
            total += last
        last = t
    return total + last


def teacher_images(name, tconfig):
    """Images the teacher saw in training: its chain's last point in --curves, else (one
    stage) its own steps x batch."""
    curves = Path(args.curves)
    seen = [r["images_seen"] for r in (json.loads(curves.read_text()) if curves.is_file() else [])
            if r["model"] == name]
    return max(seen) if seen else tconfig["step"] * tconfig["train"]["batch_size"]


# forward-pass equivalents per image of one update (training: 3): the student's forward and
# backward, plus two teacher or target forwards (progressive, consistency) or one teacher
# forward and the small discriminator (adversarial)
PER_IMAGE = {"progressive": 5, "consistency": 5, "adversarial": 4}


def progressive_student(run, k):
    """The ``k``-step student of a progressive run: its own (last round's) model, an earlier
    round's (``rounds/K-step``), or None when the run never distilled down to ``k`` steps."""
    if json.loads((run / "config.json").read_text())["sampling"]["steps"] == k:
        return run
    earlier = run / "rounds" / f"{k}-step"
    return earlier if earlier.is_dir() else None


if not args.report:
    res["command"] = ".venv/bin/python benchmarks/distill.py " + " ".join(sys.argv[1:])
for spec in [] if args.report else args.teachers:
    name, ckpt = spec.split("=", 1)
    _, tconfig, digest = load_checkpoint(ckpt)
    entry = res["teachers"].get(name, {})
    if entry.get("sha256") != digest:
        entry = {"checkpoint": ckpt, "sha256": digest, "rows": [], "distill": {}}
    res["teachers"][name] = entry
    # distil (or resume) the two students, and read an adversarial one that --student names;
    # the cost is read back from their metrics.jsonl
    students = {}
    methods = [("progressive", 1), ("consistency", 1)]
    if f"{name}:adversarial" in STUDENTS:
        methods.append(("adversarial", 2))
    for method, steps in methods:
        run = Path(STUDENTS.get(f"{name}:{method}", Path(args.runs) / f"{name}-{method}"))
        given = {"updates": args.updates} if args.updates else {}
        summary = distill(ckpt, run, DistillConfig(method=method, steps=steps, **given),
                          resume=(run / "config.json").is_file())
        cfg = DistillConfig.from_dict(json.loads((run / "config.json").read_text())["distill"])
        entry["distill"][method] = {
            "run": str(run), "updates": summary["total"], "batch_size": cfg.batch_size,
            "teacher_steps": cfg.teacher_steps, "lr": cfg.lr,
            "hours": round(run_seconds(run / "metrics.jsonl") / 3600, 3),
            "init": cfg.init,  # an adversarial student's start: its own cost is not included
            "compute_vs_teacher": round(summary["total"] * cfg.batch_size * PER_IMAGE[method]
                                        / (teacher_images(name, tconfig) * 3), 3)}
        students[method] = run
        save()
    jobs = [("teacher", s, k, "trailing", None, args.n, True)
            for s in TEACHER_SAMPLERS for k in EVALS]
    prog = {k: progressive_student(students["progressive"], k) for k in EVALS}
    jobs += [("progressive", "ddim", k, "trailing", prog[k], args.n, True)
             for k in EVALS if prog[k]]
    jobs += [("consistency", "ddpm", k, "trailing", students["consistency"], args.n,
              True) for k in EVALS]
    if "adversarial" in students:
        adv = students["adversarial"]
        own = json.loads((adv / "config.json").read_text())["sampling"]
        jobs += [("adversarial", own["sampler"], k, own["spacing"], adv, n_, n_ == args.n)
                 for k in own["serves"] for n_ in (args.n, args.full_n)]
    jobs += [("teacher", SamplingConfig().sampler, SamplingConfig().steps,
              SamplingConfig().spacing, None, args.full_n, False),
             ("progressive", "ddim", 2, "trailing", prog[2], args.full_n, False),
             ("consistency", "ddpm", 2, "trailing", students["consistency"],
              args.full_n, False)]
    if name in SHIPPED:
        _, sconfig, sdigest = load_checkpoint(SHIPPED[name])
        own = sconfig["sampling"]
        if entry.get("shipped", {}).get("sha256") != sdigest:  # another student: measure anew
            entry["rows"] = [r for r in entry["rows"] if r["model"] != "shipped"]
        entry["shipped"] = {"checkpoint": SHIPPED[name], "sha256": sdigest}
        jobs += [("shipped", own["sampler"], k, own["spacing"], SHIPPED[name], n_, n_ == args.n)
                 for k in own["serves"] for n_ in (args.n, args.full_n)]
    # the reference row last: it costs as much as all the others together (1,000 evaluations)
    jobs.append(("teacher", "ddpm", 1000, "uniform", None, args.n, False))
    done = {(r["model"], r["sampler"], r["steps"], r["n"]) for r in entry["rows"]}
    for model, sampler, steps, spacing, where, n, timing in jobs:
        if (model, sampler, steps, n) in done:
            continue
        row = {"model": model, "sampler": sampler, "steps": steps, "spacing": spacing, "n": n,
               **measure(where or ckpt, sampler, steps, spacing, n, timing)}
        entry["rows"].append(row)
        save()
        print(json.dumps({"teacher": name, **row}), flush=True)

# ------------------------------------------------------------------------------ report
env = res["environment"]
lines = [f"# Distilled students beside the teacher's few-step samplers "
         f"({environment_line(env)}; {PRECISION})", "",
         f"Pseudo-FID of {args.n} samples (seed 0) against the MNIST test split, and seconds for "
         f"{args.time_n} samples (median of {args.repeats}, in-process). Students: "
         "DistillConfig's defaults, or the runs --student names (updates in the last table); "
         "progressive's 8/4/2-step rows are its rounds' students.", ""]
for name, entry in res["teachers"].items():
    ddpm = next((r for r in entry["rows"] if r["steps"] == 1000), None)
    shipped = f"; shipped student `{entry['shipped']['checkpoint']}`" if "shipped" in entry else ""
    lines += [f"## {name} (`{entry['checkpoint']}`{shipped})", "",
              "| model | sampler | evaluations | n | pseudo-FID | vs DDPM-1000 | precision | "
              f"recall | s / {args.time_n} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in entry["rows"]:
        vs = f"{r['pseudo_fid'] / ddpm['pseudo_fid'] - 1:+.0%}" if ddpm else ""
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['n']} | "
                     f"{r['pseudo_fid']:.3f} | {vs} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"{r.get('seconds_time_n', '')} |")
    lines += ["", "| method | updates | wall-clock hours | compute vs the teacher's training | "
              "starts from (its cost not included) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {d['updates']} | {d['hours']} | {d['compute_vs_teacher']:.2f}x | "
              f"{d.get('init') or 'the teacher'} |" for m, d in entry["distill"].items()]
    lines.append("")
lines.append(f"Command: `{res.get('command', '')}`")
(out / "distill.md").write_text("\n".join(lines) + "\n")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, len(res["teachers"]), figsize=(5 * len(res["teachers"]), 4),
                         squeeze=False)
for ax, (name, entry) in zip(axes[0], res["teachers"].items(), strict=True):
    shipped = sorted({("shipped", r["sampler"]) for r in entry["rows"] if r["model"] == "shipped"})
    for model, sampler in [("teacher", s) for s in TEACHER_SAMPLERS] + [
            ("progressive", "ddim"), ("consistency", "ddpm"), ("adversarial", "ddim"),
            *shipped]:
        pts = sorted((r["steps"], r["pseudo_fid"]) for r in entry["rows"]
                     if r["model"] == model and r["sampler"] == sampler and r["n"] == args.n)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{model}: {sampler}")
    ddpm = [r["pseudo_fid"] for r in entry["rows"] if r["steps"] == 1000]
    if ddpm:
        ax.axhline(ddpm[0], color="gray", ls="--", label="teacher: DDPM-1000")
    ax.set(xscale="log", yscale="log", xticks=EVALS, xticklabels=EVALS, title=name,
           xlabel="network evaluations per image", ylabel=f"pseudo-FID (n = {args.n})")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no 3x10^0 between ticks
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "distill.png", dpi=120)
print("\n".join(lines))
