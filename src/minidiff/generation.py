"""Generation: drawing images from a model with a :class:`~minidiff.settings.SamplingConfig`.

The batched driver (:func:`generate`) around the sampler algorithms of
:mod:`minidiff.samplers`, the wrappers it puts around a model (classifier-free guidance,
``torch.compile``), the timing every command reports (:func:`time_generation`), and sample
files: an ``.npz`` with a JSON sidecar that records the whole SamplingConfig (and optionally a
PNG grid).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import dataset_of, load_checkpoint
from .diffusion import DiffusionConfig, Schedule
from .errors import MinidiffError
from .files import save_grid
from .guidance import Guided
from .runtime import (
    CompiledOrEager,
    Timing,
    autocast_context,
    resolve_device,
    resolve_precision,
    timed,
)
from .samplefiles import save_samples, sidecar
from .samplers import SAMPLERS
from .settings import BATCH_BY_PRECISION, SamplingConfig


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

    The defaults are the reference draw (DDPM in fp32 on the schedule given), not the user's
    sampling defaults: those are :class:`~minidiff.settings.SamplingConfig`'s, which
    :func:`time_generation` and :func:`sample_to_file` apply.
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


def sampling_schedule(config: dict, steps: int | None, spacing: str, rho: float):
    """The respaced schedule a checkpoint's ``config`` is sampled with -> ``(sched, steps)``;
    ``steps=None`` means all T; ``rho`` is karras spacing's."""
    diff_cfg = DiffusionConfig.from_dict(config["diffusion"])
    T = diff_cfg.timesteps
    steps = steps or T
    if not 1 <= steps <= T:
        raise MinidiffError(f"--steps must be in 1..{T} (the model's T), got {steps}")
    try:
        return Schedule.from_config(diff_cfg).respace(steps, spacing, rho), steps
    except ValueError as e:
        raise MinidiffError(f"--spacing {spacing}: {e}") from None


def own_sampling(cfg: SamplingConfig, config: dict) -> SamplingConfig:
    """``cfg`` for a checkpoint whose config records how it must be sampled (a distilled
    student's ``"sampling"`` entry, see :mod:`minidiff.distill`): the sampler, steps and spacing
    not chosen (:meth:`SamplingConfig.given`) become the student's, guidance is off (a
    conditional student has it distilled in), and what the student cannot serve is refused."""
    own = config.get("sampling")
    if not own:
        return cfg
    pick = {k: getattr(cfg, k) if cfg.given(k) else own[k] for k in ("sampler", "steps", "spacing")}
    what = (f"this model is a {own['steps']}-step {own.get('method', 'distilled')} student, "
            f"sampled with --sampler {own['sampler']} --spacing {own['spacing']}")
    if ((pick["sampler"], pick["spacing"]) != (own["sampler"], own["spacing"])
            or cfg.given("eta") or cfg.given("rho")):
        raise MinidiffError(f"{what} only (got --sampler {pick['sampler']} --spacing "
                            f"{pick['spacing']}); drop --sampler, --spacing, --rho and --eta")
    if pick["steps"] not in own["serves"]:
        served = ", ".join(map(str, own["serves"]))
        raise MinidiffError(f"{what}: it serves --steps {served}, got {pick['steps']}; drop "
                            "--steps, or distil a student for that count with `minidiff "
                            "distill`")
    if cfg.guidance is not None and cfg.given("guidance"):
        raise MinidiffError(f"{what}: its guidance ({own.get('guidance')}) is distilled in; "
                            "drop --guidance")
    return replace(cfg, **pick, guidance=None)


def resolve_sampling(cfg: SamplingConfig, config: dict, device: torch.device
                     ) -> tuple[SamplingConfig, Schedule]:
    """``cfg`` made concrete for a checkpoint's ``config`` on ``device`` (a student's own
    sampling, :func:`own_sampling`; steps None -> the model's T, precision auto -> what runs
    natively there) and the schedule it samples with."""
    cfg = own_sampling(cfg, config)
    sched, steps = sampling_schedule(config, cfg.steps, cfg.spacing, cfg.rho)
    precision = resolve_precision(cfg.precision, device)
    batch = cfg.batch_size or BATCH_BY_PRECISION[precision]
    return replace(cfg, steps=steps, precision=precision, batch_size=batch), sched


def time_generation(model, sched: Schedule, cfg: SamplingConfig, n: int, *,
                    device: torch.device | str = "cpu", y: torch.Tensor | None = None,
                    warmup: int = 0, repeats: int = 1, compile: bool = False,
                    progress=None, callback=None) -> Timing:
    """Draw ``n`` images as ``cfg`` says and time it -> :class:`~minidiff.runtime.Timing` whose
    ``result`` is the images (uint8, see :func:`generate`) of the last timed run.

    ``sched`` is the schedule ``cfg`` resolves to (:func:`resolve_sampling`). ``warmup``
    images are drawn once, untimed, before (kernel selection, allocator, compilation); the
    seconds are the median of ``repeats`` runs. ``y: [n]`` labels are sampled with
    ``cfg.guidance``; ``callback`` goes to the sampler (see :mod:`minidiff.samplers`).
    """
    net = CompiledOrEager(model) if compile else model  # compiled once, warm-up included
    kw = {"eta": cfg.eta} if cfg.eta is not None else {}
    kw.update({"callback": callback} if callback is not None else {})
    precision = resolve_precision(cfg.precision, torch.device(device))  # a no-op when resolved
    batch = cfg.batch_size or BATCH_BY_PRECISION[precision]

    def run(k: int, progress=None):
        return generate(net, sched, k, sampler=cfg.sampler, seed=cfg.seed, batch_size=batch,
                        y=y, guidance=cfg.guidance, precision=precision, device=device,
                        progress=progress, **kw)

    return timed(lambda: run(n, progress), repeats,
                 warmup=(lambda: run(min(warmup, n))) if warmup else None)


def class_labels(classes: str | None, n: int, num_classes: int | None, checkpoint):
    """``--class`` -> labels ``[n]`` (int64) or None; "all" is ``n / num_classes`` per class."""
    if classes is None:
        return None
    if not num_classes:
        raise MinidiffError(f"{checkpoint} is unconditional; --class needs a model trained with "
                            "`minidiff train --conditional`")
    if classes == "all":
        if n % num_classes:
            raise MinidiffError(f"--class all needs --n divisible by {num_classes} (a balanced "
                                f"set), got {n}")
        return torch.arange(num_classes).repeat_interleave(n // num_classes)
    if not classes.isdigit() or int(classes) >= num_classes:
        raise MinidiffError(f"--class must be all or a class id in 0..{num_classes - 1}, got "
                            f"{classes!r}")
    return torch.full((n,), int(classes), dtype=torch.long)


def sample_to_file(checkpoint, out, cfg: SamplingConfig | None = None, *, n: int = 64,
                   classes: str | None = None, device: str = "auto", grid: str | None = None,
                   progress: bool = True, compile: bool = False) -> dict:
    """Generate ``n`` images from ``checkpoint`` as ``cfg`` says (default: the defaults) into
    ``out`` (.npz); returns the sidecar dict.

    ``classes`` (a conditional model only): one class id ("7") or "all" for a balanced set of
    ``n / num_classes`` per class, sorted by class, sampled with ``cfg.guidance``; the labels go
    into the .npz and the grid shows one class per row. A guidance chosen without ``classes``
    is refused: there is nothing to guide towards.
    """
    cfg = cfg or SamplingConfig()
    out = Path(out)
    if out.suffix != ".npz":
        raise MinidiffError(f"--out {out}: the sample file must end in .npz")
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise MinidiffError(f"--grid {grid}: the grid must be a .png file")
    if n < 1:
        raise MinidiffError(f"--n must be >= 1, got {n}")
    if classes is None and cfg.given("guidance") and cfg.guidance is not None:
        raise MinidiffError("--guidance needs --class (a digit or all)")
    dev = resolve_device(device)
    model, config, digest = load_checkpoint(checkpoint, dev)
    cfg, sched = resolve_sampling(cfg, config, dev)
    labels = class_labels(classes, n, model.config.num_classes, checkpoint)
    if labels is None:
        cfg = replace(cfg, guidance=None)  # nothing to guide towards

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"sample {cfg.sampler}-{cfg.steps}",
                   dynamic_ncols=True)
    run = time_generation(model, sched, cfg, n, device=dev, y=labels, compile=compile,
                          progress=bar.update if bar else None)
    images = run.result
    if bar is not None:
        bar.close()
    meta = sidecar(cfg, n, checkpoint, digest, run.seconds,
                   dataset_of(config), compile=compile,
                   device=str(dev), **({} if labels is None else {"class": classes}))
    save_samples(out, images.numpy(), meta, None if labels is None else labels.numpy())
    if grid:
        if labels is not None and classes == "all":  # one row per class, at most 10 each
            k = min(10, n // model.config.num_classes)
            rows = images.view(model.config.num_classes, -1, *images.shape[1:])[:, :k]
            save_grid(rows.reshape(-1, *images.shape[1:]).numpy(), grid, nrow=k)
        else:
            save_grid(images[: min(n, 100)].numpy(), grid)
    return {**meta, "out": str(out), **({"grid": grid} if grid else {})}
