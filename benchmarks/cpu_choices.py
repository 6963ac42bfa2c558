"""Which CPU execution choices pay for the sampler's network: one factor at a time.

Run: .venv/bin/python benchmarks/cpu_choices.py [--presets reduced baseline]
  -> benchmarks/results/cpu_choices.{json,md}

From a base setting (bf16 autocast, NCHW, batch 256, all threads, torch.inference_mode, eager)
each row changes one factor and measures forward passes per second of an untrained U-Net at
t = 500 (the network's speed does not depend on its weights): the median of 10 timed passes
after 2 warm-ups. torch.compile's one-off compile time is reported beside its speed.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minidiff.demo import cpu_name  # noqa: E402
from minidiff.unet import PRESETS, UNet  # noqa: E402

BASE = {"precision": "bf16", "layout": "nchw", "batch": 256, "threads": torch.get_num_threads(),
        "grad": "inference_mode", "compile": False}
VARIANTS = [{}, {"precision": "fp32"}, {"layout": "channels_last"},
            {"precision": "fp32", "layout": "channels_last"}, {"batch": 64}, {"batch": 1024},
            {"threads": 1}, {"grad": "no_grad"}, {"compile": True}]


def measure(preset: str, s: dict) -> dict:
    torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    model = UNet(PRESETS[preset]).eval()
    x = torch.randn(s["batch"], 1, 28, 28)
    t = torch.full((s["batch"],), 500)
    if s["layout"] == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    compile_s = None
    if s["compile"]:
        model = torch.compile(model, dynamic=False)
    grad = torch.inference_mode() if s["grad"] == "inference_mode" else torch.no_grad()
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if s["precision"] == "bf16"
           else contextlib.nullcontext())
    with grad, amp:
        t0 = time.perf_counter()
        model(x, t)
        if s["compile"]:
            compile_s = round(time.perf_counter() - t0, 1)
        model(x, t)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            model(x, t)
            times.append(time.perf_counter() - t0)
    torch.set_num_threads(BASE["threads"])
    return {"img_per_s": round(s["batch"] / statistics.median(times), 1),
            "compile_s": compile_s}


ap = argparse.ArgumentParser()
ap.add_argument("--presets", nargs="+", default=["reduced", "baseline"])
args = ap.parse_args()
res = {"date": str(date.today()), "cpu": cpu_name(), "torch": torch.__version__, "base": BASE,
       "rows": []}
for preset in args.presets:
    for v in VARIANTS:
        s = {**BASE, **v}
        row = {"preset": preset, "change": ", ".join(f"{k}={val}" for k, val in v.items())
               or "(base)", **measure(preset, s)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
for r in res["rows"]:
    base = next(b for b in res["rows"] if b["preset"] == r["preset"] and b["change"] == "(base)")
    r["vs_base"] = round(r["img_per_s"] / base["img_per_s"], 2)

out = Path(__file__).resolve().parent / "results"
(out / "cpu_choices.json").write_text(json.dumps(res, indent=2) + "\n")
lines = [f"# CPU execution choices for the sampler's network ({res['date']}, {res['cpu']}, "
         f"torch {res['torch']})", "",
         "Base: " + ", ".join(f"{k}={v}" for k, v in BASE.items()) + ". Each row changes one "
         "factor; forward passes per second (images/s at one network evaluation), median of 10.",
         "", "| preset | change | img/s | vs base | compile time (s) |", "|---|---|---|---|---|"]
for r in res["rows"]:
    lines.append(f"| {r['preset']} | {r['change']} | {r['img_per_s']} | {r['vs_base']}x | "
                 f"{r['compile_s'] if r['compile_s'] is not None else ''} |")
lines += ["", f"Command: `.venv/bin/python benchmarks/cpu_choices.py --presets "
          f"{' '.join(args.presets)}`"]
(out / "cpu_choices.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
