"""Checkpoints are data: safetensors for tensors, JSON for everything else. Nothing is pickled.

A run folder holds::

    config.json         model + diffusion + training configs, step, and model.safetensors' SHA-256
    model.safetensors   EMA weights used for sampling (the config is also in its metadata, so
                        the file alone rebuilds the model)
    state.safetensors   raw weights ("model.*") and optimizer tensors ("opt.*") for resuming
    state.json          step, optimizer hyper-parameters and state.safetensors' SHA-256
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .diffusion import DiffusionConfig
from .errors import CheckpointError
from .io import atomic_write_bytes, atomic_write_text
from .unet import UNet, UNetConfig

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_FILE, STATE_JSON = "state.safetensors", "state.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dict_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return st_save(tensors, metadata=metadata)


def save_model(folder: Path, model: UNet, config: dict) -> str:
    """Write ``model``'s weights and ``config`` (the run's configs) atomically; returns the
    weights' SHA-256, which is also recorded in config.json."""
    folder = Path(folder)
    meta = {"minidiff_config": json.dumps(config)}
    data = _state_dict_bytes(model.state_dict(), meta)
    digest = sha256(data)
    atomic_write_bytes(folder / MODEL_FILE, data)
    atomic_write_text(folder / CONFIG_FILE, json.dumps({**config, "model_sha256": digest},
                                                       indent=2) + "\n")
    return digest


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """A run folder or a .safetensors file -> (weights file, config.json or None)."""
    path = Path(path)
    if path.is_dir():
        weights = path / MODEL_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder; pass a run folder "
                                  "written by `minidiff train` or a .safetensors file")
        return weights, path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else None
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; pass a run folder or a "
                              ".safetensors file")
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
        raise CheckpointError(f"{weights}: cannot read ({e.strerror})")
    digest = sha256(data)
    config = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: unreadable JSON ({e}); restore it from the "
                                  "run folder or pass the .safetensors file alone")
        recorded = config.get("model_sha256")
        if recorded and recorded != digest and weights.parent == config_path.parent:
            raise CheckpointError(f"{weights}: SHA-256 {digest[:12]}... does not match the "
                                  f"{recorded[:12]}... recorded in {config_path.name}; the "
                                  "weights are corrupt or were replaced")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({e}); the file is "
                              "corrupt or truncated, use another checkpoint")
    if config is None:
        config = _metadata_config(data, weights)
    try:
        model_cfg = UNetConfig.from_dict(config["model"])
        DiffusionConfig.from_dict(config["diffusion"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path or weights}: invalid config ({e}); it was not "
                              "written by this version of minidiff")
    model = UNet(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {wrong[0]} is {list(tensors[wrong[0]].shape)}, config "
                  f"implies {list(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{weights}: weights do not match the model config ({detail}); "
                              "the config and weights come from different runs")
    model.load_state_dict(tensors)
    return model.to(device).eval(), config, digest


def _metadata_config(data: bytes, weights: Path) -> dict:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if "minidiff_config" not in meta:
        raise CheckpointError(f"{weights}: no config.json beside it and no config in its "
                              "metadata; pass the run folder written by `minidiff train`")
    return json.loads(meta["minidiff_config"])


# --------------------------------------------------------------------------- training state


def save_state(folder: Path, model: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
    """Everything needed to resume: raw + EMA weights, optimizer, step (tensors in safetensors,
    the rest in JSON). Written before config.json/model.safetensors so a crash in between
    leaves a consistent older pair."""
    folder = Path(folder)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(val)
    data = _state_dict_bytes(tensors)
    atomic_write_bytes(folder / STATE_FILE, data)
    meta = {"step": step, "param_groups": opt_sd["param_groups"], "sha256": sha256(data),
            "minidiff_version": __version__, **(extra or {})}
    atomic_write_text(folder / STATE_JSON, json.dumps(meta, indent=2) + "\n")


def load_state(folder: Path, model: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_state` wrote; returns the JSON metadata (with ``step``)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        data = (folder / STATE_FILE).read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no resumable training state ({e}); start a new run "
                              "without --resume")
    if sha256(data) != meta.get("sha256"):
        raise CheckpointError(f"{folder / STATE_FILE}: SHA-256 does not match {STATE_JSON}; "
                              "the state is corrupt, start a new run without --resume")
    tensors = st_load(data)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
