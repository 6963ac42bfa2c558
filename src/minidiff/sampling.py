"""Sampling a checkpoint to an ``.npz`` file with a JSON sidecar (and optionally a PNG grid)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .diffusion import DiffusionConfig, Schedule
from .errors import MinidiffError
from .io import atomic_write_bytes, atomic_write_text, save_grid
from .runtime import resolve_device, resolve_precision
from .samplers import SAMPLERS, generate


def save_samples(path: str | Path, images: np.ndarray, meta: dict,
                 labels: np.ndarray | None = None) -> None:
    """Write ``images`` (uint8 ``[N x H x W]``) to ``path`` (.npz) and ``meta`` to the .json
    beside it, both atomically."""
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


def sampling_schedule(config: dict, steps: int | None, spacing: str = "uniform"):
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


# `minidiff sample`'s default: the fewest network evaluations whose pseudo-FID stays within 10%
# of DDPM-1000's on the same checkpoint (benchmarks/results/default_sampler.md)
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_SPACING = "dpmpp-sde", 8, "trailing"

# classifier-free guidance scale when --class is given without --guidance: the sweep's best
# trade-off (benchmarks/results/guidance_sweep.md)
DEFAULT_GUIDANCE = 1.5


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


def sample_to_file(checkpoint, out, *, n: int = 64, steps: int | None = DEFAULT_STEPS,
                   sampler: str = DEFAULT_SAMPLER, seed: int = 0, batch_size: int = 256,
                   precision: str = "auto", device: str = "auto", grid: str | None = None,
                   progress: bool = True, eta: float | None = None,
                   spacing: str = DEFAULT_SPACING, compile: bool = False,
                   classes: str | None = None, guidance: float | None = None) -> dict:
    """Generate ``n`` images from ``checkpoint`` into ``out`` (.npz); returns the sidecar dict.

    ``classes`` (a conditional model only): one class id ("7") or "all" for a balanced set of
    ``n / num_classes`` per class, sorted by class; the labels go into the .npz and the grid
    shows one class per row. ``guidance`` is the classifier-free guidance scale.
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise MinidiffError(f"--out {out}: the sample file must end in .npz")
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise MinidiffError(f"--grid {grid}: the grid must be a .png file")
    if sampler not in SAMPLERS:
        raise MinidiffError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if n < 1:
        raise MinidiffError(f"--n must be >= 1, got {n}")
    if eta is not None and sampler != "ddim":
        raise MinidiffError("--eta applies to --sampler ddim only")
    if eta is not None and eta < 0:
        raise MinidiffError(f"--eta must be >= 0, got {eta}")
    kwargs = {"eta": eta} if eta is not None else {}
    dev = resolve_device(device)
    model, config, digest = load_checkpoint(checkpoint, dev)
    sched, steps = sampling_schedule(config, steps, spacing)
    prec = resolve_precision(precision, dev)
    labels = class_labels(classes, n, model.config.num_classes, checkpoint)
    if labels is not None:
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        if guidance < 0:
            raise MinidiffError(f"--guidance must be >= 0, got {guidance}")
    elif guidance is not None:
        raise MinidiffError("--guidance needs --class (a digit or all)")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"sample {sampler}-{steps}", dynamic_ncols=True)
    t0 = time.perf_counter()
    images = generate(model, sched, n, sampler=sampler, seed=seed, batch_size=batch_size,
                      precision=prec, device=dev, progress=bar.update if bar else None,
                      compile=compile, y=labels, guidance=guidance, **kwargs)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    meta = {"n": n, "sampler": sampler, **kwargs, "steps": steps, "spacing": spacing,
            "seed": seed,
            "batch_size": batch_size,
            "precision": prec, "compile": compile, "device": str(dev),
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": digest, "seconds": round(seconds, 3),
            "dataset": config.get("train", {}).get("dataset", "mnist")}
    if labels is not None:
        meta.update({"class": classes, "guidance": guidance})
    save_samples(out, images.numpy(), meta, None if labels is None else labels.numpy())
    if grid:
        if labels is not None and classes == "all":  # one row per class, at most 10 each
            k = min(10, n // model.config.num_classes)
            rows = images.view(model.config.num_classes, -1, *images.shape[1:])[:, :k]
            save_grid(rows.reshape(-1, *images.shape[1:]).numpy(), grid, nrow=k)
        else:
            save_grid(images[: min(n, 100)].numpy(), grid)
    return {**meta, "out": str(out), **({"grid": grid} if grid else {})}
