"""Which CPU execution choices pay for the sampler's network: one factor at a time.

Run: .venv/bin/python benchmarks/cpu_choices.py [--presets reduced baseline] [--precision P]
  -> benchmarks/results/cpu_choices[-fp32].{json,md}

From a base setting (the precision `--precision auto` picks here, or the one given; NCHW, batch
256, all threads, torch.inference_mode, eager, oneDNN on) each row changes one factor and
measures forward passes per second of an untrained U-Net at t = 500 (the network's speed does
not depend on its weights): the median of 10 timed passes after 2 warm-ups. torch.compile's
one-off compile time is reported beside its speed.
"""

import argparse
import json
from pathlib import Path

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)
import torch

from minidiff.runtime import (  # noqa: E402
    autocast_context,
    environment,
    environment_line,
    resolve_precision,
    timed,
)
from minidiff.unet import PRESETS, UNet  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--presets", nargs="+", default=["reduced", "baseline"])
ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
ap.add_argument("--tag", default="", help="suffix of the result files, e.g. the CPU class")
ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
args = ap.parse_args()
PRECISION = resolve_precision(args.precision, torch.device("cpu"))
BASE = {"precision": PRECISION, "layout": "nchw", "batch": 256,
        "threads": torch.get_num_threads(), "grad": "inference_mode", "compile": False,
        "onednn": True}
OTHER = "fp32" if PRECISION == "bf16" else "bf16"
VARIANTS = [{}, {"layout": "channels_last"}, {"batch": 64}, {"batch": 128}, {"batch": 512},
            {"batch": 1024}, {"threads": 1}, {"grad": "no_grad"}, {"onednn": False}]
if not args.no_compile:
    VARIANTS.append({"compile": True})
if OTHER == "fp32" or environment()["bf16_native"]:  # emulated bf16 is never timed
    VARIANTS.insert(1, {"precision": OTHER})


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
    amp = autocast_context("cpu", s["precision"])
    with grad, amp, torch.backends.mkldnn.flags(enabled=s["onednn"]):
        first = timed(lambda: model(x, t)).seconds  # compiles, when compiled
        if s["compile"]:
            compile_s = round(first, 1)
        seconds = timed(lambda: model(x, t), 10, warmup=lambda: model(x, t)).seconds
    torch.set_num_threads(BASE["threads"])
    return {"img_per_s": round(s["batch"] / seconds, 1), "compile_s": compile_s}


res = {**environment(), "base": BASE, "rows": []}
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
name = "cpu_choices" + (f"-{args.tag}" if args.tag else "")
(out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
lines = [f"# CPU execution choices for the sampler's network ({environment_line(res)})", "",
         "Base: " + ", ".join(f"{k}={v}" for k, v in BASE.items()) + ". Each row changes one "
         "factor; forward passes per second (images/s at one network evaluation), median of 10.",
         "", "| preset | change | img/s | vs base | compile time (s) |", "|---|---|---|---|---|"]
for r in res["rows"]:
    lines.append(f"| {r['preset']} | {r['change']} | {r['img_per_s']} | {r['vs_base']}x | "
                 f"{r['compile_s'] if r['compile_s'] is not None else ''} |")
lines += ["", f"Command: `.venv/bin/python benchmarks/cpu_choices.py --presets "
          f"{' '.join(args.presets)} --precision {args.precision}"
          + (f" --tag {args.tag}" if args.tag else "")
          + (" --no-compile" if args.no_compile else "") + "`"]
(out / f"{name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
