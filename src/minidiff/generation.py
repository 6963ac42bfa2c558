"""Generation: drawing images from a model with a :class:`~minidiff.settings.SamplingConfig`.

The batched driver (:func:`generate`) around the sampler algorithms of
:mod:`minidiff.samplers`, the wrappers it puts around a model (classifier-free guidance,
``torch.compile``), the timing every command reports (:func:`time_generation`), and sample
files: an ``.npz`` with a JSON sidecar that records the whole SamplingConfig (and optionally a
PNG grid).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import dataset_of, load_checkpoint
from .diffusion import DiffusionConfig, Schedule
from .errors import MinidiffError
from .files import atomic_write_bytes, atomic_write_text, save_grid
from .runtime import Timing, autocast_context, resolve_device, resolve_precision, timed
from .samplers import SAMPLERS
from .settings import BATCH_BY_PRECISION, SamplingConfig


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
    note, when compiling fails on this machine (no C++ compiler, unsupported backend...) or when
    its first output disagrees with eager's.

    The first compiled call is checked against the eager network on the same input: seen here,
    Inductor's AVX2 code for this U-Net returned NaN on an AVX-512 CPU told to dispatch AVX2
    (``ATEN_CPU_CAPABILITY=avx2``), so a wrong compiled kernel must cost one check, never a
    grid of broken images. The graph is compiled for the first batch size seen; smaller batches
    (a last partial one) are padded to it inside ``forward`` so they reuse that graph.
    """

    TOLERANCE = 0.05  # relative RMS difference; bf16 autocast alone stays near 1e-2

    def __init__(self, model: torch.nn.Module, warn: Callable[[str], None] | None = None):
        super().__init__()
        self.model, self.warn, self.failed, self.batch = model, warn, False, None
        self.checked = False
        self.compiled = torch.compile(model, dynamic=False)

    def _fall_back(self, why: str) -> None:
        self.failed = True
        (self.warn or print)(f"note: torch.compile {why}; running eagerly")

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
                out = self.compiled(x, t, y)
            except Exception as e:  # compiler back-ends raise many types; eager is always right
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                self._fall_back(f"failed ({msg})")
                return self.model(x[:n], t[:n], None if y is None else y[:n])
            if self.checked:
                return out[:n]
            self.checked = True
            ref = self.model(x, t, y)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
            if torch.isfinite(out).all() and err.item() <= self.TOLERANCE:
                return out[:n]
            self._fall_back(f"disagreed with eager execution (relative difference "
                            f"{err.item():.3g})")
            return ref[:n]
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


def save_samples(path: str | Path, images: np.ndarray, meta: dict,
                 labels: np.ndarray | None = None) -> None:
    """Write ``images`` (uint8 ``[N x H x W]``) to ``path`` (.npz) and ``meta`` (the sidecar:
    see :func:`sidecar`) to the .json beside it, both atomically."""
    path = Path(path)
    buf = io.BytesIO()
    arrays = {"images": np.asarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def load_samples(path: str | Path, image_size: int = 28) -> np.ndarray:
    """Read and validate a sample file -> uint8 ``[N x H x W]``.

    Accepts the ``.npz`` written by ``minidiff sample`` (key ``images``) with shape
    ``[N x H x W]`` or ``[N x 1 x H x W]``; anything else is a :class:`MinidiffError` that says
    what is wrong. Never unpickles (``allow_pickle=False``).
    """
    path = Path(path)
    fix = "pass an .npz written by `minidiff sample`"
    if not path.is_file():
        raise MinidiffError(f"{path}: no such sample file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise MinidiffError(f"{path}: no 'images' array (found {z.files}); {fix}")
            images = z["images"]
    except MinidiffError:
        raise
    except (OSError, ValueError, EOFError) as e:
        first = str(e).splitlines()[0]
        raise MinidiffError(f"{path}: not a readable .npz ({first}); {fix}") from None
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size) or len(images) == 0:
        raise MinidiffError(f"{path}: images have shape {list(images.shape)}, expected "
                            f"[N x {image_size} x {image_size}] with N >= 1; {fix}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise MinidiffError(f"{path}: images contain NaN or Inf; the sampler diverged, "
                            "regenerate the file")
    if images.dtype != np.uint8:
        raise MinidiffError(f"{path}: images are {images.dtype}, expected uint8 in 0..255; {fix}")
    return images


def load_labels(path: str | Path, n: int, num_classes: int = 10) -> np.ndarray | None:
    """The ``labels`` array of a conditional sample file (validated against its ``n`` images),
    or None when the file has none."""
    with np.load(path, allow_pickle=False) as z:
        if "labels" not in z.files:
            return None
        labels = z["labels"]
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0 \
            or labels.max() >= num_classes:
        raise MinidiffError(f"{path}: 'labels' must be {n} class ids in 0..{num_classes - 1} "
                            f"(got shape {list(labels.shape)}, dtype {labels.dtype}); "
                            "regenerate it with `minidiff sample --class`")
    return labels


def sampling_schedule(config: dict, steps: int | None, spacing: str):
    """The respaced schedule a checkpoint's ``config`` is sampled with -> ``(sched, steps)``;
    ``steps=None`` means all T."""
    diff_cfg = DiffusionConfig.from_dict(config["diffusion"])
    T = diff_cfg.timesteps
    steps = steps or T
    if not 1 <= steps <= T:
        raise MinidiffError(f"--steps must be in 1..{T} (the model's T), got {steps}")
    try:
        return Schedule.from_config(diff_cfg).respace(steps, spacing), steps
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
    if (pick["sampler"], pick["spacing"]) != (own["sampler"], own["spacing"]) or cfg.given("eta"):
        raise MinidiffError(f"{what} only (got --sampler {pick['sampler']} --spacing "
                            f"{pick['spacing']}); drop --sampler, --spacing and --eta")
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
    sched, steps = sampling_schedule(config, cfg.steps, cfg.spacing)
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


def sidecar(cfg: SamplingConfig, n: int, checkpoint, digest: str, seconds: float,
            dataset: str, **extra) -> dict:
    """A sample file's JSON sidecar: ``n``, every field of the (resolved) ``cfg``, where the
    images came from and how long they took, then ``extra``."""
    return {"n": n, **cfg.to_dict(), **extra, "checkpoint": str(checkpoint),
            "checkpoint_sha256": digest, "seconds": round(seconds, 3), "dataset": dataset}


def read_sidecar(samples: str | Path) -> dict:
    """The JSON sidecar beside a sample file, ``{}`` when there is none or it is unreadable.

    Sidecars written before :class:`SamplingConfig` lacked ``eta`` when it was unused and
    ``guidance`` without ``--class``; both are filled in as None, so that every sidecar reads
    back with ``SamplingConfig.from_dict``.
    """
    path = Path(samples).with_suffix(".json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    meta.setdefault("eta", None)
    if "class" not in meta:
        meta.setdefault("guidance", None)
    return meta


def read_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """A sample file as tensors: images uint8 ``[N x H x W]``, the requested labels ``[N]`` of
    a conditional one (else None), and its sidecar (:func:`read_sidecar`)."""
    images = load_samples(path)
    labels = load_labels(path, len(images))
    return (torch.from_numpy(images), None if labels is None else torch.from_numpy(labels),
            read_sidecar(path))


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
