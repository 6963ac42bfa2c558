"""The pieces of an optimisation loop that :mod:`~minidiff.train` and
:mod:`~minidiff.distill` share: the seed of a step, the learning-rate schedule, the EMA update,
label dropout, and the metrics log cut back to a resumed step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .files import atomic_write_text
from .settings import DistillConfig, TrainConfig


def step_seed(seed: int, step: int) -> int:
    """The seed of every random draw of optimizer step ``step``: resuming replays them exactly."""
    return seed * 1_000_003 + step


def lr_at(cfg: TrainConfig | DistillConfig, step: int, total: int) -> float:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``lr_min_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * cos)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over parameters; buffers are copied."""
    pairs = list(zip(ema.parameters(), model.parameters(), strict=True))
    # one fused kernel per tensor group, not one per parameter (launch-bound on a GPU)
    torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - decay)
    for (_, e), (_, b) in zip(ema.named_buffers(), model.named_buffers(), strict=True):
        e.copy_(b)


def drop_labels(y: torch.Tensor, p: float, null: int, generator=None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each of ``y: [N]`` becomes the ``null`` class
    with probability ``p``, so one model learns both p(x | y) and p(x)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null), y)


def trim_log(path: Path, step: int) -> None:
    """Keep only the lines of a metrics.jsonl that a run restored at ``step`` has produced."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
