"""Compression of a trained U-Net: structured and unstructured pruning, int8 and fp16 storage.

* :func:`prune_structured` removes whole channels (L1 magnitude of each channel's weights) with
  Torch-Pruning's dependency graph, so residual adds, skip concatenations, GroupNorm groups and
  each block's time-embedding projection shrink together. The result is a plain :class:`UNet`
  whose ``config.widths`` records every changed width: it reloads from JSON + safetensors
  without pickle and without the original model.
* :func:`prune_unstructured` zeroes the smallest weights globally (``torch.nn.utils.prune``)
  and makes the zeros permanent; the checkpoint then stores those tensors as bitmask + values.
* :func:`int8_storage` names the weights that are stored as per-channel int8 (everything but
  the time embedding and the first and last convs).

Each ``*_checkpoint`` function reads a checkpoint and writes a new run folder whose config
records what was done, from which checkpoint (SHA-256), and the sizes before and after. The
folder is written beside its name (``.<name>.new-<pid>``), loaded back, and only then renamed
in (:func:`replace_folder`); an existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CONFIG_FILE, MODEL_FILE, load_checkpoint, resolve, save_model
from .diffusion import DiffusionConfig, Schedule, q_sample
from .errors import MinidiffError
from .files import atomic_write_bytes
from .unet import UNet, UNetConfig, count_macs, count_params, width_names

PRUNABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FLOAT_KEPT = ("time_mlp.", "class_emb.", "down_blocks.0.conv1.", "out.")  # never int8


def _example(cfg: UNetConfig, n: int = 2):
    x = torch.zeros(n, cfg.in_channels, cfg.image_size, cfg.image_size)
    return x, torch.zeros(n, dtype=torch.long)


def prune_structured(model: UNet, ratio: float) -> UNet:
    """A new :class:`UNet` with ``ratio`` of the channels of every prunable group removed by L1
    magnitude (Torch-Pruning's ``MetaPruner``, local ranking per group).

    GroupNorm's groups must stay equal in size, so channels are removed in whole steps of one
    per group: a 32-wide layer with 8 groups loses 8 channels at ratio 0.1 (floor(4 x 0.9) = 3
    kept per group). The time MLP, the class embedding and the output conv are not pruned.
    """
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise MinidiffError(f"--structured must be in (0, 1), got {ratio}")
    work = copy.deepcopy(model).cpu().float().eval()
    ignored = [work.time_mlp, work.out] + ([work.class_emb] if work.class_emb is not None else [])
    pruner = tp.pruner.MetaPruner(work, example_inputs=_example(work.config),
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    nominal = UNet(model.config)
    widths = dict(model.config.widths or {})
    for name in width_names(model.config):
        c = work.get_submodule(name).out_channels
        if c != nominal.get_submodule(name).out_channels:
            widths[name] = c
    cfg = UNetConfig.from_dict({**model.config.to_dict(), "widths": widths})
    pruned = UNet(cfg)
    pruned.load_state_dict(work.state_dict())  # also checks that the declared widths fit
    return pruned.eval()


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer: unstructured pruning's scope."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def prune_unstructured(model: nn.Module, ratio: float) -> list[str]:
    """Zero the ``ratio`` smallest-magnitude conv/linear weights of ``model`` in place, ranked
    globally (``torch.nn.utils.prune.global_unstructured``), and make it permanent. Returns the
    names of the pruned weight tensors."""
    from torch.nn.utils import prune

    if not 0 < ratio < 1:
        raise MinidiffError(f"--unstructured must be in (0, 1), got {ratio}")
    layers = prunable_weights(model)
    prune.global_unstructured([(m, "weight") for _, m in layers],
                              pruning_method=prune.L1Unstructured, amount=ratio)
    for _, m in layers:
        prune.remove(m, "weight")
    return [f"{n}.weight" for n, _ in layers]


def sparsity(model: nn.Module, names: list[str]) -> float:
    """Fraction of exact zeros over the tensors ``names`` of ``model``."""
    sd = model.state_dict()
    zeros = sum(int((sd[k] == 0).sum()) for k in names)
    return zeros / max(1, sum(sd[k].numel() for k in names))


def masks_of(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Non-zero masks of the tensors ``names``: what fine-tuning keeps at zero."""
    params = dict(model.named_parameters())
    return {k: params[k].detach() != 0 for k in names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k, m in masks.items():
        params[k].mul_(m)


def int8_storage(model: nn.Module) -> dict[str, int]:
    """{weight name: output-channel axis} of the weights stored as int8: every conv and linear
    but the time embedding, the class embedding and the first and last convs."""
    out = {}
    for name, m in prunable_weights(model):
        if not (name + ".").startswith(FLOAT_KEPT):
            out[f"{name}.weight"] = 1 if isinstance(m, nn.ConvTranspose2d) else 0
    return out


def stored_bytes(folder: Path) -> int:
    return (Path(folder) / "model.safetensors").stat().st_size


def _summary(model: UNet, folder: Path) -> dict:
    return {"params": count_params(model), "macs": count_macs(model),
            "bytes": stored_bytes(folder)}


def prune_checkpoint(checkpoint, out, *, structured: float | None = None,
                     unstructured: float | None = None, force: bool = False) -> dict:
    """Prune ``checkpoint`` and write a run folder ``out`` that `minidiff train --init` can
    fine-tune (the zeros of unstructured pruning are kept during fine-tuning); an existing
    ``out`` is replaced only with ``force``."""
    if not structured and not unstructured:
        raise MinidiffError("nothing to do: give --structured RATIO and/or --unstructured RATIO")
    out = Path(out)
    refuse_overwrite(out, force)
    model, config, digest = load_checkpoint(checkpoint)
    before = {"params": count_params(model), "macs": count_macs(model),
              "bytes": resolve(checkpoint)[0].stat().st_size}
    if structured:
        model = prune_structured(model, structured)
    storage = dict(config.get("storage") or {})
    record = {"from": str(checkpoint), "from_sha256": digest, "structured": structured,
              "unstructured": unstructured, "before": before}
    if unstructured:
        names = prune_unstructured(model, unstructured)
        storage["sparse"] = names
        record["sparsity"] = round(sparsity(model, names), 6)
    new = {**config, "model": model.config.to_dict(), "storage": storage,
           "pruned": record, "step": 0}
    new.pop("model_sha256", None)
    with staged(out) as tmp:
        save_model(tmp, model, new)
        record["after"] = _summary(model, tmp)
        save_model(tmp, model, new)  # now with the sizes recorded
    return record


def calibration_inputs(cfg: UNetConfig, sched: Schedule, n: int, seed: int = 0):
    """``n`` inputs a noise predictor meets while sampling: ``x_t: [n x C x H x W]`` of Gaussian
    ``x_0`` (clipped to the data range) at timesteps ``t: [n]`` spread over the schedule."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).clamp(-1, 1)
    t = torch.linspace(0, len(sched) - 1, n).long()
    return q_sample(sched, x0, t, torch.randn(x0.shape, generator=g)), t


# Calibration inputs of a stored copy's output error: 64 inputs (50,176 outputs) over the
# schedule; the checkpoints shipped before 2026-12-07 recorded theirs on 256.
ERROR_INPUTS = 64


@torch.no_grad()
def output_error(a: nn.Module, b: nn.Module, config: dict, n: int = ERROR_INPUTS,
                 seed: int = 0) -> float:
    """Relative RMS difference of two noise predictors on ``n`` calibration inputs
    (:func:`calibration_inputs`)."""
    sched = Schedule.from_config(DiffusionConfig.from_dict(config["diffusion"]))
    xt, t = calibration_inputs(a.config, sched, n, seed)
    ea, eb = a(xt, t), b(xt, t)
    return float((ea - eb).pow(2).mean().sqrt() / ea.pow(2).mean().sqrt())


def quantize_checkpoint(checkpoint, out, *, mode: str = "int8", force: bool = False) -> dict:
    """Store ``checkpoint`` compactly: ``int8`` (per-channel int8 weights, float elsewhere) or
    ``fp16`` (every float tensor in half precision). Execution stays in float (bf16/fp32): the
    weights are dequantized at load. Records the relative output error on calibration inputs.
    An existing ``out`` is replaced only with ``force``."""
    if mode not in ("int8", "fp16"):
        raise MinidiffError(f"--mode must be int8 or fp16, got {mode!r}")
    out = Path(out)
    refuse_overwrite(out, force)
    model, config, digest = load_checkpoint(checkpoint)
    storage = dict(config.get("storage") or {})
    if mode == "int8":
        storage["int8"] = int8_storage(model)
    storage["half"] = True  # the float tensors that remain (int8 keeps its scales in fp32)
    record = {"from": str(checkpoint), "from_sha256": digest, "mode": mode,
              "before_bytes": resolve(checkpoint)[0].stat().st_size}
    new = {**config, "storage": storage, "quantized": record}
    new.pop("model_sha256", None)
    with staged(out) as tmp:
        save_model(tmp, model, new)
        reloaded, _, _ = load_checkpoint(tmp)
        record["output_rel_rms_error"] = round(output_error(model, reloaded, config), 6)
        record["output_error_inputs"] = ERROR_INPUTS
        record["after_bytes"] = stored_bytes(tmp)
        save_model(tmp, model, new)
    return record


def copy_checkpoint(checkpoint: Path, out, *, force: bool = False) -> None:
    """Copy the run folder ``checkpoint``'s model (weights and config.json, byte for byte) to
    the folder ``out``; an existing ``out`` is replaced only with ``force``."""
    out = Path(out)
    refuse_overwrite(out, force)
    with staged(out) as tmp:
        for name in (MODEL_FILE, CONFIG_FILE):
            atomic_write_bytes(tmp / name, (Path(checkpoint) / name).read_bytes())


# --------------------------------------------------------------------------- output folders


def refuse_overwrite(out: Path, force: bool, flag: str = "--out") -> None:
    """Refuse to write the folder ``out`` over anything it holds, unless ``force`` (the error
    names ``flag``, which chose ``out``). First puts back an old copy that a stopped
    :func:`replace_folder` left beside a missing ``out``."""
    if out.name in ("", ".", ".."):
        raise MinidiffError(f"{flag} {out}: name a folder to create, e.g. {flag} runs/model")
    recover_folder(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    model = out.is_dir() and {p.name for p in out.iterdir()} <= {MODEL_FILE, CONFIG_FILE}
    if force and model:
        return
    if not model:  # --force replaces a model, never a folder of other things (runs/, a run)
        raise MinidiffError(f"{out} holds more than a model (model.safetensors, config.json); "
                            f"choose another {flag}")
    raise MinidiffError(f"{out} already holds a model; pass --force to replace it or choose "
                        f"another {flag}")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` for the block to write; once the block is done and the
    model there loads, it replaces ``out`` (:func:`replace_folder`). On any error it is
    removed and ``out`` is as it was."""
    tmp = out.with_name(f".{out.name}.new-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        load_checkpoint(tmp)  # verify before it replaces anything
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, target: Path) -> None:
    """Rename the folder ``new`` to ``target``. An old ``target`` steps aside first (as
    ``.<name>.old-<pid>``) and is removed only once ``new`` is in, so a crash at any moment
    leaves a loadable model under the name, or the old copy beside it for
    :func:`recover_folder` to put back."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if not target.exists() and old.exists():
            os.replace(old, target)
        raise
    _remove(old)


def recover_folder(target: Path) -> None:
    """After a crash inside :func:`replace_folder`: an old copy beside a missing ``target`` goes
    back under its name; one beside a present ``target`` was already replaced and goes."""
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            _remove(old)
        else:
            os.replace(old, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
