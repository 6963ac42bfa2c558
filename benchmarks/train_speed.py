"""How fast does one training step of the demo's U-Net run on this CPU, and what makes it faster?

Run: .venv/bin/python benchmarks/train_speed.py [--preset reduced] [--precisions bf16 fp32]
  -> benchmarks/results/train_speed-<cpu class>.{json,md}

Each row changes one thing of the default training step (``minidiff train``: AdamW, batch 64,
NCHW, eager, the EMA update, bf16 autocast where the CPU runs bf16 natively) and times it as
:func:`minidiff.loop.seconds_per_step` does the time-budget probe: the median of 20 steps after
5 untimed ones (forward, backward, clip, update, EMA) on MNIST's first batch. ``compile`` is
``torch.compile`` of the U-Net inside the step (forward and backward graphs); its first steps,
the compile time, are timed separately. Beside the rows: this CPU's matmul peak (1024 x 1024
fp32 and bf16), so a reader can see how far from the hardware a step of this small U-Net runs.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (puts the checkout's src on sys.path)
import torch

from minidiff.diffusion import DiffusionConfig
from minidiff.files import atomic_write_text
from minidiff.loop import Run, seconds_per_step, training_images
from minidiff.runtime import cpu_class, environment
from minidiff.settings import TrainConfig
from minidiff.train import Training
from minidiff.unet import PRESETS

# name -> (TrainConfig changes, what else changes in the step)
ROWS = {
    "(base)": ({}, {}),
    "AdamW foreach": ({}, {"optimizer": "foreach"}),
    "AdamW fused": ({}, {"optimizer": "fused"}),
    "channels_last": ({}, {"channels_last": True}),
    "torch.compile": ({}, {"compile": True}),
    "batch 32": ({"batch_size": 32}, {}),
    "batch 128": ({"batch_size": 128}, {}),
}


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(preset: str, precision: str, train_over: dict, step_over: dict) -> dict:
    cfg = replace(TrainConfig(precision=precision), **train_over)
    images, _ = training_images("mnist", 4096, 28)
    run = Run(Path("/nonexistent"), images, None, torch.device("cpu"), precision,
              progress=False)
    method = Training(PRESETS[preset], DiffusionConfig(), cfg, 1, {}, run.world, run.device)
    if step_over.get("channels_last"):
        method.model.to(memory_format=torch.channels_last)
        method.ema.to(memory_format=torch.channels_last)
    if step_over.get("optimizer"):
        kind = step_over["optimizer"]
        method.opt = torch.optim.AdamW(method.model.parameters(), lr=cfg.lr,
                                       **{kind: True})
    compile_s = None
    if step_over.get("compile"):
        method.net = torch.compile(method.model, dynamic=False)
        t0 = time.perf_counter()
        seconds_per_step(method, run, steps=1, warmup=2)  # the compile, then two steps
        compile_s = round(time.perf_counter() - t0, 1)
    per_step = seconds_per_step(method, run)
    return {"s_per_step": round(per_step, 5),
            "img_per_s": round(cfg.batch_size / per_step, 1),
            **({"compile_s": compile_s} if compile_s is not None else {})}


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Training speed of one step, `{res['preset']}` ({env['date']}, {env['cpu']}, "
             f"{cpu_class()})", "",
             f"Command: `{res['command']}`. torch {env['torch']}, {env['threads']} threads. "
             f"Matmul peak (1024 x 1024): fp32 {res['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 "
             f"{res['peak_gflops']['bf16']:.0f} GFLOP/s"
             + (" (emulated: not this CPU's speed)" if not env["bf16_native"] else "") + ".",
             "", "Median of 20 training steps after 5 (forward, backward, clip, AdamW, EMA), "
             "batch 64 unless the row says otherwise; each row changes one thing.", "",
             "| precision | change | ms / step | images/s | vs base | compile (s) |",
             "|---|---|---|---|---|---|"]
    for p, rows in res["rows"].items():
        base = rows["(base)"]["img_per_s"]
        for name, r in rows.items():
            lines.append(f"| {p} | {name} | {r['s_per_step'] * 1000:.1f} | {r['img_per_s']:.0f}"
                         f" | {r['img_per_s'] / base:.2f}x | {r.get('compile_s', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="reduced", choices=sorted(PRESETS))
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args()
    env = environment()
    if "bf16" in args.precisions and not env["bf16_native"]:
        sys.exit("bf16 is emulated on this CPU (~1 GFLOP/s): pass --precisions fp32")
    res = {"command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
           "preset": args.preset, "environment": env,
           "peak_gflops": {"fp32": round(matmul_gflops(torch.float32), 1),
                           "bf16": round(matmul_gflops(torch.bfloat16), 1)},
           "rows": {}}
    for p in args.precisions:
        res["rows"][p] = {}
        for name in args.rows:
            res["rows"][p][name] = measure(args.preset, p, *ROWS[name])
            print(p, name, res["rows"][p][name], flush=True)
    stem = common.RESULTS / f"train_speed-{cpu_class().split(',')[0].replace(' ', '-')}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
