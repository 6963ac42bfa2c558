"""The configs of a training run from what a user chose: the U-Net of a preset (its widths
replaced, a class embedding added), today's recipe or the original one
(:mod:`minidiff.study.reference`), and a fine-tuning recipe of the study. ``minidiff train`` and
``minidiff study`` build their runs here; :func:`minidiff.train.train` takes the result."""

from __future__ import annotations

from dataclasses import replace

from ..data import get_spec
from ..diffusion import DiffusionConfig
from ..errors import MinidiffError
from ..settings import TrainConfig
from ..unet import PRESETS, UNetConfig
from .reference import DIFFUSION, RECIPES, TRAINING


def train_config(recipe: str | None = None, original: bool = False, **given) -> TrainConfig:
    """A :class:`TrainConfig` from command-line values, None meaning not given. A fine-tuning
    ``recipe`` (:data:`minidiff.study.reference.RECIPES`, with ``init``) supplies the lr unless
    one is given, and its epochs unless epochs or steps are. ``original``: start from the recipe
    before the convergence benchmark (:data:`minidiff.study.reference.TRAINING`) instead of the
    defaults."""
    given = {k: v for k, v in given.items() if v is not None}
    if recipe and not given.get("init"):
        raise MinidiffError("--recipe is a fine-tuning recipe: give --init CKPT too")
    r = dict(RECIPES[recipe]) if recipe else {}
    if "steps" in given:
        r.pop("epochs", None)
    return TrainConfig(**{**(TRAINING if original else {}), **r, **given})


def diffusion_config(original: bool = False, **given) -> DiffusionConfig:
    """A :class:`DiffusionConfig` from command-line values, None meaning not given;
    ``original``: the recipe before the convergence benchmark (eps-prediction)."""
    given = {k: v for k, v in given.items() if v is not None}
    return DiffusionConfig(**{**(DIFFUSION if original else {}), **given})


def model_config(preset: str, *, channels: tuple[int, ...] | None = None,
                 conditional: bool = False, dataset: str = "mnist") -> UNetConfig:
    """The U-Net of ``preset``, with ``channels`` as its widths if given and, if
    ``conditional``, a class embedding for ``dataset``'s classes."""
    cfg = PRESETS[preset]
    if channels:
        try:
            cfg = replace(cfg, channels=tuple(channels))
        except ValueError as e:
            raise MinidiffError(f"--channels: {e}") from None
    if conditional:
        cfg = replace(cfg, num_classes=len(get_spec(dataset).classes))
    return cfg


def run_configs(preset: str, recipe: str | None = None, original: bool = False, *,
                channels: tuple[int, ...] | None = None, conditional: bool = False,
                schedule: str | None = None, prediction: str | None = None,
                **given) -> tuple[UNetConfig, DiffusionConfig, TrainConfig]:
    """The model, diffusion and training configs of ``minidiff train`` from its flags, None
    meaning not given (``given``: :class:`TrainConfig` fields): :func:`model_config`,
    :func:`diffusion_config`, :func:`train_config`. A run with ``init`` takes its layout from
    that checkpoint, so it refuses ``channels`` and ``conditional``."""
    if given.get("label_dropout") is not None and not conditional:
        raise MinidiffError("--label-dropout applies to --conditional training only")
    if given.get("init") and (conditional or channels):
        raise MinidiffError("--init takes the model's layout from the checkpoint; drop "
                            "--conditional / --channels")
    cfg = train_config(recipe, original, **given)
    return (model_config(preset, channels=channels, conditional=conditional, dataset=cfg.dataset),
            diffusion_config(original, schedule=schedule, prediction=prediction), cfg)
