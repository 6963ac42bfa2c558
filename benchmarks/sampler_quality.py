"""Pseudo-FID and wall time versus steps for each sampler on one checkpoint.

Run: .venv/bin/python benchmarks/sampler_quality.py runs/demo [--n 1000]
  -> benchmarks/results/sampler_quality.{json,md}

Each row samples n images with a fixed seed and evaluates them against the MNIST test split;
the floor row is n real training images. Rows already in the JSON (same checkpoint and n) are
kept, so an interrupted run continues where it stopped.
"""

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import RESULTS, resume_results  # noqa: E402

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.evaluation import score  # noqa: E402
from minidiff.metrics import Reference, floor  # noqa: E402
from minidiff.runtime import environment_line, resolve_precision  # noqa: E402
from minidiff.settings import SamplingConfig  # noqa: E402

GRID = [("ddpm", 1000, {}), ("ddpm", 100, {}), ("ddpm", 50, {}), ("ddpm", 20, {}),
        ("ddim", 100, {}), ("ddim", 50, {}), ("ddim", 20, {}), ("ddim", 10, {}),
        ("ddim", 100, {"eta": 1.0}), ("ddim", 50, {"eta": 1.0}),
        ("dpmpp", 50, {}), ("dpmpp", 20, {}), ("dpmpp", 10, {}), ("dpmpp", 5, {})]
GRID += [(name, steps, {**kw, "spacing": sp}) for sp in ("quadratic", "trailing")
         for name, steps, kw in [("ddpm", 50, {}), ("ddpm", 20, {}), ("ddim", 20, {}),
                                 ("ddim", 50, {"eta": 1.0}), ("dpmpp", 20, {}),
                                 ("dpmpp", 10, {})]]
GRID += [("dpmpp-sde", s, {}) for s in (50, 20, 10, 5)]
GRID += [("dpmpp-sde", s, {"spacing": sp}) for sp in ("quadratic", "trailing")
         for s in (20, 10, 8, 5)]

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("--n", type=int, default=1000)
args = ap.parse_args()

out = RESULTS
path = out / "sampler_quality.json"
model, config, digest = load_checkpoint(args.checkpoint)
PRECISION = resolve_precision("auto", torch.device("cpu"))  # bf16 where native, else fp32
res = resume_results(path, args.checkpoint, digest, args.n, PRECISION)
ref = Reference("mnist", "test")
res["floor_pseudo_fid"] = floor(ref, args.n)["pseudo_fid"]
done = {(r["sampler"], r["steps"], r.get("eta"), r.get("spacing", "uniform"))
        for r in res["rows"]}
for name, steps, kw in GRID:
    kw = dict(kw)
    spacing = kw.pop("spacing", "uniform")
    if (name, steps, kw.get("eta"), spacing) in done:
        continue
    cfg = SamplingConfig(name, steps, spacing, batch_size=250, precision=PRECISION, **kw)
    row = {"sampler": name, "steps": steps, "eta": kw.get("eta"), "spacing": spacing,
           **score(model, config, cfg, args.n, ref)}
    res["rows"].append(row)
    res["date"] = str(date.today())
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(row), flush=True)

base = next(r for r in res["rows"] if r["sampler"] == "ddpm" and r["steps"] == 1000
            and r.get("spacing", "uniform") == "uniform")
lines = [f"# Sampler quality vs steps ({environment_line(res)}; {res['precision']})", "",
         f"Checkpoint `{res['checkpoint']}` (sha256 {digest[:12]}...; `runs/demo` is what "
         f"`make demo` trains), {args.n} samples per row, "
         f"seed 0, against the MNIST test split. Real-data floor at n = {args.n}: pseudo-FID "
         f"{res['floor_pseudo_fid']:.3f}.", "",
         "| sampler | spacing | steps | pseudo-FID | vs DDPM-1000 | KID | precision | recall | "
         "confidence | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
for r in sorted(res["rows"], key=lambda r: (r["sampler"], r.get("eta") or 0,
                                            r.get("spacing", "uniform"), -r["steps"])):
    label = r["sampler"] + (f" (eta {r['eta']})" if r.get("eta") is not None else "")
    lines.append(f"| {label} | {r.get('spacing', 'uniform')} | {r['steps']} | "
                 f"{r['pseudo_fid']:.3f} | "
                 f"{r['pseudo_fid'] / base['pseudo_fid'] - 1:+.0%} | {r['kid']:.4f} | "
                 f"{r['precision']:.3f} | {r['recall']:.3f} | {r['confidence']:.3f} | "
                 f"{r['seconds']} |")
lines += ["", f"Command: `.venv/bin/python benchmarks/sampler_quality.py {res['checkpoint']} "
          f"--n {args.n}`"]
lines.insert(-2, "![pseudo-FID vs steps](sampler_quality.png)")
lines.insert(-2, "")
(out / "sampler_quality.md").write_text("\n".join(lines) + "\n")

# the plot: pseudo-FID vs network evaluations, one line per sampler and spacing
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
series = {}
for r in res["rows"]:
    if r["steps"] == 1000:
        continue
    label = r["sampler"] + (f" eta={r['eta']}" if r.get("eta") is not None else "")
    series.setdefault((label, r.get("spacing", "uniform")), []).append(r)
styles = {"uniform": "-", "quadratic": "--", "trailing": ":"}
palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
colors = dict(zip(sorted({k[0] for k in series}), palette, strict=False))
for (label, spacing), rows in sorted(series.items()):
    rows = sorted(rows, key=lambda r: r["steps"])
    ax.plot([r["steps"] for r in rows], [r["pseudo_fid"] for r in rows], styles[spacing],
            marker="o", ms=3, color=colors[label], label=f"{label} ({spacing})")
ax.axhline(base["pseudo_fid"], color="k", lw=1, label="DDPM-1000")
ax.axhline(base["pseudo_fid"] * 1.1, color="k", lw=0.6, ls="--", label="DDPM-1000 + 10%")
ax.axhline(res["floor_pseudo_fid"], color="grey", lw=0.8, ls="-.", label="real data (floor)")
ax.set_xscale("log")
ax.set_xticks([5, 10, 20, 50, 100], labels=["5", "10", "20", "50", "100"])
ax.set_xlabel("network evaluations per sample")
ax.set_ylabel(f"pseudo-FID (n = {args.n}, lower is better)")
ax.set_title(f"Sampler quality vs steps, {res['checkpoint']} (seed 0)")
ax.legend(fontsize=6.5, ncol=2)
fig.tight_layout()
fig.savefig(out / "sampler_quality.png")
print("\n".join(lines))
