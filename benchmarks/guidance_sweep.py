"""Classifier-free guidance sweep: conditional accuracy and pseudo-FID vs guidance scale.

Run: .venv/bin/python benchmarks/guidance_sweep.py reduced-cond [--n 1000]
  -> benchmarks/results/guidance_sweep.{json,md,png}

Each scale samples a balanced set (n / 10 per class) with `minidiff sample`'s default sampler
and seed 0, then scores it with the shipped classifier: the share it assigns to the requested
class, pseudo-FID of the whole set against the test split (lower is better), the mean per-class
pseudo-FID, precision and recall. The rule's choice is the scale with the lowest pseudo-FID
among those whose accuracy reaches the target (98%).
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import GUIDANCE_TARGET as TARGET  # noqa: E402
from common import RESULTS  # noqa: E402

from minidiff.checkpoint import dataset_of, load_checkpoint  # noqa: E402
from minidiff.generation import class_labels, resolve_sampling, time_generation  # noqa: E402
from minidiff.metrics import Reference, evaluate_conditional, evaluate_images  # noqa: E402
from minidiff.runtime import environment, environment_line, resolve_precision  # noqa: E402
from minidiff.settings import SamplingConfig  # noqa: E402

SCALES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("--n", type=int, default=1000)
args = ap.parse_args()

out = RESULTS
model, config, digest = load_checkpoint(args.checkpoint)
dataset = dataset_of(config)
ref = Reference(dataset, "test")
# `minidiff sample`'s sampling (precision auto: bf16 where native), in batches of 250
PRECISION = resolve_precision("auto", torch.device("cpu"))
cfg, sched = resolve_sampling(SamplingConfig(precision=PRECISION, batch_size=250), config,
                              torch.device("cpu"))
labels = class_labels("all", args.n, model.config.num_classes, args.checkpoint)
res = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": digest, "n": args.n,
       "sampler": cfg.sampler, "steps": cfg.steps, "spacing": cfg.spacing, "seed": cfg.seed,
       "precision": PRECISION, "dataset": dataset, **environment(), "rows": []}
for scale in SCALES:
    run = time_generation(model, sched, replace(cfg, guidance=scale), args.n, y=labels)
    images, seconds = run.result, run.seconds
    m, c = evaluate_images(images, ref), evaluate_conditional(images, labels, ref)
    row = {"guidance": scale, "seconds": round(seconds, 1),
           "accuracy": round(c["conditional_accuracy"], 4),
           "worst_class_accuracy": round(min(e["accuracy"] for e in c["per_class"].values()), 4),
           "pseudo_fid": round(m["pseudo_fid"], 4),
           "per_class_pseudo_fid": round(c["per_class_pseudo_fid_mean"], 4),
           "precision": round(m["precision"], 4), "recall": round(m["recall"], 4)}
    res["rows"].append(row)
    print(json.dumps(row), flush=True)

ok = [r for r in res["rows"] if r["accuracy"] >= TARGET]
best = (min(ok, key=lambda r: r["pseudo_fid"]) if ok
        else max(res["rows"], key=lambda r: r["accuracy"]))
res["choice"] = best["guidance"]
(out / "guidance_sweep.json").write_text(json.dumps(res, indent=2) + "\n")

lines = [f"# Classifier-free guidance sweep ({environment_line(res)}; {res['precision']})", "",
         f"Checkpoint `{res['checkpoint']}` (sha256 {digest[:12]}...), {args.n} samples per "
         f"scale ({args.n // 10} per class), `{cfg.sampler}` {cfg.steps} steps "
         f"({cfg.spacing}), seed 0; {dataset} test split as reference. Accuracy: the share "
         "of samples the shipped classifier assigns to the requested class. Seconds: wall time of "
         "the sampling (guidance doubles the batch).",
         "",
         "| guidance | accuracy | worst class | pseudo-FID | per-class pseudo-FID | precision "
         "| recall | seconds |", "|---|---|---|---|---|---|---|---|"]
shipped = SamplingConfig().guidance  # `--guidance`'s default (docs/sampling.md: why)
for r in res["rows"]:
    mark = (" **(rule)**" if r is best else "") + (" (default)" if r["guidance"] == shipped else "")
    lines.append(f"| {r['guidance']}{mark} | {r['accuracy']:.4f} | "
                 f"{r['worst_class_accuracy']:.3f} | {r['pseudo_fid']:.3f} | "
                 f"{r['per_class_pseudo_fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                 f"{r['seconds']} |")
lines += ["", f"Rule: the lowest pseudo-FID among scales with accuracy >= {TARGET:.0%} -> "
          f"guidance {best['guidance']} (the default: {shipped}).", "",
          "![guidance sweep](guidance_sweep.png)", "",
          f"Command: `.venv/bin/python benchmarks/guidance_sweep.py {args.checkpoint} "
          f"--n {args.n}`"]
(out / "guidance_sweep.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
g = [r["guidance"] for r in res["rows"]]
ax.plot(g, [100 * r["accuracy"] for r in res["rows"]], "o-", color="C0", label="accuracy")
ax.axhline(100 * TARGET, color="C0", lw=0.7, ls="--")
ax.set_xlabel("guidance scale (0 = unconditional, 1 = conditional)")
ax.set_ylabel("conditional accuracy (%)", color="C0")
ax2 = ax.twinx()
ax2.plot(g, [r["pseudo_fid"] for r in res["rows"]], "s-", color="C3", label="pseudo-FID")
ax2.set_ylabel("pseudo-FID (lower is better)", color="C3")
ax.axvline(best["guidance"], color="grey", lw=0.8, ls=":")
ax.set_title(f"Guidance sweep, {Path(args.checkpoint).name} (n = {args.n})")
fig.tight_layout()
fig.savefig(out / "guidance_sweep.png")
