"""Efficiency of a checkpoint: parameters, bytes on disk, MACs, peak memory, sampling time."""

from __future__ import annotations

import resource
import time

import torch

from .checkpoint import load_checkpoint, resolve
from .runtime import cpu_name, resolve_device, resolve_precision
from .samplers import generate
from .sampling import DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, sampling_schedule
from .unet import count_macs, count_params


def efficiency(checkpoint, *, sampler: str = DEFAULT_SAMPLER, steps: int | None = DEFAULT_STEPS,
               spacing: str = DEFAULT_SPACING,
               time_n: int = 256, batch_size: int = 256, precision: str = "auto",
               device: str = "auto") -> dict:
    """Measure ``checkpoint``; the 10,000-sample time is measured on ``time_n`` samples and
    scaled linearly (exact when ``time_n`` = 10,000)."""
    dev = resolve_device(device)
    model, config, _ = load_checkpoint(checkpoint, dev)
    weights, _ = resolve(checkpoint)
    sched, steps = sampling_schedule(config, steps, spacing)
    prec = resolve_precision(precision, dev)
    generate(model, sched, min(8, time_n), sampler=sampler, batch_size=batch_size,
             precision=prec, device=dev)  # warm-up (kernel selection, allocator)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate(model, sched, time_n, sampler=sampler, batch_size=batch_size, precision=prec,
             device=dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "params": count_params(model),
        "bytes_on_disk": weights.stat().st_size,
        "macs_per_forward": count_macs(model.cpu()),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": "CUDA allocated" if dev.type == "cuda" else "process max RSS",
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "precision": prec,
        "batch_size": batch_size,
        "timed_samples": time_n,
        "timed_seconds": round(seconds, 2),
        "seconds_per_10k": round(seconds * 10000 / time_n, 1),
        "seconds_per_10k_is": "measured" if time_n == 10000 else f"extrapolated from {time_n}",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
    }
