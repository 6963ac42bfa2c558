"""Few-step students and samplers against their teacher's reference, with their spread.

Run: .venv/bin/python benchmarks/few_step.py [ROW ...] [--n 10000] [--seeds 0 1 2]
  ROW = LABEL=CHECKPOINT[:SAMPLER:STEPS:SPACING] (default: the rows below)
  -> benchmarks/results/few_step.{json,md}

Each row draws --n images per seed in the precision `--precision auto` picks (a student with
its own sampler and step count unless the row names them) and is scored by pseudo-FID, recall,
confidence and the class histogram's largest deviation against the MNIST test split. The table
gives the mean and min..max over the seeds, the ratio to the row's reference (the teacher at
20 steps of SDE-DPM-Solver++, trailing: the goals' reference) and, at the same n, the metrics of
as many real training images (the floor). Rows already in the JSON (same checkpoint digest, n,
seed and precision) are kept, so an interrupted run continues where it stopped.
"""

import argparse
import json
from datetime import date

import torch
from common import RESULTS, over_seeds

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.evaluation import score  # noqa: E402
from minidiff.generation import resolve_sampling  # noqa: E402
from minidiff.metrics import Reference, floor  # noqa: E402
from minidiff.runtime import environment, environment_line, resolve_precision  # noqa: E402
from minidiff.settings import SamplingConfig  # noqa: E402

REFERENCE = ("dpmpp-sde", 20, "trailing")  # the goals' reference: the teacher's 20-step default
ROWS = ["reduced=reduced:dpmpp-sde:20:trailing", "reduced-2step=reduced-2step",
        "reduced-ect-2=runs/ect-reduced", "reduced-ect-1=runs/ect-reduced:ddpm:1:trailing"]
KEYS = ("pseudo_fid", "recall", "confidence", "class_max_dev")

ap = argparse.ArgumentParser()
ap.add_argument("rows", nargs="*", default=ROWS)
ap.add_argument("--n", type=int, default=10000)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--name", default="few_step", help="results file stem")
args = ap.parse_args()

path = RESULTS / f"{args.name}.json"
precision = resolve_precision("auto", torch.device("cpu"))
res = json.loads(path.read_text()) if path.is_file() else {}
if (res.get("n"), res.get("precision")) != (args.n, precision):
    res = {"n": args.n, "precision": precision, **environment(), "rows": []}
ref = Reference("mnist", "test")


def parse(row: str) -> tuple[str, str, dict]:
    """``LABEL=CHECKPOINT[:SAMPLER:STEPS:SPACING]`` -> label, checkpoint, sampling flags."""
    label, spec = row.split("=", 1)
    ckpt, *sampling = spec.split(":")
    kw = dict(zip(("sampler", "steps", "spacing"), sampling, strict=False))
    if "steps" in kw:
        kw["steps"] = int(kw["steps"])
    return label, ckpt, kw


for row in args.rows:
    label, ckpt, flags = parse(row)
    model, config, digest = load_checkpoint(ckpt)
    for seed in args.seeds:
        done = [r for r in res["rows"] if (r["label"], r["checkpoint_sha256"], r["seed"])
                == (label, digest, seed)]
        if done:
            continue
        cfg = SamplingConfig.from_flags(**flags, precision=precision, seed=seed)
        own = resolve_sampling(cfg, config, torch.device("cpu"))[0]  # what the row samples
        rec = {"label": label, "checkpoint": ckpt, "checkpoint_sha256": digest, "seed": seed,
               "sampler": own.sampler, "steps": own.steps, "spacing": own.spacing,
               **score(model, config, cfg, args.n, ref)}
        res["rows"].append(rec)
        res["date"] = str(date.today())
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(rec), flush=True)

res["floor"] = {k: round(v, 4) for k, v in floor(ref, args.n).items() if k in KEYS}
path.write_text(json.dumps(res, indent=2) + "\n")


labels = [parse(row)[0] for row in args.rows]
sums = {lab: s for lab in labels if (s := over_seeds(res["rows"], lab, args.seeds, KEYS))}
# the first row sampled as the goals' reference is the teacher every row is compared with
teacher = next((s["pseudo_fid"] for s in sums.values()
                if (s["sampler"], s["steps"], s["spacing"]) == REFERENCE), None)
lines = [f"# Few-step students and samplers ({environment_line(res)}; {precision})", "",
         f"pseudo-FID of {args.n:,} samples per seed against the MNIST test split, seeds "
         f"{', '.join(map(str, args.seeds))}: mean and min..max; the goals compare a row with "
         "its teacher at 20 steps of SDE-DPM-Solver++ (trailing). Time: one seed's draw of "
         f"{args.n:,} in process (median over seeds).", "",
         "| row | sampler, evaluations | pseudo-FID mean | min..max | vs 20-step teacher | recall "
         "| confidence | class max dev | time |", "|---|---|---|---|---|---|---|---|---|"]
for lab, s in sums.items():
    vs = f"x{s['pseudo_fid'] / teacher:.2f}" if teacher else "n/a"
    lines.append(f"| `{lab}` | {s['sampler']}, {s['steps']} ({s['spacing']}) | "
                 f"{s['pseudo_fid']:.3f} | {s['fid_range'][0]:.3f}..{s['fid_range'][1]:.3f} | "
                 f"{vs} | {s['recall']:.3f} | {s['confidence']:.3f} | "
                 f"{s['class_max_dev']:.3f} | {s['seconds']:.1f} s |")
fl = res["floor"]
lines += [f"| *real images (floor)* | | {fl['pseudo_fid']:.3f} | | | {fl['recall']:.3f} | "
          f"{fl['confidence']:.3f} | {fl['class_max_dev']:.3f} | |", "",
          f"Command: `.venv/bin/python benchmarks/few_step.py {' '.join(args.rows)} --n {args.n} "
          f"--seeds {' '.join(map(str, args.seeds))}"
          + (f" --name {args.name}`" if args.name != "few_step" else "`")]
(RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
