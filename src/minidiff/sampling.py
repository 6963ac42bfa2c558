"""Sampling a checkpoint to an ``.npz`` file with a JSON sidecar (and optionally a PNG grid)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint
from .diffusion import DiffusionConfig, Schedule
from .errors import MinidiffError
from .io import atomic_write_bytes, atomic_write_text, save_grid
from .samplers import SAMPLERS, generate
from .train import resolve_device, resolve_precision


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
        raise MinidiffError(f"{path}: not a readable .npz ({str(e).splitlines()[0]}); {fix}")
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
        raise MinidiffError(f"--spacing {spacing}: {e}")


def sample_to_file(checkpoint, out, *, n: int = 64, steps: int | None = None,
                   sampler: str = "ddpm", seed: int = 0, batch_size: int = 256,
                   precision: str = "fp32", device: str = "auto", grid: str | None = None,
                   progress: bool = True, eta: float | None = None,
                   spacing: str = "uniform", compile: bool = False) -> dict:
    """Generate ``n`` images from ``checkpoint`` into ``out`` (.npz); returns the sidecar dict."""
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

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"sample {sampler}-{steps}", dynamic_ncols=True)
    t0 = time.perf_counter()
    images = generate(model, sched, n, sampler=sampler, seed=seed, batch_size=batch_size,
                      precision=prec, device=dev, progress=bar.update if bar else None,
                      compile=compile, **kwargs)
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
    save_samples(out, images.numpy(), meta)
    if grid:
        save_grid(images[: min(n, 100)].numpy(), grid)
    return {**meta, "out": str(out), **({"grid": grid} if grid else {})}
