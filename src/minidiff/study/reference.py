"""The original student study (its README's results table and recipes), in one place.

Every comparison with the study (``minidiff models``, the study report and its tables) and
the fine-tuning recipes that ``minidiff train --recipe`` and ``minidiff study`` follow read
from here. Its numbers came from a notebook with 1,000 DDPM steps, most likely on a GPU.
"""

from __future__ import annotations

# the study's results table: parameters, file size (MB, fp32 with pruning masks), pseudo-FID,
# SSIM, seconds for 10,000 samples
STUDY: dict[str, dict] = {
    "baseline": {"params": 2_530_000, "size_mb": 9.72, "pseudo_fid": 10.75, "ssim": 0.3475,
                 "latency_10k_s": 57.6},
    "pruned": {"params": 2_530_000, "size_mb": 9.72, "pseudo_fid": 2.77, "ssim": 0.3674,
               "latency_10k_s": 57.6},
    "reduced": {"params": 634_000, "size_mb": 2.5, "pseudo_fid": 1.76, "ssim": 0.3688,
                "latency_10k_s": 31.3},
    "shallow": {"params": 2_150_000, "size_mb": 8.2, "pseudo_fid": 2.39, "ssim": 0.3659,
                "latency_10k_s": 81.6},
}

# the study's baseline epochs; its fine-tuning budgets below are relative to this
EPOCHS = 50

# the study's fine-tuning recipes (`minidiff train --init CKPT --recipe NAME`)
RECIPES: dict[str, dict] = {
    "pruned": {"epochs": 20, "lr": 1e-4},  # after structured + unstructured pruning
    "reduced": {"epochs": 10, "lr": 1e-5},
    "shallow": {"epochs": 20, "lr": 1e-4},
}

# minidiff's training recipe before the convergence benchmark (benchmarks/results/
# convergence.md): the one the shipped 3-epoch models were trained with, kept reachable as
# `minidiff train --original-recipe`: TrainConfig fields (every other field keeps its default)
# and the DiffusionConfig fields that changed
DIFFUSION: dict = {"schedule": "linear", "prediction": "eps"}
TRAINING: dict = {"lr": 1e-3, "batch_size": 128, "warmup_steps": 200, "lr_schedule": "cosine",
                  "lr_min_ratio": 0.1, "ema_decay": 0.999, "ema_power": None,
                  "loss_weighting": "none"}
