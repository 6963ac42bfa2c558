"""Sample files: an ``.npz`` of uint8 images (and the requested labels of a conditional draw)
with a JSON sidecar beside it that records how they were drawn (every
:class:`~minidiff.settings.SamplingConfig` field, the checkpoint and its digest, the seconds).
Read back without unpickling, and checked before any metric sees them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from .errors import MinidiffError
from .files import atomic_write_bytes, atomic_write_text
from .settings import SamplingConfig


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
