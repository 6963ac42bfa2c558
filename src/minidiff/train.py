"""Training a noise predictor (Ho et al. 2020): the :class:`Training` method that
:func:`minidiff.loop.fit` runs, with AdamW, warm-up + cosine LR, gradient clipping, EMA, bf16
autocast, pruning masks kept through fine-tuning, evaluation at chosen steps and data parallelism
under ``torchrun``."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import torch

from . import __version__, distributed
from .checkpoint import load_checkpoint
from .compress import apply_masks, masks_of
from .diffusion import DiffusionConfig, DiffusionLoss, Schedule
from .evaluation import Evaluator
from .loop import (
    Method,
    Run,
    budget_steps,
    drop_labels,
    fit,
    hold,
    previous_run,
    seconds_per_step,
    steps_per_epoch,
    training_images,
)
from .runtime import bf16_native, resolve_device, resolve_precision
from .settings import TrainConfig
from .unet import UNet, UNetConfig, count_macs

# What a fine-tuned run inherits from its --init checkpoint's config (and keeps on resume).
CARRIED = ("storage", "pruned", "init_sha256")


def run_config(model_cfg: UNetConfig, diff_cfg: DiffusionConfig, train_cfg: TrainConfig,
               step: int, **extra) -> dict:
    return {"minidiff_version": __version__, "model": model_cfg.to_dict(),
            "diffusion": diff_cfg.to_dict(), "train": train_cfg.to_dict(), "step": step, **extra}


def train(model_cfg: UNetConfig, diff_cfg: DiffusionConfig, cfg: TrainConfig, out: str | Path,
          *, data_dir=None, resume: bool = False, progress: bool = True,
          preset: str | None = None) -> dict:
    """Train a noise predictor and write the run folder ``out``; returns a summary dict.

    Under ``torchrun --nproc_per_node=N`` this is data-parallel: ``cfg.batch_size`` is the global
    batch, each rank trains on its shard, rank 0 writes the run folder.
    """
    out = Path(out)
    world, device = distributed.init(resolve_device(cfg.device))
    with hold(out, world):
        # a resumed run continues with exactly the configs it was started with
        saved = previous_run(out, resume, "train", lambda d: _saved_configs(d, preset))
        init_model, carried = None, {}
        if saved:
            model_cfg, diff_cfg, cfg, preset, carried = saved
        elif cfg.init:
            init_model, model_cfg, diff_cfg, carried = _fine_tuning(cfg.init)
        precision = resolve_precision(cfg.precision, device)
        if precision == "bf16" and not bf16_native(device) and world.main:
            print("note: bf16 is not native here; autocast will emulate it (~100x slower), "
                  "use --precision auto or fp32")
        images, labels = training_images(cfg.dataset, cfg.subset, model_cfg.image_size, data_dir)
        distributed.check_batch(world, min(cfg.batch_size, len(images)))
        per_epoch = steps_per_epoch(len(images), cfg.batch_size)
        run = Run(out, images, labels if model_cfg.num_classes else None, device, precision,
                  world, resume, progress, f"train {preset or ''}".strip())
        extra = {**({"preset": preset} if preset else {}), **carried}
        if cfg.minutes and not cfg.steps:  # a time budget: fix the steps, then train as usual
            probe = Training(model_cfg, diff_cfg, replace(cfg, eval_every=None), 1, extra, world,
                             device, init_model)
            per_step = seconds_per_step(probe, run)
            cfg = replace(cfg, steps=budget_steps(60 * cfg.minutes, per_step))
            extra["budget"] = {"minutes": cfg.minutes, "probe_s_per_step": round(per_step, 5),
                               "steps": cfg.steps}
        total = cfg.steps or math.ceil((cfg.epochs or 10) * per_epoch)
        method = Training(model_cfg, diff_cfg, cfg, total, extra, world, device, init_model,
                          data_dir)
        summary = fit(method, run)
    distributed.finish(world)
    if "note" in summary:
        return summary
    return {**summary, "precision": precision, "device": str(device),
            "steps_per_epoch": per_epoch, **({"budget": extra["budget"]} if "budget" in extra
                                             else {})}


def _saved_configs(saved: dict, preset: str | None):
    """A run folder's config.json -> ``(model, diffusion, train configs, preset, carried)``."""
    return (UNetConfig.from_dict(saved["model"]), DiffusionConfig.from_dict(saved["diffusion"]),
            TrainConfig.from_dict(saved["train"]), saved.get("preset", preset),
            {k: saved[k] for k in (*CARRIED, "budget") if k in saved})


def _fine_tuning(init: str):
    """Fine-tuning ``init``: its weights, and the layout (pruned widths), schedule and storage
    from its config -> ``(model, model config, diffusion config, carried)``."""
    model, config, sha = load_checkpoint(init)
    carried = {k: config[k] for k in CARRIED if k in config}
    carried["init_sha256"] = sha
    # keep the sparse layout (its zeros are kept in training); a fine-tuned model is stored
    # in float again, not in the int8/fp16 layout its initial weights came in
    sparse = (carried.pop("storage", None) or {}).get("sparse")
    if sparse:
        carried["storage"] = {"sparse": sparse}
    return model, model.config, DiffusionConfig.from_dict(config["diffusion"]), carried


class Training(Method):
    """One U-Net trained by :class:`~minidiff.diffusion.DiffusionLoss` (through DDP when there
    are several ranks), its pruned zeros kept zero, the EMA weights scored at ``cfg``'s
    evaluation steps (rank 0) with images seen, training FLOPs and training seconds."""

    def __init__(self, model_cfg: UNetConfig, diff_cfg: DiffusionConfig, cfg: TrainConfig,
                 total: int, extra: dict, world, device, init: UNet | None = None,
                 data_dir=None):
        self.cfg, self.per_round, self.world = cfg, total, world
        self.configs = (model_cfg, diff_cfg, extra)
        torch.manual_seed(cfg.seed)  # weight init
        self.model = UNet(model_cfg).to(device)
        if init is not None:
            self.model.load_state_dict(init.state_dict())
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = distributed.wrap(self.model, world, device)  # what forward/backward run through
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.loss_fn = DiffusionLoss(Schedule.from_config(diff_cfg), cfg.loss_weighting,
                                     cfg.min_snr_gamma, levels=cfg.noise_levels,
                                     level_mean=cfg.level_mean, level_std=cfg.level_std,
                                     sigma_data=cfg.sigma_data)
        self.sparse = (extra.get("storage") or {}).get("sparse", [])
        self.eval_at = set(cfg.eval_steps(total)) if world.main else set()
        if self.eval_at:
            self.evaluator = Evaluator(diff_cfg, cfg.eval_n, cfg.dataset, device=device,
                                       data_dir=data_dir)
            # 3 x the forward's 2 x MACs per image
            shape = (1, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
            self.flops_per_image = 6 * count_macs(self.model, shape)

    def config_at(self, step: int) -> dict:
        model_cfg, diff_cfg, extra = self.configs
        return run_config(model_cfg, diff_cfg, self.cfg, step, **extra)

    def begin_round(self, r: int, fresh: bool) -> None:
        # unstructured pruning: the zeros stay zero through fine-tuning (masks from the weights
        # as initialised or restored)
        self.masks = masks_of(self.model, self.sparse)

    def loss(self, x0: torch.Tensor, y: torch.Tensor | None, generator,
             step: int) -> torch.Tensor:
        loss_fn, cfg = self.loss_fn, self.cfg
        t_idx, noise = loss_fn.draw(x0.shape, x0.device, generator)  # for the whole global batch
        if y is not None:
            y = drop_labels(y, cfg.label_dropout, self.model.config.num_classes, generator)
        sh = self.world.shard(len(x0))  # this rank's rows (all of them in a single process)
        return loss_fn(self.net, x0[sh], None if y is None else y[sh], i=t_idx[sh],
                       noise=noise[sh])

    def after_update(self) -> None:
        apply_masks(self.model, self.masks)

    def evaluate(self, step: int, images_seen: int, train_s: float) -> dict:
        rec = {"step": step, "images_seen": images_seen,
               "train_flops": images_seen * self.flops_per_image, "train_s": train_s,
               "eval": self.evaluator(self.ema)}
        if self.cfg.eval_raw:
            rec["eval_raw"] = self.evaluator(self.model)
        return rec
