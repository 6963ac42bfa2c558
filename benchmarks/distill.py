"""The few-step goals, measured as they are stated: each shipped student beside its teacher.

Run: .venv/bin/python benchmarks/distill.py [--n 10000] [--seeds 1 2 3] [--report]
  -> benchmarks/results/distill.{json,md,png}

For each shipped student (STUDENTS) it draws --n images per seed, in the precision
`--precision auto` picks, from the student (its own sampler and step count) and from its
teacher at the goals' reference (20 steps of SDE-DPM-Solver++, trailing). A conditional pair is
drawn as its user draws it: n / 10 of each digit, the teacher guided at the default scale (two
network evaluations a step). Each row gives the mean and min..max over the seeds of pseudo-FID,
recall, confidence and the class histogram's largest deviation (and conditional accuracy),
beside the real images' floor at the same n; the JSON keeps each draw's seconds, which the table
leaves out (`minidiff sample`'s time is docs/speed.md's). The teacher's few-step samplers and
its default are docs/sampling.md's.
Seeds 1-3 by default: the students' training pairs were drawn from seed 0's noises before
`pair_seed` existed. Rows already in the JSON (same checkpoint digest, n, seed and precision)
are kept, so a stopped run continues where it stopped; the cheap rows go first. --report
writes the table and figure from the JSON alone.

The goal table compares each student with its teacher's reference and says, where a goal is
missed, by how much and what the next lever is. Distillation cost is the shipped lineage's
training compute over its teacher's, in forward-pass equivalents (COST: docs/distillation.md
does the accounting from the runs' commands; the shipped checkpoints do not record it).
"""

import argparse
import json
from datetime import date

import torch
from common import RESULTS, as_drawn, over_seeds

from minidiff.checkpoint import load_checkpoint
from minidiff.evaluation import score
from minidiff.metrics import Reference, floor
from minidiff.runtime import environment, environment_line, resolve_precision
from minidiff.settings import SamplingConfig

STUDENTS = {"reduced-2step": "reduced", "reduced-cond-2step": "reduced-cond",
            "baseline-2step": "baseline"}
REFERENCE = ("dpmpp-sde", 20, "trailing")  # the goals' reference: the teacher's old default
# the goals: pseudo-FID within this factor of the teacher's reference; recall within 0.02 of
# the teacher's (unconditional students); conditional accuracy at least 99%
FID_GOAL = {"reduced-2step": 1.10, "baseline-2step": 1.10, "reduced-cond-2step": 1.15}
RECALL_GOAL, ACCURACY_GOAL, COST_GOAL = 0.02, 0.99, 0.5
# the shipped lineage's training compute over its teacher's (docs/distillation.md, "How the
# shipped students were made"): pairs drawn once, every update counted
COST = {"reduced-2step": 0.483, "baseline-2step": 1.31, "reduced-cond-2step": 0.485}
NEXT = ("DMD2 at its published scale (the GAN head over long runs, many times this budget), "
        "paid for under the cost rule by a teacher trained longer: GPU work, as `reduced` is "
        "converged; every variant within today's budget levels off (docs/distillation.md)")
KEYS = ("pseudo_fid", "recall", "precision", "confidence", "class_max_dev",
        "conditional_accuracy")

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=10000)
ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
ap.add_argument("--report", action="store_true", help="write distill.md/png from the JSON")
args = ap.parse_args()

path = RESULTS / "distill.json"
precision = resolve_precision("auto", torch.device("cpu"))
res = json.loads(path.read_text()) if path.is_file() else {}
if args.report and not res:
    raise SystemExit(f"distill.py: --report needs {path}; run without --report first")
if args.report:  # the JSON as measured, wherever it was
    precision, args.n, args.seeds = res["precision"], res["n"], res["seeds"]
elif (res.get("n"), res.get("precision"), res.get("seeds")) != (args.n, precision, args.seeds):
    res = {"n": args.n, "precision": precision, "seeds": args.seeds, **environment(),
           "rows": []}
ref = Reference("mnist", "test")


def rows_of(student: str) -> list[tuple[str, str, tuple | None]]:
    """``(label, checkpoint, (sampler, steps, spacing) or None: its own)`` of one pair."""
    teacher = STUDENTS[student]
    return [(student, student, None), (f"{teacher} @ reference", teacher, REFERENCE)]


# the students first, then the teachers' references, the dearest (baseline's) last
jobs = [row for i in range(2) for row in (rows_of(s)[i] for s in STUDENTS)]
for label, ckpt, sampling in [] if args.report else jobs:
    model, config, digest = load_checkpoint(ckpt)
    y = as_drawn(model, args.n)
    # a checkpoint shipped anew under the same name is measured anew
    res["rows"] = [r for r in res["rows"] if r["label"] != label or
                   r["checkpoint_sha256"] == digest]
    for seed in args.seeds:
        if any((r["label"], r["checkpoint_sha256"], r["seed"]) == (label, digest, seed)
               for r in res["rows"]):
            continue
        flags = dict(zip(("sampler", "steps", "spacing"), sampling or (), strict=False))
        cfg = SamplingConfig.from_flags(**flags, precision=precision, seed=seed)
        rec = {"label": label, "checkpoint": ckpt, "checkpoint_sha256": digest, "seed": seed,
               **({"sampler": flags["sampler"], "steps": flags["steps"],
                   "spacing": flags["spacing"]} if sampling else config["sampling"]),
               "guided": y is not None and sampling is not None,
               **score(model, config, cfg, args.n, ref, y=y)}
        res["rows"].append(rec)
        res["date"] = str(date.today())
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(rec), flush=True)
if not args.report or "floor" not in res:
    res["floor"] = {k: round(v, 4) for k, v in floor(ref, args.n).items() if k in KEYS}
    path.write_text(json.dumps(res, indent=2) + "\n")


def summary(label: str) -> dict | None:
    """A row over the seeds (None until each is measured), with its evaluations per image."""
    out = over_seeds(res["rows"], label, args.seeds, KEYS)
    if out:
        out["evaluations"] = out["steps"] * (2 if out["guided"] else 1)
    return out


def ratio_goal(student: str, s: dict, t: dict) -> list[str]:
    """The goal rows of one student ``s`` against its teacher's reference ``t``."""
    x, goal = s["pseudo_fid"] / t["pseudo_fid"], FID_GOAL[student]
    out = [f"| `{student}` | pseudo-FID within x{goal:.2f} of its teacher's reference | "
           f"{s['pseudo_fid']:.3f} against {t['pseudo_fid']:.3f}: x{x:.2f} | "
           + ("met |" if x <= goal else f"**missed by x{x / goal:.2f}**; next: {NEXT} |")]
    if "conditional_accuracy" in s:
        acc = s["conditional_accuracy"]
        out.append(f"| `{student}` | conditional accuracy at least {ACCURACY_GOAL:.0%} | "
                   f"{acc:.1%} | " + ("met |" if acc >= ACCURACY_GOAL else "**missed** |"))
    else:
        gap = t["recall"] - s["recall"]
        out.append(f"| `{student}` | recall within {RECALL_GOAL} of its teacher's | "
                   f"{s['recall']:.3f} against {t['recall']:.3f} ({gap:.3f} below) | "
                   + ("met |" if gap <= RECALL_GOAL else
                      f"**missed by {gap - RECALL_GOAL:.3f}** |"))
        dev = res["floor"]["class_max_dev"]
        out.append(f"| `{student}` | class histogram within the real images' spread | largest "
                   f"deviation {s['class_max_dev']:.3f} against the real images' {dev:.3f} "
                   f"(its teacher's: {t['class_max_dev']:.3f}) | "
                   + ("met |" if s["class_max_dev"] <= dev else "**missed** |"))
    cost = COST[student]
    out.append(f"| `{student}` | distillation at most {COST_GOAL}x its teacher's training | "
               f"{cost}x | " + ("met |" if cost <= COST_GOAL else
                                f"**missed by x{cost / COST_GOAL:.1f}** |"))
    return out


sums = {label: s for label, _, _ in jobs if (s := summary(label))}
fl = res["floor"]
lines = [f"# Few-step goals of the shipped students ({environment_line(res)}; {precision})", "",
         f"pseudo-FID of {args.n:,} samples per seed against the MNIST test split, seeds "
         f"{', '.join(map(str, args.seeds))}: mean and min..max. A conditional model is drawn "
         "as its user draws it (n / 10 of each digit; the teacher guided at 1.5, two "
         "evaluations a step).", "",
         "## Goals", "", "| student | goal | measured | |", "|---|---|---|---|"]
for student, teacher in STUDENTS.items():
    s, t = sums.get(student), sums.get(f"{teacher} @ reference")
    if s and t:
        lines += ratio_goal(student, s, t)
lines += ["| 1 evaluation | within x1.50 of the teacher | no 1-step student ships; the best "
          "measured, x5.2 (docs/distillation.md) | **missed** |", "",
          "## Rows", "",
          "| row | sampler, steps | evaluations | pseudo-FID mean (min..max) | recall | "
          "confidence | class max dev | conditional accuracy |",
          "|---|---|---|---|---|---|---|---|"]
for label, s in sums.items():
    acc = f"{s['conditional_accuracy']:.1%}" if "conditional_accuracy" in s else ""
    lines.append(f"| `{label}` | {s['sampler']}, {s['steps']} ({s['spacing']}) | "
                 f"{s['evaluations']} | {s['pseudo_fid']:.3f} ({s['fid_range'][0]:.3f}.."
                 f"{s['fid_range'][1]:.3f}) | {s['recall']:.3f} | {s['confidence']:.3f} | "
                 f"{s['class_max_dev']:.3f} | {acc} |")
lines += [f"| *real images (floor)* | | | {fl['pseudo_fid']:.3f} | {fl['recall']:.3f} | "
          f"{fl['confidence']:.3f} | {fl['class_max_dev']:.3f} | |", "",
          f"Command: `.venv/bin/python benchmarks/distill.py --n {args.n} --seeds "
          f"{' '.join(map(str, args.seeds))}`"]
(RESULTS / "distill.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, len(STUDENTS), figsize=(4.2 * len(STUDENTS), 3.6), squeeze=False)
for ax, (student, teacher) in zip(axes[0], STUDENTS.items(), strict=True):
    for label, style, name in [(f"{teacher} @ reference", "o", f"teacher `{teacher}`"),
                               (student, "s", "student")]:
        if p := sums.get(label):
            ax.errorbar([p["evaluations"]], [p["pseudo_fid"]],
                        yerr=[[p["pseudo_fid"] - p["fid_range"][0]],
                              [p["fid_range"][1] - p["pseudo_fid"]]],
                        fmt=style, capsize=3, label=name)
    if f"{teacher} @ reference" in sums:
        goal = FID_GOAL[student] * sums[f"{teacher} @ reference"]["pseudo_fid"]
        ax.axhline(goal, color="green", ls="--", label=f"goal: x{FID_GOAL[student]:.2f}")
    ax.axhline(fl["pseudo_fid"], color="gray", ls=":", label="real images")
    ticks = sorted({sums[lab]["evaluations"] for lab in (student, f"{teacher} @ reference")
                    if lab in sums})
    ax.set(xscale="log", xlim=(1.4, 60), ylim=(0, None), title=student, xticks=ticks,
           xticklabels=ticks, xlabel="network evaluations per image",
           ylabel=f"pseudo-FID (n = {args.n:,})")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
fig.suptitle(f"Shipped students against their teachers' reference: mean and min..max over "
             f"{len(args.seeds)} seeds ({precision})", fontsize=10)
fig.tight_layout()
fig.savefig(RESULTS / "distill.png", dpi=120)
