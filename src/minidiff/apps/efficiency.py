"""Efficiency of a checkpoint: parameters, bytes on disk, MACs, peak memory, sampling time."""

from __future__ import annotations

import resource

import torch

from ..checkpoint import load_checkpoint, resolve
from ..generation import resolve_sampling, time_generation
from ..runtime import cpu_name, environment, resolve_device
from ..settings import SamplingConfig
from ..unet import count_macs, count_params


def efficiency(checkpoint, cfg: SamplingConfig | None = None, *, time_n: int = 256,
               device: str = "auto") -> dict:
    """Measure ``checkpoint`` sampled as ``cfg`` says (default: the defaults); the
    10,000-sample time is measured on ``time_n`` samples, after a warm-up of 8, and scaled
    linearly (exact when ``time_n`` = 10,000)."""
    dev = resolve_device(device)
    model, config, _ = load_checkpoint(checkpoint, dev)
    weights, _ = resolve(checkpoint)
    cfg, sched = resolve_sampling(cfg or SamplingConfig(), config, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # the warm-up (8 images) peaks below the timed run, so the peak is the timed run's
    seconds = time_generation(model, sched, cfg, time_n, device=dev, warmup=8).seconds
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "params": count_params(model),
        "bytes_on_disk": weights.stat().st_size,
        "macs_per_forward": count_macs(model.cpu()),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": "CUDA allocated" if dev.type == "cuda" else "process max RSS",
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "timed_samples": time_n,
        "timed_seconds": round(seconds, 2),
        "seconds_per_10k": round(seconds * 10000 / time_n, 1),
        "seconds_per_10k_is": "measured" if time_n == 10000 else f"extrapolated from {time_n}",
        **environment(dev),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
    }
