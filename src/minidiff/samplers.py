"""Samplers: pure functions with one signature, and their registry.

Every sampler is ``sampler(model, x, sched, *, y=None, generator=None, callback=None) -> x0``
where ``x: [N x C x H x W]`` is the starting noise ``x_T``, ``sched`` a (possibly respaced)
:class:`~minidiff.diffusion.Schedule`, and the result lies in ``[-1, 1]``. A sampler reads the
network's output only through ``sched.eps_x0``, so it serves eps- and v-prediction alike.
Adding a sampler means writing one function here and adding it to :data:`SAMPLERS` (and its name to
:data:`minidiff.settings.SAMPLER_NAMES`, which the command line offers without importing torch).
The batched driver that runs them is :func:`minidiff.generation.generate`.
"""

from __future__ import annotations

import math
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
        # x_0 the network's output implies (eq. 15 for eps); clipping it to the data range is
        # what keeps an imperfect predictor from drifting off the image manifold.
        _, x0 = sched.eps_x0(model(x, ts[idx], y), x, idx)
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


def predict_x0(model, x, sched: Schedule, i, y=None, clip: bool = True):
    """The eps and x_0 the model's output at schedule index ``i`` (an int, or ``[N]`` indices,
    one per row of ``x``) implies (Ho et al. eq. 15) -> ``(eps, x0)``, both like ``x``."""
    n = x.shape[0]
    t = sched.timesteps.to(x.device)[i].expand(n)
    eps, x0 = sched.eps_x0(model(x, t, y), x, i)
    if clip:
        if isinstance(i, int):
            ab = sched.alpha_bar[i].item()
        else:
            ab = gather(sched.alpha_bar, i, x.ndim)
        x0 = x0.clamp(-1, 1)
        eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5  # keep eps consistent with the clipped x0
    return eps, x0


@torch.no_grad()
def sample_ddim(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                eta: float = 0.0, clip_denoised: bool = True):
    """DDIM, Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 has DDPM's variance."""
    for i in reversed(range(len(sched))):
        eps, x0 = predict_x0(model, x, sched, i, y, clip_denoised)
        ab, ab_prev = sched.alpha_bar[i].item(), sched.alpha_bar_prev[i].item()
        # sigma_t of eq. 16: eta interpolates between DDIM (0) and DDPM's beta-tilde (1)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if callback is not None:
            callback({"i": i, "t": int(sched.timesteps[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                    clip_denoised: bool = True):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: multistep, data prediction, no noise."""
    def lam(ab):  # half log-SNR, lambda = log(alpha / sigma)
        return 0.5 * (torch.log(ab) - torch.log1p(-ab)).item()

    x0_prev, h_prev = None, None
    for i in reversed(range(len(sched))):
        _, x0 = predict_x0(model, x, sched, i, y, clip_denoised)
        ab, ab_next = sched.alpha_bar[i], sched.alpha_bar_prev[i]
        if i == 0:  # the next "time" is clean data (sigma = 0): the update reduces to x0
            x = x0
        else:
            h = lam(ab_next) - lam(ab)
            if x0_prev is None:
                d = x0  # first step: DPM-Solver++(1), i.e. DDIM
            else:  # second-order multistep correction from the previous x0 prediction
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            sig_ratio = ((1 - ab_next) / (1 - ab)).sqrt().item()
            x = sig_ratio * x - ab_next.sqrt().item() * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": int(sched.timesteps[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                        clip_denoised: bool = True):
    """SDE-DPM-Solver++(2M), Lu et al. 2022 (the variant diffusers calls ``sde-dpmsolver++``,
    midpoint rule): the multistep data-prediction solver of the reverse SDE. Each step injects
    fresh noise, which corrects an imperfect noise predictor the way DDPM's steps do.
    """
    def lam(ab):  # half log-SNR, lambda = log(alpha / sigma)
        return 0.5 * (math.log(ab) - math.log1p(-ab))

    x0_prev, h_prev = None, None
    for i in reversed(range(len(sched))):
        _, x0 = predict_x0(model, x, sched, i, y, clip_denoised)
        ab, ab_next = sched.alpha_bar[i].item(), sched.alpha_bar_prev[i].item()
        if i == 0:  # sigma_next = 0: exp(-h) = 0 and the update is x0
            x = x0
        else:
            h = lam(ab_next) - lam(ab)
            d = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)
            s, s_next = (1 - ab) ** 0.5, (1 - ab_next) ** 0.5
            x = (s_next / s * math.exp(-h)) * x - ab_next ** 0.5 * math.expm1(-2 * h) * d
            x = x + s_next * (-math.expm1(-2 * h)) ** 0.5 * torch.randn(
                x.shape, device=x.device, generator=generator)
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": int(sched.timesteps[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


SAMPLERS: dict[str, Callable] = {"ddpm": sample_ddpm, "ddim": sample_ddim,
                                 "dpmpp": sample_dpmpp_2m, "dpmpp-sde": sample_dpmpp_2m_sde}
