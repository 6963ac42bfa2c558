"""Checkpoints are data: safetensors for tensors, JSON for everything else. Nothing is pickled.

A run folder holds::

    config.json         model + diffusion + training configs, step, and model.safetensors' SHA-256
    model.safetensors   EMA weights used for sampling (the config is also in its metadata, so
                        the file alone rebuilds the model)
    checkpoints/step-NNNNNNNN/state.safetensors   raw + EMA weights, optimizer tensors
    checkpoints/step-NNNNNNNN/state.json          step, optimizer settings, the tensors' SHA-256

Every file is written atomically (temp file, fsync, rename) and each checkpoint folder appears
in one rename, so a killed run leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .codec import decode_state, encode_state
from .diffusion import DiffusionConfig
from .errors import CheckpointError
from .files import ASSETS, atomic_write_bytes, atomic_write_text
from .unet import UNet, UNetConfig

SHIPPED_DIR = ASSETS / "models"
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_FILE, STATE_JSON = "state.safetensors", "state.json"


def dataset_of(config: dict) -> str:
    """The dataset a checkpoint's ``config`` was trained on (one written before datasets had
    names: MNIST)."""
    return config.get("train", {}).get("dataset", "mnist")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dict_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return st_save(tensors, metadata=metadata)


def save_model(folder: Path, model: UNet, config: dict) -> str:
    """Write ``model``'s weights and ``config`` (the run's configs) atomically; returns the
    weights' SHA-256, which is also recorded in config.json. ``config["storage"]``, when
    present, picks a compact layout (sparse / int8 / half, see :func:`encode_state`)."""
    folder = Path(folder)
    meta = {"minidiff_config": json.dumps(config)}
    data = _state_dict_bytes(encode_state(model.state_dict(), config.get("storage")), meta)
    digest = sha256(data)
    atomic_write_bytes(folder / MODEL_FILE, data)
    atomic_write_text(folder / CONFIG_FILE, json.dumps({**config, "model_sha256": digest},
                                                       indent=2) + "\n")
    return digest


def shipped_models() -> list[str]:
    """Names of the models shipped with the package (``minidiff/assets/models/<name>/``)."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / MODEL_FILE).is_file()) \
        if SHIPPED_DIR.is_dir() else []


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """A run folder, a .safetensors file or a shipped model's name (``reduced-cond``) ->
    (weights file, config.json or None)."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and not path.suffix \
            and path.name in shipped_models():
        path = SHIPPED_DIR / path.name
    if path.is_dir():
        weights = path / MODEL_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder; pass a run folder "
                                  "written by `minidiff train` or a .safetensors file")
        return weights, path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else None
    if not path.exists():
        names = ", ".join(shipped_models()) or \
            f"none found in {SHIPPED_DIR}: reinstall minidiff"
        raise CheckpointError(f"{path}: no such checkpoint; pass a run folder, a .safetensors "
                              f"file or a shipped model ({names})")
    if path.suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (they can run code); "
                              "use a .safetensors checkpoint written by minidiff")
    side = path.with_name(CONFIG_FILE)
    return path, side if side.is_file() else None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the EMA model of a run folder or .safetensors file.

    Returns ``(model, config, digest)`` where ``config`` is the run's config dict (with
    ``model`` and ``diffusion`` entries) and ``digest`` the weights file's SHA-256.
    """
    weights, config_path = resolve(path)
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{weights}: cannot read ({e.strerror})") from None
    digest = sha256(data)
    config = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: unreadable JSON ({e}); restore it from the "
                                  "run folder or pass the .safetensors file alone") from None
        _check_object(config, config_path)
        recorded = config.get("model_sha256")
        if recorded and recorded != digest and weights.parent == config_path.parent:
            raise CheckpointError(f"{weights}: SHA-256 {digest[:12]}... does not match the "
                                  f"{recorded[:12]}... recorded in {config_path.name}; the file "
                                  "is corrupt or half-written: `minidiff train --out "
                                  f"{weights.parent} --resume` rewrites it from the last "
                                  "checkpoint")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({e}); the file is "
                              "corrupt or truncated, use another checkpoint") from None
    if config is None:
        config = _metadata_config(data, weights)
    try:
        model_cfg = UNetConfig.from_dict(config["model"])
        DiffusionConfig.from_dict(config["diffusion"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path or weights}: invalid config ({e}); it was not "
                              "written by this version of minidiff") from None
    try:
        # the shapes the config implies, on the meta device: a config that declares huge widths
        # allocates nothing before they are checked against the tensors the file holds
        with torch.device("meta"):
            expected = {k: v.shape for k, v in UNet(model_cfg).state_dict().items()}
        _check_masks(tensors, expected)
        tensors = decode_state(tensors, expected)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}; the file is damaged or was not written by "
                              "this version of minidiff") from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k]]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {wrong[0]} is {list(tensors[wrong[0]].shape)}, config "
                  f"implies {list(expected[wrong[0]])}")
        raise CheckpointError(f"{weights}: weights do not match the model config ({detail}); "
                              "the config and weights come from different runs")
    model = UNet(model_cfg)
    model.load_state_dict(tensors)
    return model.to(device).eval(), config, digest


def _check_object(config, source: Path) -> None:
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: invalid config (a JSON {type(config).__name__}, not "
                              "an object); it was not written by this version of minidiff")


def _check_masks(tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """A sparse tensor's bitmask must hold one bit per weight of the shape the config implies,
    so decoding it allocates no more than the file's own size warrants."""
    for key in (k for k in tensors if k.endswith(":mask")):
        base = key[: -len(":mask")]
        shape = shapes.get(base.split(":")[0])
        if shape is not None and tensors[key].numel() != -(-shape.numel() // 8):
            raise ValueError(f"sparse tensor {base} has a mask of {tensors[key].numel()} bytes, "
                             f"its shape {list(shape)} needs {-(-shape.numel() // 8)}")


def _metadata_config(data: bytes, weights: Path) -> dict:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if "minidiff_config" not in meta:
        raise CheckpointError(f"{weights}: no config.json beside it and no config in its "
                              "metadata; pass the run folder written by `minidiff train`")
    try:
        config = json.loads(meta["minidiff_config"])
    except ValueError as e:
        raise CheckpointError(f"{weights}: the config in its metadata is unreadable JSON ({e}); "
                              "pass the run folder written by `minidiff train`") from None
    _check_object(config, weights)
    return config


# --------------------------------------------------------------------------- training state

CHECKPOINTS = "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_partial(folder: Path) -> None:
    """Remove what a killed run may have left half-written (temp files and folders)."""
    folder = Path(folder)
    for junk in list(folder.glob(".*.tmp")) + list((folder / CHECKPOINTS).glob(".*")):
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


def save_state(folder: Path, model: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer, step: int, keep: int = 3) -> Path:
    """Write ``folder/checkpoints/step-NNNNNNNN/`` (raw + EMA weights and optimizer tensors in
    safetensors; step, optimizer hyper-parameters and the tensors' SHA-256 in JSON) as one
    atomic folder rename, then delete all but the newest ``keep`` checkpoints."""
    root = Path(folder) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(val)
    data = _state_dict_bytes(tensors)
    meta = {"step": step, "param_groups": opt_sd["param_groups"], "sha256": sha256(data),
            "minidiff_version": __version__}
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic_write_bytes(tmp / STATE_FILE, data)
        atomic_write_text(tmp / STATE_JSON, json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: leave no half checkpoint
        raise
    if final.exists():  # re-reaching a step after resuming from an older checkpoint
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_state(ckpt: Path) -> tuple[dict, bytes]:
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
        data = (ckpt / STATE_FILE).read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: unreadable ({e})") from None
    if sha256(data) != meta.get("sha256"):
        raise CheckpointError(f"{ckpt / STATE_FILE}: SHA-256 does not match {STATE_JSON}")
    return meta, data


def load_state(folder: Path, model: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer, warn=print) -> dict:
    """Restore the newest checkpoint of ``folder`` that verifies; corrupt newer ones are
    reported through ``warn`` and skipped. Returns its JSON metadata (with ``step``)."""
    folder = Path(folder)
    ckpts = sorted((folder / CHECKPOINTS).glob("step-*"), reverse=True)
    if not ckpts:
        raise CheckpointError(f"{folder}: no checkpoint to resume from; start a new run "
                              "without --resume")
    for ckpt in ckpts:
        try:
            meta, data = _read_state(ckpt)
            tensors = st_load(data)
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k[:6] == "model."})
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k[:4] == "ema."})
            state: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, pid, key = k.split(".", 2)
                    state.setdefault(int(pid), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (CheckpointError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
            warn(f"note: skipping corrupt checkpoint {ckpt.name}: {str(e).splitlines()[0]}")
            continue
        return {**meta, "path": str(ckpt)}
    raise CheckpointError(f"{folder}: every checkpoint is corrupt; start a new run without "
                          "--resume")
