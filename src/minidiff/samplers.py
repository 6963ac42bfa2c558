"""Samplers: pure functions with one signature, and their registry.

Every sampler is ``sampler(model, x, sched, *, y=None, generator=None, callback=None) -> x0``
where ``x: [N x C x H x W]`` is the starting noise ``x_T``, ``sched`` a (possibly respaced)
:class:`~minidiff.diffusion.Schedule`, and the result lies in ``[-1, 1]``. A sampler reads the
network's output only through ``sched.eps_x0``, so it serves eps- and v-prediction alike.
Adding a sampler means writing one function here under ``@register("name")`` and adding the
name to :data:`minidiff.settings.SAMPLER_NAMES`, the one list of names (the command line offers it
without importing torch); ``register`` refuses a name that list lacks. The batched driver that
runs them is :func:`minidiff.generation.generate`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .diffusion import Schedule, gather
from .settings import SAMPLER_NAMES

SAMPLERS: dict[str, Callable] = {}
"""Name -> sampler, filled by :func:`register` in :data:`~minidiff.settings.SAMPLER_NAMES`'s
order."""


def register(name: str) -> Callable[[Callable], Callable]:
    """Register a sampler under ``name``, which :data:`~minidiff.settings.SAMPLER_NAMES` must
    list (that list is what ``--sampler`` offers)."""
    if name not in SAMPLER_NAMES or name in SAMPLERS:
        raise ValueError(f"sampler {name!r}: add it to settings.SAMPLER_NAMES, once")

    def add(fn: Callable) -> Callable:
        SAMPLERS[name] = fn
        return fn
    return add


def half_log_snr(ab: float) -> float:
    """``lambda = log(alpha / sigma)`` of a cumulative ``alpha_bar`` (DPM-Solver's time)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab))


@register("ddpm")
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


@register("ddim")
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


@register("dpmpp")
@torch.no_grad()
def sample_dpmpp_2m(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                    clip_denoised: bool = True):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: multistep, data prediction, no noise."""
    lam = half_log_snr
    x0_prev, h_prev = None, None
    for i in reversed(range(len(sched))):
        _, x0 = predict_x0(model, x, sched, i, y, clip_denoised)
        ab, ab_next = sched.alpha_bar[i].item(), sched.alpha_bar_prev[i].item()
        if i == 0:  # the next "time" is clean data (sigma = 0): the update reduces to x0
            x = x0
        else:
            h = lam(ab_next) - lam(ab)
            if x0_prev is None:
                d = x0  # first step: DPM-Solver++(1), i.e. DDIM
            else:  # second-order multistep correction from the previous x0 prediction
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            sig_ratio = ((1 - ab_next) / (1 - ab)) ** 0.5
            x = sig_ratio * x - ab_next ** 0.5 * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": int(sched.timesteps[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


@register("dpmpp-sde")
@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                        clip_denoised: bool = True):
    """SDE-DPM-Solver++(2M), Lu et al. 2022 (the variant diffusers calls ``sde-dpmsolver++``,
    midpoint rule): the multistep data-prediction solver of the reverse SDE. Each step injects
    fresh noise, which corrects an imperfect noise predictor the way DDPM's steps do.
    """
    lam = half_log_snr
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


@register("unipc")
@torch.no_grad()
def sample_unipc(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                 clip_denoised: bool = True):
    """UniPC-2 with B(h) = e^h - 1 (bh2), Zhao et al. 2023, Algorithms 1-2 in data prediction:
    a second-order multistep predictor (UniP, here the same update as DPM-Solver++(2M)) and a
    corrector (UniC) that refines each point reached with the network output taken there for
    the next step, so it costs no evaluation. First order at the first and the last step, as
    diffusers' ``UniPCMultistepScheduler`` does by default."""
    step = None  # the step that led to x, for the corrector
    for i in reversed(range(len(sched))):
        _, x0 = predict_x0(model, x, sched, i, y, clip_denoised)
        if step is not None and i > 0:  # (the last step lands on x0, corrected or not)
            x = step.corrected(x0)
        ab, ab_next = sched.alpha_bar[i].item(), sched.alpha_bar_prev[i].item()
        if i == 0:  # to clean data (sigma = 0): every order reduces to x0
            x = x0
        else:
            step = _UniStep(x, ab, ab_next, x0, step)
            x = step.predicted()
        if callback is not None:
            callback({"i": i, "t": int(sched.timesteps[i]), "x": x, "x0": x0})
    return x.clamp(-1, 1)


class _UniStep:
    """One UniPC step from ``x`` (at ``alpha_bar = ab``, data prediction ``x0``) to ``ab_next``,
    second order when the previous step's ``x0`` is known (Zhao et al. 2023, eqs. 8 and 10 with
    B(h) = e^h - 1, in the data-prediction form of diffusers' ``multistep_uni_p/c_bh_update``)."""

    def __init__(self, x, ab: float, ab_next: float, x0, before: "_UniStep | None"):
        lam, lam_next = half_log_snr(ab), half_log_snr(ab_next)
        h = lam_next - lam
        self.x, self.x0, self.lam = x, x0, lam
        self.sig_ratio = ((1 - ab_next) / (1 - ab)) ** 0.5
        self.alpha_next = ab_next ** 0.5
        self.phi = math.expm1(-h)  # h_phi_1, and B(h) for bh2
        self.d1 = self.r = None
        if before is not None:  # the multistep difference to the previous output
            self.r = (before.lam - lam) / h  # < 0: that point lies behind
            self.d1 = (before.x0 - x0) / self.r
        # the corrector's weights: rho of R rho = b (order 2), b from the phi-function recursion
        hh = -h
        b1 = (self.phi / hh - 1) / self.phi
        b2 = 2 * ((self.phi / hh - 1) / hh - 0.5) / self.phi
        self.rho = (0.5,) if self.r is None else ((b1 - b2) / (1 - self.r),)
        if self.r is not None:
            self.rho += (b1 - self.rho[0],)

    def _base(self):
        return self.sig_ratio * self.x - self.alpha_next * self.phi * self.x0

    def predicted(self):
        """UniP: first order (DDIM) or, with the difference, rho = 1/2 at second order."""
        if self.d1 is None:
            return self._base()
        return self._base() - self.alpha_next * self.phi * 0.5 * self.d1

    def corrected(self, x0_next):
        """UniC: the same step re-taken with the output ``x0_next`` at the point reached."""
        d_next = x0_next - self.x0
        if self.d1 is None:
            return self._base() - self.alpha_next * self.phi * self.rho[0] * d_next
        corr = self.rho[0] * self.d1 + self.rho[1] * d_next
        return self._base() - self.alpha_next * self.phi * corr
