"""Samplers: pure functions with one signature, and a batched driver.

Every sampler is ``sampler(model, x, sched, *, y=None, generator=None, callback=None) -> x0``
where ``x: [N x C x H x W]`` is the starting noise ``x_T``, ``sched`` a (possibly respaced)
:class:`~minidiff.diffusion.Schedule`, and the result lies in ``[-1, 1]``. Adding a sampler means
writing one function here and adding it to :data:`SAMPLERS`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .diffusion import Schedule, gather
from .runtime import autocast_context


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


def _predict_x0(model, x, sched: Schedule, i: int, y, clip: bool):
    """Model's eps at schedule index ``i`` and the x_0 it implies (Ho et al. eq. 15)."""
    n = x.shape[0]
    t = sched.timesteps[i].to(x.device).expand(n)
    eps = model(x, t, y).float()
    ab = sched.alpha_bar[i].item()
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5  # keep eps consistent with the clipped x0
    return eps, x0


@torch.no_grad()
def sample_ddim(model, x, sched: Schedule, *, y=None, generator=None, callback=None,
                eta: float = 0.0, clip_denoised: bool = True):
    """DDIM, Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 has DDPM's variance."""
    for i in reversed(range(len(sched))):
        eps, x0 = _predict_x0(model, x, sched, i, y, clip_denoised)
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
        _, x0 = _predict_x0(model, x, sched, i, y, clip_denoised)
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
        _, x0 = _predict_x0(model, x, sched, i, y, clip_denoised)
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


class Guided(torch.nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around a class-conditional noise predictor:
    ``eps = eps(x, t, null) + scale * (eps(x, t, y) - eps(x, t, null))``, both terms from one
    forward pass over the ``2N`` batch. ``scale`` 0 is unconditional, 1 plain conditional, > 1
    trades diversity for class fidelity. Works with every sampler (they only see a model)."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        """``x: [N x C x H x W]``, ``t: [N]``, ``y: [N]`` -> guided ``eps: [N x C x H x W]``."""
        if y is None:
            return self.model(x, t, None)
        null = torch.full_like(y, self.model.config.num_classes)
        eps_c, eps_u = self.model(torch.cat([x, x]), torch.cat([t, t]),
                                  torch.cat([y, null])).float().chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


class CompiledOrEager(torch.nn.Module):
    """``torch.compile`` of a noise predictor that falls back to eager execution, once and with a
    note, when compiling fails on this machine (no C++ compiler, unsupported backend...).

    The graph is compiled for the first batch size seen; smaller batches (a last partial one)
    are padded to it inside ``forward`` so they reuse that graph instead of compiling another.
    """

    def __init__(self, model: torch.nn.Module, warn: Callable[[str], None] | None = None):
        super().__init__()
        self.model, self.warn, self.failed, self.batch = model, warn, False, None
        self.compiled = torch.compile(model, dynamic=False)

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        if not self.failed:
            n = x.shape[0]
            self.batch = self.batch or n
            pad = self.batch - n
            if pad > 0:
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
                t = torch.cat([t, t[:1].expand(pad)])
                y = None if y is None else torch.cat([y, y[:1].expand(pad)])
            try:
                return self.compiled(x, t, y)[:n]
            except Exception as e:  # compiler back-ends raise many types; eager is always right
                self.failed = True
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                (self.warn or print)(f"note: torch.compile failed ({msg}); running eagerly")
                x, t, y = x[:n], t[:n], None if y is None else y[:n]
        return self.model(x, t, y)


def generate(model, sched: Schedule, n: int, *, sampler: str = "ddpm", seed: int = 0,
             batch_size: int = 256, y: torch.Tensor | None = None, precision: str = "fp32",
             device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
             compile: bool = False, guidance: float | None = None, **sampler_kwargs):
    """Draw ``n`` samples in batches -> uint8 ``[n x H x W]`` (one channel) or ``[n x C x H x W]``.

    The noise of sample ``k`` depends only on ``seed`` and ``k``'s batch, so results are
    reproducible for a given ``batch_size``. ``compile=True`` runs the network through
    ``torch.compile`` (falling back to eager if that fails); results then match eager ones up
    to floating-point rounding, not bit for bit. With labels ``y: [n]`` and ``guidance``, a
    class-conditional model is sampled with classifier-free guidance of that scale.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fn = SAMPLERS[sampler]
    device = torch.device(device)
    cfg = model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    net = Guided(model, guidance) if y is not None and guidance is not None else model
    net = CompiledOrEager(net) if compile else net
    out = []
    with torch.inference_mode(), autocast_context(device, precision):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, *shape), device=device, generator=gen)
            yb = None if y is None else y[start:start + b].to(device)
            x0 = fn(net, x, sched, y=yb, generator=gen, **sampler_kwargs)
            out.append(to_uint8(x0).cpu())
            if progress is not None:
                progress(b)
    images = torch.cat(out)
    return images[:, 0] if shape[0] == 1 else images


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (round to nearest)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
