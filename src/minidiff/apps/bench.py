"""``minidiff bench``: training images/s and the time for 10,000 samples, per preset and sampler,
beside diffusers' UNet2DModel at matched widths, against this machine's measured matmul peak.

Every job runs in this one process, one after another, on random inputs (the network's speed,
not the data pipeline's); each rate is the median of several timed repetitions after a warm-up.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..diffusion import DiffusionConfig, DiffusionLoss, Schedule
from ..errors import MinidiffError
from ..files import atomic_write_text
from ..generation import time_generation, to_uint8
from ..runtime import (
    autocast_context,
    cpu_bf16_native,
    environment,
    environment_line,
    resolve_precision,
    timed,
)
from ..settings import SAMPLER_NAMES, SamplingConfig
from ..unet import PRESETS, UNet, count_macs, count_params

# diffusers' schedulers beside ours, at the same number of network evaluations
DIFFUSERS_SCHEDULERS = {"ddpm": ("DDPMScheduler", {}),
                        "ddim": ("DDIMScheduler", {}),
                        "dpmpp": ("DPMSolverMultistepScheduler", {}),
                        "dpmpp-sde": ("DPMSolverMultistepScheduler",
                                      {"algorithm_type": "sde-dpmsolver++"})}


# the timesteps both implementations sample (a step's cost does not depend on which): one that
# diffusers' schedulers offer too
BENCH_SPACING = "trailing"


def _median_seconds(fn: Callable[[], object], reps: int) -> float:
    return timed(fn, reps, warmup=fn).seconds


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured GFLOP/s of an ``n x n`` matmul in ``dtype``: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, reps) / 1e9


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel behind minidiff's ``model(x, t, y) -> eps`` signature."""

    def __init__(self, channels: tuple[int, ...], norm_groups: int = 8):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1,
                               block_out_channels=tuple(channels), layers_per_block=1,
                               down_block_types=("DownBlock2D",) * len(channels),
                               up_block_types=("UpBlock2D",) * len(channels),
                               norm_num_groups=norm_groups)

    def forward(self, x, t, y=None):
        return self.net(x, t).sample


def train_rate(net: nn.Module, batch: int, precision: str, reps: int = 8) -> float:
    """Images/s of full training steps (forward, backward, clipping, AdamW) on random data."""
    loss_fn = DiffusionLoss(Schedule.from_config(DiffusionConfig()))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, 28, 28) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    net.train()

    def step():
        with autocast_context(torch.device("cpu"), precision):
            loss = loss_fn(net, x0, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return batch / _median_seconds(step, reps)


def sample_seconds_ours(net: nn.Module, cfg: SamplingConfig, n: int,
                        compile: bool = False) -> tuple[float, float]:
    """``(seconds for n samples, seconds of the first run)``: compiled, the first run compiles."""
    sched = Schedule.from_config(DiffusionConfig()).respace(cfg.steps, cfg.spacing, cfg.rho)
    run = time_generation(net, sched, cfg, n, warmup=n, repeats=3, compile=compile)
    return run.seconds, run.warmup_seconds


def sample_seconds_diffusers(net: DiffusersEps, sampler: str, steps: int, n: int, batch: int,
                             precision: str) -> tuple[float, float]:
    """The same job the way a diffusers user writes it: the scheduler's ``step`` loop."""
    import diffusers

    cls_name, kw = DIFFUSERS_SCHEDULERS[sampler]
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear",
                                         beta_start=1e-4, beta_end=0.02,
                                         timestep_spacing=BENCH_SPACING, **kw)
    gen = torch.Generator().manual_seed(0)

    def run():
        with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):
            for start in range(0, n, batch):
                sched.set_timesteps(steps)  # resets the multistep solvers' state
                x = torch.randn(min(batch, n - start), 1, 28, 28, generator=gen)
                for t in sched.timesteps:
                    x = sched.step(net.net(x, t).sample.float(), t, x,
                                   generator=gen).prev_sample
                to_uint8(x)

    net.eval()
    t = timed(run, 3, warmup=run)
    return t.seconds, t.warmup_seconds


def measure_peaks(precisions=("fp32", "bf16")) -> dict[str, float | None]:
    """Matmul GFLOP/s per precision, measured only where the CPU runs it natively: emulated bf16
    (~1 GFLOP/s) is recorded as None, not timed."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: round(matmul_peak(dtypes[p]), 1) if p == "fp32" or cpu_bf16_native() else None
            for p in precisions}


def run_bench(*, presets=("reduced", "baseline", "shallow"), n: int = 500, batch: int = 250,
              train_batch: int = 128, steps: int = SamplingConfig().steps,
              precision: str = "auto", samplers=SAMPLER_NAMES, anchor: bool = True,
              compile_: bool = False, log=print) -> dict:
    """All jobs in one run -> a JSON-able dict with rates, FLOP efficiency and ratios.

    ``precision="auto"`` is what every other command picks: bf16 where it is native, else fp32.
    Each row's ``peak_fraction`` is against the measured peak of the precision that row ran in.
    ``log(message_or_row, results_so_far)`` is called after each measurement."""
    precision = resolve_precision(precision, torch.device("cpu"))
    if precision == "bf16" and not cpu_bf16_native():
        raise MinidiffError("bench: bf16 is emulated on this CPU (~100x slower than fp32), so it "
                            "is not timed; use --precision auto or fp32")
    torch.manual_seed(0)
    env = environment()
    res = {**env, "precision": precision, "sample_n": n,
           "sample_batch": batch, "train_batch": train_batch, "steps": steps,
           "spacing": BENCH_SPACING, "rows": []}
    res["peak_gflops"] = measure_peaks()
    log(f"matmul peak GFLOP/s: {res['peak_gflops']}", res)
    if anchor:
        try:
            import diffusers
            res["diffusers"] = diffusers.__version__
        except ImportError:
            log("note: diffusers is not installed, so no anchor rows; `pip install diffusers`",
                res)
            anchor = False

    for preset in presets:
        cfg = PRESETS[preset]
        nets = [("minidiff", UNet(cfg))]
        if anchor:
            nets.append(("diffusers", DiffusersEps(cfg.channels, cfg.norm_groups)))
        for impl, net in nets:
            macs = count_macs(net, (1, 1, 28, 28))
            # the anchor is timed in fp32 and in bf16 and keeps its faster (its bf16 autocast
            # hits slow CPU paths); minidiff runs in the precision asked for
            precs = (precision,) if impl == "minidiff" else tuple(dict.fromkeys(
                (precision, "fp32")))
            peak = res["peak_gflops"]
            base = {"preset": preset, "impl": impl, "params": count_params(net),
                    "macs_per_image": macs}
            ips, prec = max((train_rate(net, train_batch, p), p) for p in precs)
            gflops = 3 * 2 * macs * ips / 1e9  # backward ~ twice the forward
            res["rows"].append({**base, "job": "train", "precision": prec,
                                "img_per_s": round(ips, 1), "gflops": round(gflops, 1),
                                "peak_fraction": round(gflops / peak[prec], 3)})
            log(res["rows"][-1], res)
            for sampler in samplers:
                if impl == "diffusers" and sampler not in DIFFUSERS_SCHEDULERS:
                    continue
                compiled_too = (impl == "minidiff" and compile_
                                and sampler == SamplingConfig().sampler)
                for comp in (False, True) if compiled_too else (False,):
                    cfg = SamplingConfig(sampler=sampler, steps=steps, spacing=BENCH_SPACING,
                                         batch_size=batch)
                    (sec, first), prec = min(
                        ((sample_seconds_ours(net, replace(cfg, precision=p), n, compile=comp)
                          if impl == "minidiff" else
                          sample_seconds_diffusers(net, sampler, steps, n, batch, p)), p)
                        for p in precs)
                    gflops = 2 * macs * steps * n / sec / 1e9
                    res["rows"].append({**base, "job": f"sample {sampler}-{steps}"
                                        + (" compiled" if comp else ""), "precision": prec,
                                        "img_per_s": round(n / sec, 1),
                                        "seconds_per_10k": round(sec * 10000 / n, 1),
                                        "first_run_extra_s": round(first - sec, 1),
                                        "gflops": round(gflops, 1),
                                        "peak_fraction": round(gflops / peak[prec], 3)})
                    log(res["rows"][-1], res)
    for r in res["rows"]:
        if r["impl"] == "minidiff":
            peer = next((p for p in res["rows"] if p["impl"] == "diffusers"
                         and p["preset"] == r["preset"] and p["job"] == r["job"]), None)
            if peer:
                r["vs_diffusers"] = round(r["img_per_s"] / peer["img_per_s"], 2)
    return res


def write_bench(out: str | Path, command: str, **kw) -> tuple[Path, Path]:
    """:func:`run_bench` (``kw``) into the folder ``out``: each measurement is printed and kept
    in ``bench.partial.json`` as it comes (a stopped run keeps what it measured), then
    ``bench.json`` and ``bench.md`` (:func:`report`, naming ``command``) replace it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "bench.partial.json"

    def log(row, res):
        print(json.dumps(row) if isinstance(row, dict) else row, flush=True)
        atomic_write_text(partial, json.dumps(res, indent=2) + "\n")

    res = run_bench(log=log, **kw)
    partial.unlink(missing_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "bench.md", report(res, command))
    return out / "bench.json", out / "bench.md"


def report(res: dict, command: str) -> str:
    """The benchmark as Markdown, with each speed target met or missed by how much."""
    p = res["peak_gflops"]
    peaks = ", ".join(f"{k} {v} GFLOP/s" if v is not None else f"{k}: emulated, not measured"
                      for k, v in p.items())
    lines = [f"# minidiff bench ({environment_line(res)}, {res['precision']})", "",
             f"Measured matmul peak: {peaks} (2048^2 matmul, median); each row's share of peak "
             "is against the peak of its own precision. Training: batch "
             f"{res['train_batch']}, full AdamW steps on random "
             f"data, FLOPs = 3 x forward. Sampling: {res['sample_n']} images in batches of "
             f"{res['sample_batch']}, {res['steps']} network evaluations each, scaled to 10,000 "
             "(linear in n). diffusers "
             f"{res.get('diffusers', '(not installed)')}: UNet2DModel at the same widths, one "
             "layer per block, no attention, its own schedulers' `step` loop.", "",
             "| preset | impl | params | MFLOP/img | job | img/s | s per 10k | GFLOP/s | "
             "of peak | vs diffusers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['preset']} | {r['impl']} | {r['params']:,} | "
                     f"{2 * r['macs_per_image'] / 1e6:.0f} | {r['job']} | {r['img_per_s']} | "
                     f"{r.get('seconds_per_10k', '')} | {r['gflops']} | "
                     f"{r['peak_fraction']:.0%} | "
                     f"{str(r['vs_diffusers']) + 'x' if 'vs_diffusers' in r else ''} |")
    lines += ["", "## Targets", ""]
    default_job = f"sample {SamplingConfig().sampler}-{res['steps']}"
    for r in (r for r in res["rows"] if r["impl"] == "minidiff"):
        what = f"{r['preset']} {r['job']}"
        if r["preset"] == "baseline" and r["job"] in ("train", default_job):
            f = r["peak_fraction"]
            lines.append(f"- efficiency, {what}: {f:.0%} of the measured peak (target 50%: "
                         + ("met" if f >= 0.5 else f"missed by {0.5 - f:.0%} of peak") + ").")
        if "vs_diffusers" in r and r["job"] in ("train", default_job):
            v = r["vs_diffusers"]
            lines.append(f"- peers, {what}: {v}x diffusers (target 2x: "
                         + ("met" if v >= 2 else f"missed, {v / 2:.0%} of it") + ").")
        if r["job"] == default_job and r["preset"] in ("reduced", "baseline"):
            limit, sec = (30 if r["preset"] == "reduced" else 120), r["seconds_per_10k"]
            lines.append(f"- absolute, 10,000 samples from {r['preset']}: {sec} s (target "
                         f"{limit} s: " + ("met" if sec <= limit else
                                           f"missed by {sec - limit:.1f} s") + ").")
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"
