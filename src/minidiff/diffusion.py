"""The DDPM process (Ho et al. 2020): noise schedule, forward noising and the training loss.

The network is an argument, never an attribute: any ``model(x, t, y)`` works. It predicts the
noise ``eps`` (Ho et al.) or, with ``prediction="v"``, ``v = sqrt(ab) eps - sqrt(1 - ab) x0``
(Salimans & Ho 2022); :meth:`Schedule.eps_x0` turns either into ``(eps, x0)``, which is all a
sampler uses. All schedule coefficients are computed once in float64 and gathered per timestep
in float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .settings import LOSS_WEIGHTINGS, NOISE_LEVELS, PREDICTIONS, SCHEDULES, SPACINGS


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: ``T`` steps of a ``linear`` or ``cosine`` beta schedule, and what
    the network predicts (``eps`` or ``v``)."""

    # the recipe's: v-prediction on the cosine schedule converged fastest on MNIST
    # (benchmarks/results/convergence.md); minidiff.study.reference.DIFFUSION is the one before
    timesteps: int = 1000
    schedule: str = "cosine"
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    prediction: str = "v"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of "
                             f"{PREDICTIONS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError("need 0 < beta_start <= beta_end < 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        # configs written before `prediction` existed are all noise predictors (and every
        # config names its schedule)
        return cls(**{"prediction": "eps", **d})


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """``[T]`` float64 betas for the configured schedule."""
    T = cfg.timesteps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    # cosine (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class Schedule:
    """Precomputed float64 coefficients of a beta schedule (optionally a respaced subset).

    ``timesteps[i]`` is the model-facing timestep of schedule index ``i``; for the full schedule
    it is simply ``i``. Respacing (Nichol & Dhariwal 2021, sec. 4) keeps the ``alpha_bar`` of a
    subset of steps and recomputes the betas between them, so the model sees the same
    timesteps it was trained on.
    """

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor | None = None,
                 prediction: str = "eps"):
        betas = betas.to(torch.float64)
        self.prediction = prediction
        assert betas.ndim == 1 and bool(((betas > 0) & (betas < 1)).all())
        self.betas = betas
        self.timesteps = (
            torch.arange(len(betas)) if timesteps is None else timesteps.to(torch.long)
        )
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # posterior q(x_{t-1} | x_t, x_0) variance, Ho et al. eq. 7
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        return cls(make_betas(cfg), prediction=cfg.prediction)

    def eps_x0(self, out: torch.Tensor, x: torch.Tensor, i) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and clean image that network output ``out`` (for ``x`` at schedule index
        ``i``: an int or ``[N]`` indices) implies -> ``(eps, x0)``, both like ``x``."""
        if isinstance(i, int):
            a, s = self.sqrt_alpha_bar[i].item(), self.sqrt_one_minus_alpha_bar[i].item()
        else:
            a = gather(self.sqrt_alpha_bar, i, x.ndim)
            s = gather(self.sqrt_one_minus_alpha_bar, i, x.ndim)
        out = out.float()
        if self.prediction == "v":  # x = a x0 + s eps, v = a eps - s x0 (a^2 + s^2 = 1)
            return s * x + a * out, a * x - s * out
        return out, (x - s * out) / a

    def __len__(self) -> int:
        return len(self.betas)

    def respace(self, steps: int, spacing: str = "uniform", rho: float = 7.0) -> "Schedule":
        """A schedule over ``steps`` timesteps of this one (improved-diffusion's respacing).

        ``uniform``: evenly spaced from the first to the last timestep. ``trailing``: evenly
        spaced ending at the last timestep (Lin et al. 2024, table 2). ``quadratic``: denser at
        low noise, ``t_k = floor((k * sqrt(0.8 T) / (S - 1))^2)`` (Song et al. 2021, DDIM, C.2).
        ``karras``: ``sigma = sqrt((1 - ab) / ab)`` spaced as ``sigma_k^(1/rho)`` uniform
        (Karras et al. 2022, eq. 5, whose rho is 7; lower puts more steps at high noise).
        ``logsnr``: uniform in log-SNR, i.e. in ``log sigma`` (Lu et al. 2022, DPM-Solver,
        sec. 3.3). Both map each sigma to the nearest
        timestep in ``log sigma`` and start at the last timestep (pure noise). A repeated
        timestep is moved to the next free one: it would be a zero-length step.
        """
        T = len(self)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
        if spacing == "uniform":
            if steps == T:
                return self
            idx = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        elif spacing == "trailing":
            idx = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round().long() - 1).flip(0)
        elif spacing == "quadratic":
            idx = (torch.linspace(0, math.sqrt(0.8 * T), steps, dtype=torch.float64) ** 2).long()
            idx = _distinct(idx)
        else:
            idx = _distinct(self._log_sigma_spaced(steps, rho if spacing == "karras" else None),
                            top=T - 1)
        assert idx[-1] <= T - 1
        ab = self.alpha_bar[idx]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return Schedule(1.0 - ab / ab_prev, self.timesteps[idx], self.prediction)


    def _log_sigma_spaced(self, steps: int, rho: float | None, top: float = 2.55
                          ) -> torch.Tensor:
        """``steps`` timesteps, in increasing order, whose ``sigma^(1/rho)`` is evenly spaced
        from the noise level ``log sigma = top`` (or the last timestep's, if lower) down to the
        first timestep's (rho None: even in log sigma, the limit of a large rho). The grid has
        ``steps + 1`` points and its lowest stands for the clean data that the last step lands
        on, so no network evaluation is spent at ``t = 0``."""
        log_sigma = 0.5 * (torch.log1p(-self.alpha_bar) - torch.log(self.alpha_bar))
        # A schedule whose alpha_bar reaches ~0 (cosine: SNR 1e-9 at T) would spend steps where
        # the image is already pure noise; the top is clipped at log-SNR -5.1 (diffusers' clip
        # for cosine) whatever the schedule, and the first step starts from the last timestep.
        hi, lo = min(log_sigma[-1].item(), top), log_sigma[0].item()
        if steps == 1:
            return torch.tensor([len(self) - 1])
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)[1:]
        if rho is None:
            target = lo + ramp * (hi - lo)
        else:
            s_lo, s_hi = math.exp(lo / rho), math.exp(hi / rho)
            target = rho * torch.log(s_lo + ramp * (s_hi - s_lo))
        # nearest timestep in log sigma (log_sigma increases with the index)
        pos = torch.searchsorted(log_sigma, target).clamp(1, len(self) - 1)
        below = (target - log_sigma[pos - 1]) < (log_sigma[pos] - target)
        idx = torch.where(below, pos - 1, pos)
        idx[-1] = len(self) - 1
        return idx


def _distinct(idx: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """Increasing timesteps with each repeat moved to the next free one (a repeated timestep
    would be a zero-length step); with ``top``, none above it (crowded ones move down)."""
    idx = idx.clone()
    for k in range(1, len(idx)):
        idx[k] = max(idx[k], idx[k - 1] + 1)
    if top is not None:
        idx[-1] = min(idx[-1], top)
        for k in range(len(idx) - 2, -1, -1):
            idx[k] = min(idx[k], idx[k + 1] - 1)
    return idx


def gather(coef: torch.Tensor, i: torch.Tensor, ndim: int) -> torch.Tensor:
    """``coef[i]`` as float32 on ``i``'s device, shaped ``[N x 1 x ... x 1]`` for broadcasting."""
    out = coef.to(i.device)[i].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def q_sample(sched: Schedule, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor):
    """Sample ``x_t ~ q(x_t | x_0)`` (Ho et al. eq. 4).

    ``x0, noise: [N x C x H x W]``, ``i: [N]`` -> ``[N x C x H x W]``."""
    return (
        gather(sched.sqrt_alpha_bar, i, x0.ndim) * x0
        + gather(sched.sqrt_one_minus_alpha_bar, i, x0.ndim) * noise
    )


class DiffusionLoss:
    """The DDPM objective: ``E ||target - model(x_t, t)||^2`` with ``target`` the noise (Ho et
    al. eq. 14) or ``v``, as the schedule's ``prediction`` says.

    Each sample is weighted by ``weighting``: ``none``; ``min-snr`` (Hang et al. 2023,
    min-SNR-gamma: the x0-error weight ``min(SNR, gamma)`` in the target's units, i.e.
    ``min(SNR, gamma) / SNR`` for eps and ``min(SNR, gamma) / (SNR + 1)`` for v), which stops the
    many easy low-noise steps from dominating the gradient; or ``edm`` (Karras et al. 2022,
    eq. 8 and table 1): the x0-error weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
    with ``sigma = sqrt((1 - ab) / ab)``, in the target's units ``(sigma^2 + sigma_data^2) /
    (sigma_data^2 (1 + sigma^2))`` for v (uniform when ``sigma_data`` is 1: v-prediction is EDM's
    parameterisation for unit data) and ``(sigma^2 + sigma_data^2) / sigma_data^2`` for eps. The
    EDM weights are scaled to mean 1 over the trained noise levels, so gradient clipping acts as
    on the plain loss.

    ``levels`` says which timesteps a batch trains on: ``uniform`` (every one alike, Ho et al.)
    or ``lognormal``: ``log sigma ~ N(mean, std)`` (EDM's P_mean, P_std), each draw taken to
    the timestep nearest in log sigma, i.e. timestep ``i`` with the normal's mass between the
    midpoints to its neighbours (the tails go to the first and last).
    """

    def __init__(self, sched: Schedule, weighting: str = "none", gamma: float = 5.0, *,
                 levels: str = "uniform", level_mean: float = -1.2, level_std: float = 1.2,
                 sigma_data: float = 0.5):
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of "
                             f"{LOSS_WEIGHTINGS}")
        if levels not in NOISE_LEVELS:
            raise ValueError(f"unknown noise levels {levels!r}; choose one of {NOISE_LEVELS}")
        self.sched, self.weighting, self.gamma = sched, weighting, gamma
        ab = sched.alpha_bar
        snr = ab / (1 - ab)
        # the probability of training on each timestep (None: uniform), and its float32 copy
        # that draw() samples from
        self.level_probs = self._draw_probs = None
        if levels == "lognormal":
            log_sigma = -0.5 * torch.log(snr)
            edges = (log_sigma[1:] + log_sigma[:-1]) / 2  # log sigma rises with the index
            cdf = torch.distributions.Normal(level_mean, level_std).cdf(edges)
            self.level_probs = torch.diff(cdf, prepend=cdf.new_zeros(1),
                                          append=cdf.new_ones(1))
            self._draw_probs = self.level_probs.float()
        if weighting == "none":
            self.weights = torch.ones_like(snr)
        elif weighting == "min-snr":
            self.weights = snr.clamp(max=gamma) / (snr + (sched.prediction == "v"))
        else:
            sigma2, sd2 = 1 / snr, sigma_data ** 2
            per_target = 1 / (1 + snr) if sched.prediction == "v" else sigma2  # x0 err^2 per
            w = (sigma2 + sd2) / (sigma2 * sd2) * per_target
            probs = self.level_probs if self.level_probs is not None else 1 / len(w)
            self.weights = w / (w * probs).sum()

    def draw(self, shape, device, generator=None):
        """Timestep indices ``[N]`` and noise ``shape = [N x C x H x W]`` for one batch."""
        if self.level_probs is None:
            i = torch.randint(0, len(self.sched), (shape[0],), device=device,
                              generator=generator)
        else:
            i = torch.multinomial(self._draw_probs.to(device), shape[0], replacement=True,
                                  generator=generator)
        return i, torch.randn(shape, device=device, generator=generator)

    def __call__(self, model, x0: torch.Tensor, y: torch.Tensor | None = None, generator=None,
                 i: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """Mean loss over ``x0: [N x C x H x W]`` with uniformly drawn timesteps (or the given
        indices ``i: [N]`` and ``noise``, e.g. one rank's shard of a batch's draws)."""
        if i is None or noise is None:
            i, noise = self.draw(x0.shape, x0.device, generator)
        x_t = q_sample(self.sched, x0, i, noise)
        out = model(x_t, self.sched.timesteps.to(x0.device)[i], y).float()
        if self.sched.prediction == "v":
            target = (gather(self.sched.sqrt_alpha_bar, i, x0.ndim) * noise
                      - gather(self.sched.sqrt_one_minus_alpha_bar, i, x0.ndim) * x0)
        else:
            target = noise
        per_sample = (out - target).pow(2).flatten(1).mean(1)
        if self.weighting == "none":
            return per_sample.mean()
        return (gather(self.weights, i, 1) * per_sample).mean()
