"""Choose `minidiff sample`'s default: the fewest network evaluations within 10% of DDPM-1000.

Run: .venv/bin/python benchmarks/default_sampler.py runs/demo [--n 1000] [--seeds 0 1 2]
  [--name default_sampler] [--default-only] [--precision auto|fp32|bf16]
  -> benchmarks/results/NAME.{json,md}
(--default-only: today's default alone, its mean over the seeds printed; no table, no choice)
A class-conditional model (the demo's) is scored as it is drawn: n / 10 of each digit with the
default guidance, its conditional accuracy beside the other scores.

Each candidate samples n images per seed (batch 250, in the precision `--precision auto` picks)
and is scored by the project's pseudo-FID against the MNIST test split; the rule compares the
mean over seeds with DDPM-1000's mean over the same seeds. Rows already in the JSON (same
checkpoint, n and precision) are kept, so an
interrupted run continues where it stopped; seed-0 rows also found in sampler_quality.json
(same checkpoint, n, batch and precision) are reused instead of being recomputed.
"""

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import RESULTS, as_drawn, resume_results  # noqa: E402

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.evaluation import score  # noqa: E402
from minidiff.metrics import Reference  # noqa: E402
from minidiff.runtime import environment_line, resolve_precision  # noqa: E402
from minidiff.settings import SamplingConfig  # noqa: E402

# (sampler, steps, spacing): DDPM-1000 is the reference; the rest are the stochastic few-step
# candidates that the single-seed table (sampler_quality.md) left in contention, and trailing
# SDE-DPM-Solver++ at 20 and 30 steps for models (v-prediction) where 15 is not yet close.
CANDIDATES = [("ddpm", 1000, "uniform"),
              ("ddpm", 20, "quadratic"), ("ddpm", 15, "quadratic"), ("ddpm", 10, "quadratic"),
              ("dpmpp-sde", 20, "quadratic"), ("dpmpp-sde", 15, "quadratic"),
              ("dpmpp-sde", 10, "quadratic"), ("dpmpp-sde", 30, "trailing"),
              ("dpmpp-sde", 20, "trailing"), ("dpmpp-sde", 15, "trailing"),
              ("dpmpp-sde", 10, "trailing"),
              ("dpmpp-sde", 8, "trailing"), ("dpmpp-sde", 6, "trailing")]
# at most 10 evaluations: the multistep solvers on noise-level spacings (Karras rho 7, even in
# log-SNR) beside trailing
CANDIDATES += [(name, steps, spacing) for name in ("unipc", "dpmpp", "dpmpp-sde")
               for spacing in ("karras", "logsnr", "trailing") for steps in (10, 8, 6)
               if (name, steps, spacing) not in CANDIDATES]
# Karras spacing at rho 2, more steps at high noise (benchmarks/karras_rho.py found it best)
CANDIDATES += [("dpmpp-sde", steps, "karras-rho2") for steps in (10, 8, 6)]
TOLERANCE = 0.10

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("--n", type=int, default=1000)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--name", default="default_sampler", help="results file stem (one per model)")
ap.add_argument("--default-only", action="store_true",
                help="score today's default alone (a model's quality as the demo reports it)")
ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                help="fp32: sample as a CPU without native bf16 does")
args = ap.parse_args()

out = RESULTS
path = out / f"{args.name}.json"
model, config, digest = load_checkpoint(args.checkpoint)
PRECISION = resolve_precision(args.precision, torch.device("cpu"))  # auto: bf16 where native
res = resume_results(path, args.checkpoint, digest, args.n, PRECISION, batch_size=250)
if not res["rows"]:
    old = out / "sampler_quality.json"
    if old.is_file():
        q = json.loads(old.read_text())
        if q.get("checkpoint_sha256") == digest and q.get("n") == args.n:
            res["rows"] += [{**r, "seed": 0, "reused_from": "sampler_quality.json"}
                            for r in q["rows"] if r.get("eta") is None
                            and (r["sampler"], r["steps"], r.get("spacing", "uniform"))
                            in CANDIDATES]


def spacing_label(spacing: str, rho: float | None) -> str:
    """A spacing as the rows name it: ``karras`` is Karras et al.'s rho 7 (every karras row
    before `--rho` existed), ``karras-rho2`` another rho."""
    return f"karras-rho{rho:g}" if spacing == "karras" and rho not in (None, 7.0) else spacing


def key(r):
    spacing = spacing_label(r.get("spacing", "uniform"), r.get("rho"))
    return r["sampler"], r["steps"], spacing, r["seed"]


ref = Reference("mnist", "test")
labels = as_drawn(model, args.n)
done = {key(r) for r in res["rows"]}
# today's default first, DDPM-1000 (the slowest) last: a partial run already says the most
D = SamplingConfig()
DEFAULT_CANDIDATE = (D.sampler, D.steps, spacing_label(D.spacing, D.rho))
ORDER = sorted(CANDIDATES, key=lambda c: (c[1] == 1000, c != DEFAULT_CANDIDATE))
if args.default_only:
    ORDER = [DEFAULT_CANDIDATE]
for name, steps, spacing in ORDER:
    for seed in args.seeds:
        if (name, steps, spacing, seed) in done:
            continue
        spacing_, _, rho = spacing.partition("-rho")
        cfg = SamplingConfig(name, steps, spacing_, rho=float(rho or 7.0), seed=seed,
                             batch_size=250, precision=PRECISION)
        row = {"sampler": name, "steps": steps, "spacing": spacing_,
               **({"rho": cfg.rho} if spacing_ == "karras" else {}), "seed": seed,
               **score(model, config, cfg, args.n, ref, y=labels)}
        res["rows"].append(row)
        res["date"] = str(date.today())
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(row), flush=True)

if args.default_only:
    rows = [r for r in res["rows"] if key(r)[:3] == ORDER[0] and r["seed"] in args.seeds]
    print(json.dumps({"sampler": ORDER[0], **{
        f"{k}_mean": round(statistics.mean(r[k] for r in rows), 4)
        for k in ("pseudo_fid", "confidence", "precision", "recall", "conditional_accuracy")
        if k in rows[0]},
        "pseudo_fid_min": min(r["pseudo_fid"] for r in rows),
        "pseudo_fid_max": max(r["pseudo_fid"] for r in rows)}))
    sys.exit(0)

# Summarise over the seeds asked for; a config counts only when every seed is in.
summary = []
for name, steps, spacing in CANDIDATES:
    rows = [r for r in res["rows"] if key(r)[:3] == (name, steps, spacing)
            and r["seed"] in args.seeds]
    if len(rows) == len(args.seeds):
        fids = [r["pseudo_fid"] for r in rows]
        summary.append({"sampler": name, "steps": steps, "spacing": spacing,
                        "pseudo_fid_mean": round(statistics.mean(fids), 4),
                        "pseudo_fid_min": min(fids), "pseudo_fid_max": max(fids),
                        "precision_mean": round(statistics.mean(r["precision"] for r in rows), 4),
                        "recall_mean": round(statistics.mean(r["recall"] for r in rows), 4)})
base = next(s for s in summary if s["steps"] == 1000)
for s in summary:
    s["vs_ddpm_1000"] = round(s["pseudo_fid_mean"] / base["pseudo_fid_mean"] - 1, 4)
ok = [s for s in summary if s["vs_ddpm_1000"] <= TOLERANCE]
# no candidate within the tolerance: the closest one is named, and the table says so
choice = min(ok, key=lambda s: (s["steps"], s["pseudo_fid_mean"])) if ok else \
    min((s for s in summary if s["steps"] != 1000), key=lambda s: s["pseudo_fid_mean"])
res.update(summary=summary, seeds=args.seeds, choice=choice)
path.write_text(json.dumps(res, indent=2) + "\n")

lines = [f"# Default sampler: fewest steps within {TOLERANCE:.0%} of DDPM-1000 "
         f"({environment_line(res)}; {res['precision']})", "",
         f"Checkpoint `{res['checkpoint']}` (sha256 {digest[:12]}...), "
         f"{args.n} samples per seed, seeds {', '.join(map(str, args.seeds))}, batch 250, "
         "pseudo-FID against the MNIST test split (lower is better). Every sampler here takes "
         "one network evaluation per step.", "",
         "| sampler | spacing | steps | pseudo-FID mean | min..max over seeds | vs DDPM-1000 | "
         "precision | recall |", "|---|---|---|---|---|---|---|---|"]
for s in sorted(summary, key=lambda s: (s["sampler"], s["spacing"], -s["steps"])):
    mark = (" **(chosen)**" if ok else " **(closest)**") if s is choice else ""
    lines.append(f"| {s['sampler']}{mark} | {s['spacing']} | {s['steps']} | "
                 f"{s['pseudo_fid_mean']:.3f} | "
                 f"{s['pseudo_fid_min']:.3f}..{s['pseudo_fid_max']:.3f}"
                 f" | {s['vs_ddpm_1000']:+.1%} | {s['precision_mean']:.3f} | "
                 f"{s['recall_mean']:.3f} |")
verdict = "Chosen" if ok else f"No candidate within {TOLERANCE:.0%}; the closest"
chosen_spacing, _, chosen_rho = choice["spacing"].partition("-rho")
lines += ["", f"{verdict}: `--sampler {choice['sampler']} --steps {choice['steps']} --spacing "
          f"{chosen_spacing}{' --rho ' + chosen_rho if chosen_rho else ''}` "
          f"({choice['vs_ddpm_1000']:+.1%} vs DDPM-1000). Today's default: "
          f"`--sampler {D.sampler} --steps {D.steps} --spacing {D.spacing} --rho {D.rho:g}`.",
          "",
          f"Command: `.venv/bin/python benchmarks/default_sampler.py {res['checkpoint']} "
          f"--n {args.n} --seeds {' '.join(map(str, args.seeds))} --name {args.name}`"]
(out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
