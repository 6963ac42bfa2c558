"""Few-step students distilled from a trained model (the teacher), with the teacher's U-Net.

Five methods, all trained on real images noised by the forward process, all with a student
that predicts ``v`` (Salimans & Ho 2022), so every sampler reads it through
:meth:`~minidiff.diffusion.Schedule.eps_x0`:

- ``progressive`` (Salimans & Ho 2022, Algorithm 2): round by round, a student initialised
  from its teacher learns to do in one DDIM step what the teacher does in two; the steps halve
  from ``teacher_steps`` to ``steps``, and each round's student teaches the next. Sampled with
  DDIM (eta 0) at exactly its step count.
- ``consistency`` (Song et al. 2023, Algorithm 2, consistency distillation): on a grid of
  ``teacher_steps`` noise levels, the x0 the student predicts at one level must equal what it
  predicts one teacher DDIM step further down (the target side without gradient, as Song &
  Dhariwal 2023 recommend instead of an EMA target); at the lowest level the teacher's own x0
  is the target (the boundary condition). Sampled with DDPM's ancestral steps on the
  student's x0 (one step: the consistency jump) at any step count dividing the grid.
- ``adversarial`` (a distillation loss beside a GAN loss, as in ADD, Sauer et al. 2023): on its
  own ``steps``-level grid, the student's x0 is held near the x0 its starting network (``init``,
  typically a progressive student; else the teacher) predicts for the same input, and judged by
  a small convolutional discriminator against real images (hinge loss, spectral norm), so that
  what a regression averages away (sharp strokes) is asked for directly while each input keeps
  its digit. Sampled with DDIM at exactly its step count.
- ``ect`` (Easy Consistency Tuning, Geng et al. 2024): consistency training started from the
  teacher, with no teacher step: :class:`ECTLoss`. Sampled like a consistency student, at 1, 2
  or 4 steps.
- ``dmd`` (distribution matching, Yin et al. 2024, DMD and DMD2): on its own ``steps``-level
  grid the student's x0 is re-noised and moved along the difference between what a *fake score*
  (a copy of the teacher that keeps learning the student's outputs) and the teacher denoise it
  to, which is the gradient of the KL divergence between the two distributions; a pull towards
  its starting network's x0 (``init``), or with ``pairs`` towards the teacher's own
  deterministic samples from fixed noises (DMD's regression loss), guards against mode
  collapse: :class:`DMDLoss`. Sampled with DDIM at exactly its step count.

A conditional teacher is distilled with its classifier-free guidance (``guidance``) folded in
(Meng et al. 2023, stage one): the student then needs one network pass per step instead of two.

A student is an ordinary checkpoint: ``config.json`` holds the teacher's model config, the
diffusion config with ``prediction: v``, this :class:`DistillConfig` under ``"distill"``, the
teacher under ``"teacher"``, and under ``"sampling"`` the sampler, step count and spacing it
must be sampled with and the step counts it serves, which
:func:`minidiff.generation.resolve_sampling` applies. The run folder resumes like ``train``'s:
every random draw is a function of ``(seed, step)``; a progressive run also keeps each round's
student in ``rounds/<N>-step/`` (an ordinary N-step checkpoint, and the next round's teacher).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch.nn import functional as F

from . import __version__
from .checkpoint import dataset_of, load_checkpoint, save_model
from .diffusion import DiffusionConfig, DiffusionLoss, Schedule, gather, q_sample
from .errors import MinidiffError
from .files import atomic_write_bytes
from .guidance import Guided
from .loop import Method, Run, drop_labels, fit, hold, previous_run, training_images
from .runtime import resolve_device, resolve_precision
from .samplers import SAMPLERS, predict_x0, sample_ddim
from .settings import ECT_STEPS, DistillConfig
from .unet import UNet

SPACING = "trailing"  # the students' timesteps: nested when halved, and they start at T - 1


def sampling_entry(cfg: DistillConfig, steps: int, guidance: float | None) -> dict:
    """The ``"sampling"`` entry of a student's config.json (see
    :func:`minidiff.generation.own_sampling`): how it is sampled and the step counts it
    serves (progressive: exactly its own; consistency: every divisor of the grid)."""
    if cfg.method == "progressive":
        sampler, serves = "ddim", [steps]
    elif cfg.method in ("adversarial", "dmd"):  # trained on its own grid's levels only
        sampler, serves = "ddim", [steps]
    elif cfg.method == "ect":
        # trained at every level: DDPM's ancestral step on its x0 is ECT's sampler (a jump to
        # x0, then fresh noise at the next level: from pure noise the posterior is that noise)
        sampler, serves = "ddpm", list(ECT_STEPS)
    else:
        grid = cfg.teacher_steps
        # DDPM's ancestral step with the student's x0: at 1 step exactly the consistency model's
        # one jump, at 2 steps within ~2% of Song et al.'s Algorithm 1 (which re-noises with
        # wholly fresh noise and, driven by a plain denoiser, would fail the every-sampler test
        # of tests/test_samplers_gaussian.py)
        sampler, serves = "ddpm", [k for k in range(1, grid + 1) if grid % k == 0]
    return {"method": cfg.method, "sampler": sampler, "steps": steps, "spacing": SPACING,
            "serves": serves, "guidance": guidance}


# ------------------------------------------------------------------------------- targets

def ddim_move(x: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor, ab_to: torch.Tensor):
    """One deterministic DDIM step (Song et al. 2021, eq. 12, eta 0) of ``x: [N x C x H x W]``
    at ``alpha_bar = ab`` to ``ab_to`` (both broadcastable ``[N x 1 x 1 x 1]``) given its
    ``x0``: ``sqrt(ab_to) x0 + sqrt(1 - ab_to) eps`` with ``eps`` the noise ``x0`` implies."""
    eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps


@torch.no_grad()
def progressive_target(teacher, sched: Schedule, x: torch.Tensor, i: torch.Tensor, y=None,
                       clip: bool = True) -> torch.Tensor:
    """The x0 a student must predict at ``x`` (teacher schedule index ``i: [N]``, each >= 1) so
    that one DDIM step from ``i`` to below ``i - 1`` lands where two teacher DDIM steps land
    (Salimans & Ho 2022, Algorithm 2, ``x~``) -> ``[N x C x H x W]``.

    ``sched`` is the teacher's (respaced) schedule; below index 0 is clean data. The teacher's
    steps are :func:`~minidiff.samplers.sample_ddim`'s, x0 clipped as there (``clip``).
    """
    nd = x.ndim
    ab, ab_mid = gather(sched.alpha_bar, i, nd), gather(sched.alpha_bar, i - 1, nd)
    ab_end = gather(sched.alpha_bar_prev, i - 1, nd)
    # two DDIM steps of the teacher
    _, x0 = predict_x0(teacher, x, sched, i, y, clip)
    x_mid = ddim_move(x, x0, ab, ab_mid)
    _, x0 = predict_x0(teacher, x_mid, sched, i - 1, y, clip)
    x_end = ddim_move(x_mid, x0, ab_mid, ab_end)
    # the x0 whose single DDIM step from ab reaches x_end: solve ddim_move(x, x0, ab, ab_end)
    # = x_end for x0 (at ab_end = 1, clean data, it is x_end itself)
    r = ((1 - ab_end) / (1 - ab)).sqrt()
    return (x_end - r * x) / (ab_end.sqrt() - r * ab.sqrt())


@torch.no_grad()
def consistency_target(student, teacher, sched: Schedule, student_sched: Schedule,
                       x: torch.Tensor, i: torch.Tensor, y=None, clip: bool = True
                       ) -> torch.Tensor:
    """The consistency target at ``x`` (grid index ``i: [N]``): one teacher DDIM step down the
    grid, then the student's own x0 there, clipped and without gradient; at index 0 the step
    lands on clean data and the teacher's x0 is the target (Song et al. 2023, Algorithm 2 with
    the DDIM solver, boundary at t = 0) -> ``[N x C x H x W]``; x0 clipped as the samplers
    do (``clip``)."""
    nd = x.ndim
    _, x0 = predict_x0(teacher, x, sched, i, y, clip)
    below = (i - 1).clamp(min=0)
    x_prev = ddim_move(x, x0, gather(sched.alpha_bar, i, nd), gather(sched.alpha_bar, below, nd))
    _, f_prev = predict_x0(student, x_prev, student_sched, below, y, clip)
    return torch.where((i > 0).view(-1, *([1] * (nd - 1))), f_prev, x0)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row pseudo-Huber distance ``sqrt(|a - b|^2 + c^2) - c`` with ``c = 0.00054
    sqrt(d)`` (Song & Dhariwal 2023, sec. 3.3) -> ``[N]``."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).float().pow(2).flatten(1).sum(1) + c * c).sqrt() - c


class Discriminator(torch.nn.Module):
    """The adversarial method's judge: ``[N x C x H x W]`` images in [-1, 1] -> ``[N]`` scores,
    three strided convolutions and a linear layer, each under spectral norm (Miyato et al. 2018)
    to keep the GAN game stable without a gradient penalty. It sees no labels."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, width: int = 32):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        act = torch.nn.LeakyReLU(0.2)
        self.features = torch.nn.Sequential(
            sn(torch.nn.Conv2d(in_channels, width, 4, 2, 1)), act,
            sn(torch.nn.Conv2d(width, 2 * width, 4, 2, 1)), act,
            sn(torch.nn.Conv2d(2 * width, 4 * width, 3, 2, 1)), act, torch.nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = sn(torch.nn.Linear(n, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def adversarial_losses(pred: torch.Tensor, real: torch.Tensor, target: torch.Tensor,
                       disc: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adversarial method's three terms for a batch of student outputs ``pred`` (x0,
    with gradient), real images ``real`` and the starting network's x0 ``target`` (no
    gradient): ``distill``, the squared distance to the targets (summed over pixels, averaged
    over images); ``gan``, the student's hinge term ``-D(pred)``, which reaches the student only;
    ``disc``, the discriminator's hinge loss on real vs ``pred`` detached, which reaches the
    discriminator only (so one backward pass of their sum trains both)."""
    disc.requires_grad_(False)
    gan = -disc(pred).float().mean()
    disc.requires_grad_(True)
    d_loss = (torch.relu(1 - disc(real).float()).mean()
              + torch.relu(1 + disc(pred.detach()).float()).mean())
    distill = (pred - target).float().pow(2).flatten(1).sum(1).mean()
    return {"distill": distill, "gan": gan, "disc": d_loss}


class DistillLoss:
    """One batch's loss for a round whose student takes ``steps`` steps: progressive, the
    truncated-SNR weighted ``max(SNR, 1) |x0_student - x~|^2`` (Salimans & Ho 2022, sec. 4);
    consistency, the pseudo-Huber distance to :func:`consistency_target`; adversarial,
    ``distill_weight * distill + gan + disc`` of :func:`adversarial_losses`."""

    def __init__(self, cfg: DistillConfig, diffusion: DiffusionConfig, steps: int,
                 disc: torch.nn.Module | None = None):
        base = Schedule.from_config(diffusion)
        if cfg.method == "progressive":  # the teacher's 2N-step grid; the student's is odd i
            self.sched = base.respace(2 * steps, SPACING)
        elif cfg.method == "adversarial":  # the student's own grid, read by its start too
            self.sched = base.respace(steps, SPACING)
        else:
            self.sched = base.respace(cfg.teacher_steps, SPACING)
        self.student_sched = Schedule(self.sched.betas, self.sched.timesteps, "v")
        self.method, self.steps = cfg.method, steps
        self.disc, self.distill_weight = disc, cfg.distill_weight

    def draw(self, x0: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid indices ``[N]`` (progressive: the student's, odd) and ``x_t`` for a batch."""
        n = len(x0)
        i = torch.randint(0, len(self.sched) // (2 if self.method == "progressive" else 1),
                          (n,), device=x0.device, generator=generator)
        if self.method == "progressive":
            i = 2 * i + 1
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return i, q_sample(self.sched, x0, i, noise)

    def __call__(self, student, teacher, x0: torch.Tensor, y=None, generator=None):
        """Mean loss over ``x0: [N x C x H x W]`` in [-1, 1]."""
        i, x = self.draw(x0, generator)
        _, pred = predict_x0(student, x, self.student_sched, i, y, clip=False)
        if self.method == "progressive":
            target = progressive_target(teacher, self.sched, x, i, y)
            ab = gather(self.sched.alpha_bar, i, 1).view(-1)
            weight = (ab / (1 - ab)).clamp(min=1)
            return (weight * (pred - target).pow(2).flatten(1).mean(1)).mean()
        if self.method == "adversarial":  # `teacher`: the network the student started from
            with torch.no_grad():
                _, target = predict_x0(teacher, x, self.sched, i, y)
            terms = adversarial_losses(pred, x0, target, self.disc)
            return self.distill_weight * terms["distill"] + terms["gan"] + terms["disc"]
        target = consistency_target(student, teacher, self.sched, self.student_sched, x, i, y)
        return pseudo_huber(pred, target).mean()


# ------------------------------------------------------------ easy consistency tuning

class ECTLoss:
    """Easy Consistency Tuning (Geng et al. 2024; locuslab/ect, ``ECMLoss``) on the teacher's
    discrete schedule. The student, started from the teacher, must give the same x0 for an
    image noised to level ``t`` and for the same image with the same noise at a lower level
    ``r`` (the ``r`` side without gradient and under the same dropout mask); where ``r`` falls
    below the schedule's lowest level the clean image is the target (the boundary condition),
    so no teacher step is needed. ``sigma = sqrt((1 - ab) / ab)``, EDM's noise level, is
    drawn log-normal (P_mean -1.1, P_std 2) and ``sigma_r = sigma_t (1 - q^-(stage + 1)
    (1 + k sigmoid(-b sigma_t)))`` with q 2, k 8, b 1 (ECT's sigmoid map): each stage halves
    the gap, from denoising towards consistency. The distance is pseudo-Huber (near ECT's L2
    norm) weighted by ``1 / (sigma_t - sigma_r)``. Both levels are timesteps of the schedule:
    ``t`` the first at or above the drawn sigma, ``r`` the highest at or below ``sigma_r``, at
    least one step below ``t``."""

    P_MEAN, P_STD, Q, K, B = -1.1, 2.0, 2.0, 8.0, 1.0

    def __init__(self, diffusion: DiffusionConfig):
        self.sched = Schedule.from_config(replace(diffusion, prediction="v"))
        ab = self.sched.alpha_bar
        self.sigma = ((1 - ab) / ab).sqrt()  # increases with the index

    def draw(self, n: int, stage: int, generator=None, device="cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``t: [N]`` (>= 1) and ``r: [N]`` (< t; -1 is the clean image), on the CPU;
        the normal draw on ``device`` (the generator's)."""
        z = torch.randn(n, generator=generator, device=device).double().cpu()
        t = torch.searchsorted(self.sigma, (z * self.P_STD + self.P_MEAN).exp())
        t = t.clamp(1, len(self.sigma) - 1)
        sig_t = self.sigma[t]
        ratio = 1 - self.Q ** -(stage + 1) * (1 + self.K * torch.sigmoid(-self.B * sig_t))
        r = torch.searchsorted(self.sigma, sig_t * ratio, right=True) - 1
        return t, torch.minimum(r, t - 1)

    def __call__(self, student, x0: torch.Tensor, y=None, generator=None, stage: int = 0):
        """Mean loss over ``x0: [N x C x H x W]`` in [-1, 1] at ECT stage ``stage``."""
        t, r = self.draw(len(x0), stage, generator, x0.device)
        sig_r = self.sigma[r.clamp(min=0)] * (r >= 0)  # the clean image: sigma 0
        weight = (1 / (self.sigma[t] - sig_r)).float().to(x0.device)
        t, r = t.to(x0.device), r.to(x0.device)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        # the r pass draws the t pass's dropout mask again (from the device's generator)
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(x0.device) if x0.device.type == "cuda" else None
        _, pred = predict_x0(student, q_sample(self.sched, x0, t, noise), self.sched, t, y,
                             clip=False)
        with torch.no_grad():
            torch.set_rng_state(rng)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, x0.device)
            rc = r.clamp(min=0)
            _, target = predict_x0(student, q_sample(self.sched, x0, rc, noise), self.sched, rc,
                                   y, clip=False)
            target = torch.where((r >= 0).view(-1, *[1] * (x0.ndim - 1)), target, x0)
        return (weight * pseudo_huber(pred, target)).mean()


# ------------------------------------------------------------------ distribution matching

class FeatureHead(torch.nn.Module):
    """DMD2's GAN classifier: the fake score's bottleneck features ``[N x C x H x W]``
    (:meth:`~minidiff.unet.UNet.features` of a noised image) -> ``[N]`` logits, real against
    generated; a strided convolution, GroupNorm, SiLU, a global mean and a linear layer (DMD2's
    ``cls_pred_branch``; the mean fits it to any bottleneck size)."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, 2, 1), torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h).squeeze(1)


def dmd_loss(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching loss for generated images ``x0: [N x C x H x W]`` (with
    gradient), given the x0 that the real (teacher) and fake denoisers predict for them re-noised
    (``real``, ``fake``, no gradient): a scalar whose gradient with respect to each image is
    ``(fake - real) / mean|x0 - real|`` over ``N`` (Yin et al. 2024a, eq. 7, with DMD2's
    per-image normalisation), so the images move towards what the teacher sees in them and away
    from what the fake score, which knows the student's distribution, sees; zero where the two
    agree."""
    with torch.no_grad():
        norm = (x0 - real).float().abs().flatten(1).mean(1).add(1e-6)
        grad = (fake - real).float() / norm.view(-1, *[1] * (x0.ndim - 1))
    return 0.5 * (x0.float() - (x0.float() - grad).detach()).pow(2).flatten(1).sum(1).mean()


# `--pairs`: the teacher's deterministic solver that draws them, DPM-Solver++(2M) at 10 Karras
# steps (rho 2), which scores like 20 steps of the stochastic one on the shipped `reduced`
# (docs/distillation.md); deterministic, so each pair is a function of its noise
PAIR_SOLVER, PAIR_STEPS, PAIR_RHO = "dpmpp", 10, 2.0


def pair_seed(seed: int) -> int:
    """The seed of the pairs' noises in a run of seed ``seed``: a stream of their own (a hash),
    so that no sampling seed redraws the noises a student was trained on (with the run's seed
    itself, `minidiff sample --seed 0` did, and scored the student on its training noises:
    docs/distillation.md)."""
    digest = hashlib.sha256(f"minidiff pairs {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def teacher_pairs(teacher, sched: Schedule, n: int, shape: tuple, seed: int,
                  num_classes: int | None, batch_size: int = 512):
    """``n`` fixed noises ``z: [n x C x H x W]`` (drawn from :func:`pair_seed` of ``seed``),
    the images the teacher's deterministic solver draws from them (``x``, clipped to [-1, 1])
    and their labels (``y``, each class in turn; None for an unconditional teacher): DMD's
    regression pairs."""
    gen = torch.Generator().manual_seed(pair_seed(seed))
    z = torch.randn((n, *shape), generator=gen)
    y = torch.arange(n) % num_classes if num_classes else None
    grid = sched.respace(PAIR_STEPS, "karras", PAIR_RHO)
    xs = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            yb = None if y is None else y[s:s + batch_size]
            xs.append(SAMPLERS[PAIR_SOLVER](teacher, z[s:s + batch_size], grid, y=yb).float())
    return z, torch.cat(xs), y


PAIRS_FILE = "pairs.safetensors"  # a dmd run's pairs, beside its checkpoints


def lineage_pairs(teacher, sched: Schedule, n: int, shape: tuple, seed: int,
                  num_classes: int | None, teacher_sha256: str, folders: list[Path],
                  out: Path | None):
    """:func:`teacher_pairs`, read from the first of ``folders`` whose ``pairs.safetensors``
    the same teacher drew with the same ``n``, ``seed``, shape and solver (a resumed run's own
    folder, the ``--init`` run's), else drawn; written to ``out`` (atomically) unless read
    from there, so that the next run of a lineage finds them too: a lineage draws its pairs
    once."""
    key = {"teacher_sha256": teacher_sha256, "n": str(n), "seed": str(seed),
           "shape": json.dumps(list(shape)), "num_classes": str(num_classes),
           "solver": f"{PAIR_SOLVER} {PAIR_STEPS} karras {PAIR_RHO}"}
    source, t = None, None
    for folder in folders:
        try:
            with safe_open(str(Path(folder) / PAIRS_FILE), "pt") as f:
                if f.metadata() == key:
                    source, t = Path(folder), {k: f.get_tensor(k) for k in f.keys()}
                    break
        except (OSError, SafetensorError):
            continue
    if t is None:
        t = dict(zip("zxy", teacher_pairs(teacher, sched, n, shape, seed, num_classes),
                     strict=True))
    if out is not None and source != Path(out):
        tensors = {k: v for k, v in t.items() if v is not None}
        atomic_write_bytes(Path(out) / PAIRS_FILE, st_save(tensors, metadata=key))
    return t["z"], t["x"], t.get("y")


def ddim_path(model, z: torch.Tensor, sched: Schedule, y=None) -> torch.Tensor:
    """``model``'s DDIM path (eta 0) over ``sched`` from the noise ``z: [N x C x H x W]``, with
    gradient: its x0 at the last step, unclipped (every earlier x0 clipped, as
    :func:`~minidiff.samplers.sample_ddim` does, which returns this clipped)."""
    x = z
    for i in reversed(range(len(sched))):
        _, x0 = predict_x0(model, x, sched, i, y, clip=i > 0)
        x = ddim_move(x, x0, sched.alpha_bar[i], sched.alpha_bar_prev[i])
    return x0


class DMDLoss:
    """Distribution-matching distillation (Yin et al. 2024a, DMD; 2024b, DMD2) for a student of
    ``steps`` DDIM steps. As for the adversarial method the student's inputs are real images
    noised to its own grid's levels (DMD2's multi-step recipe) or, with ``simulate``, pure noise
    carried down its own DDIM path (:func:`ddim_path`, DMD2's backward simulation, here
    back-propagated through every step), so it learns from what its sampler will feed it; the
    pull's pair is then the start's own sample from the same noise. Each call trains the fake
    score,
    a copy of the teacher, on the student's outputs (detached) with the teacher's own diffusion
    loss; at every ``fake_updates``-th step it also moves the student by :func:`dmd_loss` at a
    level drawn uniformly from the middle 96% of the teacher's (DMD2's range) plus
    ``distill_weight`` times the squared distance (summed over pixels) to its starting network's
    clipped x0 for the same input, which holds each input to its digit (DMD's regression loss,
    with the start's own output as the pair), and, with a GAN head ``disc``
    (:class:`FeatureHead`), ``gan_weight`` times DMD2's GAN term: the head reads the fake
    score's bottleneck for a noised image and learns, at every step, real images against the
    student's (:meth:`head_loss`, which trains the fake score's encoder too), and the student
    is moved towards what it calls real (:meth:`gan_loss`). One backward pass trains all of
    them: the student's terms see the fake score and the head without gradient, theirs the
    student's output detached.

    With ``pairs`` (DMD's regression loss), the student's path starts from one of ``pairs``
    fixed noises and the pull's pair is what the teacher's deterministic solver draws from that
    noise (:func:`teacher_pairs`, drawn or read at the first call, :func:`lineage_pairs`): the
    pull then holds the student to the teacher, not to where it started, and a run can start
    from the teacher itself. With
    ``pair_fraction`` below 1 only that share of each batch starts from the pairs; the rest
    starts from fresh noise and meets distribution matching alone, as DMD computes its two
    losses on paired and on fresh noise, so the student is not matched on a fixed set of
    noises only."""

    LOW, HIGH = 0.02, 0.98
    HEAD_WEIGHT = 1e-2  # the GAN head's loss beside the fake score's own (DMD2's ImageNet run)

    def __init__(self, cfg: DistillConfig, diffusion: DiffusionConfig, start_prediction: str,
                 steps: int, fake: torch.nn.Module, disc: torch.nn.Module | None = None,
                 num_classes: int | None = None, pairs_at: tuple = ()):
        self.sched = Schedule.from_config(diffusion)  # the teacher's and the fake score's
        grid = self.sched.respace(steps, SPACING)
        self.student_sched = Schedule(grid.betas, grid.timesteps, "v")
        self.start_sched = Schedule(grid.betas, grid.timesteps, start_prediction)
        self.fake, self.fake_loss = fake, DiffusionLoss(self.sched)
        self.weight, self.every = cfg.distill_weight, cfg.fake_updates
        self.disc, self.gan_weight, self.simulate = disc, cfg.gan_weight, cfg.simulate
        self.pairs, self.seed, self.num_classes = cfg.pairs, cfg.seed, num_classes
        self.pair_fraction = cfg.pair_fraction
        # (teacher SHA-256, folders to read the pairs from, folder to write them to)
        self.pairs_at = pairs_at or ("", [], None)
        self.bank = None  # the pairs (noises, images, labels), drawn or read at the first call

    def __call__(self, student, teacher, start, x0: torch.Tensor, y=None, generator=None,
                 step: int = 0) -> torch.Tensor:
        """Mean loss over real images ``x0: [N x C x H x W]`` in [-1, 1] at optimizer step
        ``step``."""
        n, dev, y_real = len(x0), x0.device, y
        update = step % self.every == 0
        if self.pairs:  # the student's own path from a pair's noise, held to the teacher's image
            if self.bank is None:
                self.bank = [b if b is None else b.to(dev) for b in lineage_pairs(
                    teacher, self.sched, self.pairs, tuple(x0.shape[1:]), self.seed,
                    self.num_classes, *self.pairs_at)]
            # rows held to a pair (at least one, so the pull is defined); the rest: fresh noise
            m = max(1, round(n * self.pair_fraction))
            k = torch.randint(0, self.pairs, (m,), device=dev, generator=generator)
            z, y = self.bank[0][k], None if self.bank[2] is None else self.bank[2][k]
            if m < n:
                z = torch.cat([z, torch.randn((n - m, *x0.shape[1:]), device=dev,
                                              generator=generator)])
                y = None if y is None else torch.cat([y, y_real[m:]])
            with torch.set_grad_enabled(update):
                gen = ddim_path(student, z, self.student_sched, y)
        elif self.simulate:  # the student's own path from pure noise
            z = torch.randn(x0.shape, device=dev, generator=generator)
            with torch.set_grad_enabled(update):
                gen = ddim_path(student, z, self.student_sched, y)
        else:  # real images noised to a level of its grid
            i = torch.randint(0, len(self.student_sched), (n,), device=dev, generator=generator)
            x = q_sample(self.student_sched, x0, i, torch.randn(x0.shape, device=dev,
                                                                generator=generator))
            with torch.set_grad_enabled(update):
                _, gen = predict_x0(student, x, self.student_sched, i, y, clip=False)
        # the fake score (and its GAN head) learn the student's distribution as it is now
        loss = self.fake_loss(self.fake, gen.detach().float(), y, generator)
        if self.disc is not None:
            loss = loss + self.HEAD_WEIGHT * self.head_loss(x0, y_real, gen, y, generator)
        if not update:
            return loss
        T = len(self.sched)
        t = torch.randint(int(self.LOW * T), int(self.HIGH * T), (n,), device=dev,
                          generator=generator)
        with torch.no_grad():
            xt = q_sample(self.sched, gen.detach().float(), t,
                          torch.randn(x0.shape, device=dev, generator=generator))
            _, real = predict_x0(teacher, xt, self.sched, t, y, clip=False)
            _, fake = predict_x0(self.fake, xt, self.sched, t, y, clip=False)
            if self.pairs:
                target = self.bank[1][k]
            elif self.simulate:
                target = sample_ddim(start, z, self.start_sched, y=y)
            else:
                _, target = predict_x0(start, x, self.start_sched, i, y)
        # (with pairs, only the first rows have one: `pair_fraction`)
        pull = (gen[:len(target)].float() - target.float()).pow(2).flatten(1).sum(1).mean()
        loss = loss + dmd_loss(gen, real, fake) + self.weight * pull
        if self.disc is not None:
            loss = loss + self.gan_weight * self.gan_loss(gen, y, generator)
        return loss

    def head_loss(self, real: torch.Tensor, real_y, gen: torch.Tensor, y, generator):
        """The GAN head's loss (DMD2's ``guidance_cls_loss``): real images ``real`` (labels
        ``real_y``) against the student's ``gen`` (detached), both noised; it trains the head
        and the fake score's encoder, not the student."""
        return (F.softplus(self.logits(gen.detach(), y, generator)).mean()
                + F.softplus(-self.logits(real, real_y, generator)).mean())

    def gan_loss(self, gen: torch.Tensor, y, generator) -> torch.Tensor:
        """The student's GAN term (DMD2's ``gen_cls_loss``, non-saturating): the head and the
        fake score read ``gen`` without gradient to themselves."""
        self.fake.requires_grad_(False), self.disc.requires_grad_(False)
        try:
            return F.softplus(-self.logits(gen, y, generator)).mean()
        finally:
            self.fake.requires_grad_(True), self.disc.requires_grad_(True)

    def logits(self, x0: torch.Tensor, y, generator) -> torch.Tensor:
        """The GAN head's ``[N]`` logits (real: high) for images ``x0`` noised to levels drawn
        uniformly over the teacher's schedule, read through the fake score's bottleneck."""
        t = torch.randint(0, len(self.sched), (len(x0),), device=x0.device, generator=generator)
        xt = q_sample(self.sched, x0.float(), t,
                      torch.randn(x0.shape, device=x0.device, generator=generator))
        return self.disc(self.fake.features(xt, t, y)).float()


# ---------------------------------------------------------------------------- the run

def distill(teacher_path, out, cfg: DistillConfig | None = None, *, data_dir=None,
            resume: bool = False, progress: bool = True) -> dict:
    """Distil the checkpoint ``teacher_path`` into a student in the run folder ``out`` as
    ``cfg`` says (resumed with its own config when ``resume``); returns a summary dict."""
    out, cfg = Path(out), cfg or DistillConfig()
    with hold(out):
        saved = previous_run(out, resume, "distill", _saved_run)
        if saved:
            cfg = DistillConfig.from_dict(saved["distill"])
        device = resolve_device(cfg.device)
        teacher, tconfig, tsha = load_checkpoint(teacher_path, device)
        if saved and tsha != saved["teacher"]["sha256"]:
            raise MinidiffError(f"{teacher_path} is not the teacher {out} was distilled from "
                                f"({saved['teacher']['path']}); pass that one to resume")
        init = None
        if cfg.init:
            init = load_checkpoint(cfg.init, device)[:2]
            if init[1].get("model") != tconfig.get("model"):
                raise MinidiffError(f"--init {cfg.init}: not the teacher's U-Net (a student "
                                    "keeps its teacher's architecture); pass a student of this "
                                    "teacher or drop --init")
        T = DiffusionConfig.from_dict(tconfig["diffusion"]).timesteps
        if cfg.teacher_steps > T:
            raise MinidiffError(f"--teacher-steps must be <= the teacher's T ({T}), got "
                                f"{cfg.teacher_steps}")
        precision = resolve_precision(cfg.precision, device)
        model_cfg = teacher.config
        if cfg.method == "ect" and model_cfg.num_classes:
            raise MinidiffError(f"{teacher_path} is class-conditional and --method ect folds no "
                                "guidance in: use --method progressive or dmd for it")
        images, labels = training_images(dataset_of(tconfig), cfg.subset, model_cfg.image_size,
                                         data_dir)
        about = {"path": str(teacher_path), "sha256": tsha, "step": tconfig.get("step")}
        method = Distillation(cfg, teacher, tconfig, about, out, device, init)
        summary = fit(method, Run(out, images, labels if model_cfg.num_classes else None,
                                  device, precision, resume=resume, progress=progress,
                                  desc=f"distill {cfg.method}"))
    if "note" in summary:
        return summary
    return {**summary, "rounds": method.plan, "precision": precision, "device": str(device)}


def _saved_run(saved: dict) -> dict:
    DistillConfig.from_dict(saved["distill"])  # a resume needs both entries intact
    if not isinstance(saved["teacher"]["sha256"], str):
        raise TypeError("teacher sha256 is not a string")
    return saved


class Distillation(Method):
    """A student (the teacher's U-Net, a ``v`` model) trained round by round on
    :class:`DistillLoss`, each round from its teacher with a fresh optimizer; the adversarial
    method's discriminator trains beside it. A finished round's student is kept in
    ``rounds/<N>-step/``: the next round's teacher."""

    name = "distillation"

    def __init__(self, cfg: DistillConfig, teacher: UNet, tconfig: dict, about: dict, out: Path,
                 device, init: tuple[UNet, dict] | None = None):
        self.cfg, self.plan, self.out, self.device = cfg, cfg.rounds(), out, device
        self.rounds, self.per_round = len(self.plan), max(1, cfg.updates // len(self.plan))
        self.teacher, self.tconfig, self.about, self.init = teacher, tconfig, about, init
        self.model = UNet(replace(teacher.config, dropout=cfg.dropout)).to(device)
        self.model.load_state_dict(teacher.state_dict())
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.disc = self.fake = None
        if cfg.method == "adversarial" or (cfg.method == "dmd" and cfg.gan_weight > 0):
            torch.manual_seed(cfg.seed)  # dmd: DMD2's head on the fake score
            self.disc = (Discriminator(teacher.config.in_channels, teacher.config.image_size)
                         if cfg.method == "adversarial" else
                         FeatureHead(teacher.mid[-1].conv2.out_channels,
                                     teacher.config.norm_groups)).to(device)
        if cfg.method == "dmd":  # the fake score starts as the teacher (DMD2)
            self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.opt = self.new_optimizer()

    @property
    def trained(self) -> torch.nn.Module:
        """What a training state's "model." tensors hold: the student (and its discriminator or
        fake score)."""
        if self.disc is None and self.fake is None:
            return self.model
        players = {"student": self.model, "disc": self.disc, "fake": self.fake}
        return torch.nn.ModuleDict({k: v for k, v in players.items() if v is not None})

    def new_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.model.parameters())}]
        if self.disc is not None:  # beta1 0.5, as usual for a GAN's players (Radford et al. 2016)
            groups.append({"params": list(self.disc.parameters()), "betas": (0.5, 0.999)})
        if self.fake is not None:
            groups.append({"params": list(self.fake.parameters())})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=0.0)

    def config_at(self, step: int) -> dict:
        """The config of the student after ``step`` updates (at a round's end: that round's)."""
        r = min(max(step - 1, 0) // self.per_round, len(self.plan) - 1)
        diffusion = replace(DiffusionConfig.from_dict(self.tconfig["diffusion"]), prediction="v")
        guidance = self.cfg.guidance if self.teacher.config.num_classes else None
        return {"minidiff_version": __version__, "model": self.tconfig["model"],
                "diffusion": diffusion.to_dict(), "train": self.tconfig.get("train", {}),
                "distill": self.cfg.to_dict(), "teacher": self.about,
                "sampling": sampling_entry(self.cfg, self.plan[r], guidance), "step": step}

    def begin_round(self, r: int, fresh: bool) -> None:
        """A round's teacher and loss; a round's first step restarts the student from it."""
        self.teacher_net, diffusion = self.round_teacher(r)
        self.start = self.init[0].eval().requires_grad_(False) if self.init else self.teacher
        if self.cfg.method == "ect":  # the student is its own target
            self.loss_fn = ECTLoss(diffusion)
        elif self.cfg.method == "dmd":
            start_cfg = self.init[1] if self.init else self.tconfig
            lineage = [self.out] + ([Path(self.cfg.init)] if self.cfg.init else [])
            self.loss_fn = DMDLoss(self.cfg, diffusion, start_cfg["diffusion"]["prediction"],
                                   self.plan[r], self.fake, self.disc,
                                   self.teacher.config.num_classes,
                                   (self.about["sha256"], lineage, self.out))
        else:
            self.loss_fn = DistillLoss(self.cfg, diffusion, self.plan[r], self.disc)
        if fresh:
            net = self.start if self.cfg.method == "dmd" else self.teacher_net
            start = net.model if isinstance(net, Guided) else net
            self.model.load_state_dict(start.state_dict())
            self.ema.load_state_dict(start.state_dict())
            self.opt = self.new_optimizer()

    def round_teacher(self, r: int) -> tuple[torch.nn.Module, DiffusionConfig]:
        """Round ``r``'s teacher and the diffusion config it is read with: the teacher (guided
        when conditional) or, for an adversarial run with ``init``, that start; then each
        round's student as written to rounds/ (so a resumed run reads what an unbroken one
        used), a `v` model whose guidance is already distilled in."""
        if r == 0 and self.init is not None and self.cfg.method == "adversarial":
            # the start is what the adversarial student is held near
            net, config = self.init
        elif r == 0:
            net, config = self.teacher, self.tconfig
        else:
            net, config, _ = load_checkpoint(self.round_folder(r - 1), self.device)
        net = net.eval().requires_grad_(False)
        # dmd: the guided teacher is the real score whatever the student starts from
        guided = (bool(self.teacher.config.num_classes) and r == 0
                  and (self.init is None or self.cfg.method == "dmd"))
        diffusion = DiffusionConfig.from_dict(config["diffusion"])
        return (Guided(net, self.cfg.guidance) if guided else net), diffusion

    def round_folder(self, r: int) -> Path:
        return self.out / "rounds" / f"{self.plan[r]}-step"

    def loss(self, x0: torch.Tensor, y: torch.Tensor | None, generator,
             step: int) -> torch.Tensor:
        if y is not None:
            y = drop_labels(y, self.cfg.label_dropout, self.teacher.config.num_classes,
                            generator)
        if self.cfg.method == "ect":
            return self.loss_fn(self.model, x0, y, generator, self.cfg.stage_at(step))
        if self.cfg.method == "dmd":
            return self.loss_fn(self.model, self.teacher_net, self.start, x0, y, generator, step)
        return self.loss_fn(self.model, self.teacher_net, x0, y, generator)

    def end_round(self, r: int, step: int) -> None:
        if r + 1 < len(self.plan):  # the last round's student is the run folder's own
            save_model(self.round_folder(r), self.ema, self.config_at(step))

    def log_fields(self, r: int) -> dict:
        return {"round": r, "student_steps": self.plan[r]}
