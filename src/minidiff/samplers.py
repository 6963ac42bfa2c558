"""Samplers: pure functions with one signature, and a batched driver.

Every sampler is ``sampler(model, x, sched, *, y=None, generator=None, callback=None) -> x0``
where ``x: [N x C x H x W]`` is the starting noise ``x_T``, ``sched`` a (possibly respaced)
:class:`~minidiff.diffusion.Schedule`, and the result lies in ``[-1, 1]``. Adding a sampler means
writing one function here and adding it to :data:`SAMPLERS`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .diffusion import Schedule, gather


@torch.no_grad()
def sample_ddpm(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                clip_denoised: bool = True):
    """DDPM ancestral sampling, Ho et al. 2020, Algorithm 2 (posterior variance beta-tilde)."""
    n = x.shape[0]
    ts = sched.timesteps.to(x.device)
    # posterior mean coefficients of q(x_{t-1} | x_t, x_0), Ho et al. eq. 7
    c_x0 = sched.betas * sched.alpha_bar_prev.sqrt() / (1.0 - sched.alpha_bar)
    c_xt = (1.0 - sched.alpha_bar_prev) * sched.alphas.sqrt() / (1.0 - sched.alpha_bar)
    for i in reversed(range(len(sched))):
        idx = torch.full((n,), i, device=x.device, dtype=torch.long)
        eps = model(x, ts[idx], y).float()
        # Predict x_0 from eps (eq. 15); clipping it to the data range is what keeps an
        # imperfect predictor from drifting off the image manifold.
        x0 = (x - gather(sched.sqrt_one_minus_alpha_bar, idx, x.ndim) * eps) / gather(
            sched.sqrt_alpha_bar, idx, x.ndim
        )
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = gather(c_x0, idx, x.ndim) * x0 + gather(c_xt, idx, x.ndim) * x
        if i > 0:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = mean + gather(sched.posterior_variance, idx, x.ndim).sqrt() * noise
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": int(ts[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


SAMPLERS: dict[str, Callable] = {"ddpm": sample_ddpm}


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when asked for, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate(model, sched: Schedule, n: int, *, sampler: str = "ddpm", seed: int = 0,
             batch_size: int = 256, y: torch.Tensor | None = None, precision: str = "fp32",
             device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None):
    """Draw ``n`` samples in batches -> uint8 ``[n x H x W]`` (one channel) or ``[n x C x H x W]``.

    The noise of sample ``k`` depends only on ``seed`` and ``k``'s batch, so results are
    reproducible for a given ``batch_size``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fn = SAMPLERS[sampler]
    device = torch.device(device)
    cfg = model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = []
    with torch.inference_mode(), autocast_context(device, precision):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, *shape), device=device, generator=gen)
            yb = None if y is None else y[start:start + b].to(device)
            x0 = fn(model, x, sched, y=yb, generator=gen)
            out.append(to_uint8(x0).cpu())
            if progress is not None:
                progress(b)
    images = torch.cat(out)
    return images[:, 0] if shape[0] == 1 else images


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (round to nearest)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
