"""Does int8 *execution* pay on this CPU? Static post-training quantization of the U-Net with
PyTorch's FX graph mode (x86 backend, per-channel int8 weights, calibrated on noisy inputs
across timesteps; time embedding, the first and last convs and the 2x2 upsamplers kept in
float) against the same network in fp32 and in bf16 autocast, one forward pass of a sampling
batch, in one process.

    .venv/bin/python -O benchmarks/int8_execution.py runs/demo --threads 2 --out benchmarks/results

(-O: FX symbolic tracing cannot follow the U-Net's input-shape assert.)

Writes int8_execution.{json,md}. The result decides `minidiff quantize`: int8 storage with
float execution unless int8 execution measures faster (see the Markdown)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)
import torch

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.compress import calibration_inputs  # noqa: E402
from minidiff.diffusion import DiffusionConfig, Schedule  # noqa: E402
from minidiff.files import atomic_write_text  # noqa: E402
from minidiff.runtime import environment, timed  # noqa: E402


def median_seconds(fn, repeats):
    return timed(fn, repeats, warmup=fn).seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, config, _ = load_checkpoint(a.checkpoint)
    sched = Schedule.from_config(DiffusionConfig.from_dict(config["diffusion"]))
    x, t = calibration_inputs(model.config, sched, a.batch, seed=1)

    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmap = QConfigMapping().set_global(get_default_qconfig("x86"))
        for name in ("time_mlp", "down_blocks.0.conv1", "out"):
            qmap = qmap.set_module_name(name, None)
        # per-channel observers do not support ConvTranspose2d: the upsamplers stay float
        qmap = qmap.set_object_type(torch.nn.ConvTranspose2d, None)
        prepared = prepare_fx(copy.deepcopy(model).eval(), qmap, example_inputs=(x[:2], t[:2]))
        with torch.no_grad():
            for k in range(0, a.calib, 128):  # calibration: noisy inputs across timesteps
                prepared(*calibration_inputs(model.config, sched, 128, seed=100 + k))
        qmodel = convert_fx(prepared)

    with torch.inference_mode():
        ref = model(x, t)
        err = float((qmodel(x, t) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        fp32 = median_seconds(lambda: model(x, t), a.repeats)

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x, t)
        tb = median_seconds(bf16, a.repeats)
        ti = median_seconds(lambda: qmodel(x, t), a.repeats)
    res = {"checkpoint": a.checkpoint, **environment(), "batch": a.batch,
           "calibration_inputs": a.calib,
           "fp32_s": round(fp32, 4), "bf16_autocast_s": round(tb, 4), "int8_fx_s": round(ti, 4),
           "int8_vs_fp32": round(fp32 / ti, 2), "int8_vs_bf16": round(tb / ti, 2),
           "int8_output_rel_rms_error": round(err, 4)}
    print(json.dumps(res, indent=2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "int8_execution.json", json.dumps(res, indent=2) + "\n")
    verdict = ("faster than bf16: worth adopting" if ti < tb else
               "slower than bf16 autocast: int8 stays a storage format, executed in float")
    atomic_write_text(out / "int8_execution.md", "\n".join([
        "# int8 execution (FX static quantization, x86 backend) vs float",
        "",
        f"`{' '.join(sys.argv)}` — {res['cpu']}, {a.threads} threads, torch {res['torch']}, "
        f"{res['date']}. One forward of a batch of {a.batch} noisy inputs across timesteps; "
        f"median of {a.repeats}.",
        "",
        "| execution | seconds | speed vs fp32 |",
        "|---|---|---|",
        f"| fp32 eager | {fp32:.4f} | 1.00x |",
        f"| bf16 autocast | {tb:.4f} | {fp32 / tb:.2f}x |",
        f"| int8 (FX, per-channel weights, calibrated activations) | {ti:.4f} | "
        f"{fp32 / ti:.2f}x |",
        "",
        f"int8 output error vs fp32: {err:.2%} relative RMS. Verdict: int8 execution is "
        f"{verdict}.", ""]))


if __name__ == "__main__":
    main()
