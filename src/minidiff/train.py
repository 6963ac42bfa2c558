"""One readable training loop: AdamW, warm-up + cosine LR, gradient clipping, EMA, bf16 autocast.

Every source of randomness is a function of ``(seed, step)``: the data order of an epoch comes
from ``(seed, epoch)`` and each step's timesteps and noise from a generator seeded with
``(seed, step)``. A run resumed from a checkpoint therefore continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch

from . import __version__, distributed
from .checkpoint import (
    CONFIG_FILE,
    clean_partial,
    load_checkpoint,
    load_state,
    save_model,
    save_state,
)
from .compress import apply_masks, masks_of
from .data import epoch_order, load_split, to_model_range
from .diffusion import DiffusionConfig, DiffusionLoss, Schedule
from .errors import MinidiffError
from .evaluation import Evaluator
from .runtime import autocast_context, bf16_native, resolve_device, resolve_precision
from .settings import TrainConfig
from .training_utils import drop_labels, ema_update, lr_at, step_seed, trim_log
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
    if resume:
        # a resumed run continues with exactly the configs it was started with
        try:
            saved = json.loads((out / CONFIG_FILE).read_text())
            model_cfg = UNetConfig.from_dict(saved["model"])
            diff_cfg = DiffusionConfig.from_dict(saved["diffusion"])
            cfg = TrainConfig.from_dict(saved["train"])
            preset = saved.get("preset", preset)
            carried = {k: saved[k] for k in CARRIED if k in saved}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MinidiffError(f"{out}: cannot resume ({e}); pass the --out of an earlier "
                                "`minidiff train` run, or drop --resume") from None
    elif (out / CONFIG_FILE).exists():
        raise MinidiffError(f"{out} already holds a run; pass --resume to continue it or choose "
                            "another --out")
    init_model = None
    if cfg.init and not resume:
        # fine-tuning: the layout (pruned widths), schedule and storage come from the checkpoint
        init_model, init_config, init_sha = load_checkpoint(cfg.init)
        model_cfg = init_model.config
        diff_cfg = DiffusionConfig.from_dict(init_config["diffusion"])
        carried = {k: init_config[k] for k in CARRIED if k in init_config}
        carried["init_sha256"] = init_sha
        # keep the sparse layout (its zeros are kept in training); a fine-tuned model is stored
        # in float again, not in the int8/fp16 layout its initial weights came in
        sparse = (carried.pop("storage", None) or {}).get("sparse")
        if sparse:
            carried["storage"] = {"sparse": sparse}
    elif not resume:
        carried = {}
    storage = carried.get("storage")
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and not bf16_native(device) and world.main:
        print("note: bf16 is not native here; autocast will emulate it (~100x slower), "
              "use --precision auto or fp32")

    images, labels = load_split(cfg.dataset, "train", data_dir)
    if cfg.subset:
        images, labels = images[:cfg.subset], labels[:cfg.subset]
    if images.shape[1:] != (model_cfg.image_size, model_cfg.image_size):
        raise MinidiffError(f"{cfg.dataset} images are {tuple(images.shape[1:])}, the model "
                            f"expects {model_cfg.image_size}x{model_cfg.image_size}")
    n = len(images)
    bs = min(cfg.batch_size, n)
    distributed.check_batch(world, bs)
    steps_per_epoch = max(1, n // bs)
    total = cfg.steps or math.ceil((cfg.epochs or 10) * steps_per_epoch)

    torch.manual_seed(cfg.seed)  # weight init
    model = UNet(model_cfg).to(device)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = distributed.wrap(model, world, device)  # what forward/backward run through
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = Schedule.from_config(diff_cfg)
    loss_fn = DiffusionLoss(sched, cfg.loss_weighting, cfg.min_snr_gamma)
    extra = {**({"preset": preset} if preset else {}), **carried}
    step = 0
    distributed.barrier(world)  # every rank has checked `out` before rank 0 writes to it
    metrics_path = out / "metrics.jsonl"
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            clean_partial(out)
        else:
            save_model(out, ema, run_config(model_cfg, diff_cfg, cfg, 0, **extra))
    distributed.barrier(world)
    if resume:
        step = load_state(out, model, ema, opt,
                          warn=print if world.main else lambda _: None)["step"]
        if world.main:
            # the sampling pair may be newer than the restored state (or half-written): re-sync
            save_model(out, ema, run_config(model_cfg, diff_cfg, cfg, step, **extra))
            trim_log(metrics_path, step)
    # unstructured pruning: the zeros stay zero through fine-tuning (masks from the weights)
    masks = masks_of(model, (storage or {}).get("sparse", []))
    if step >= total:
        distributed.finish(world)
        return {"steps": step, "total": total, "note": "already finished"}

    # evaluation during training (rank 0): the EMA weights' pseudo-FID at chosen steps, with
    # images seen, training FLOPs (3 x the forward's 2 x MACs per image) and training seconds
    eval_at = set(cfg.eval_steps(total)) if world.main else set()
    evaluator, train_s = None, 0.0
    if eval_at:
        evaluator = Evaluator(diff_cfg, cfg.eval_n, cfg.dataset, device=device,
                              data_dir=data_dir)
        flops_per_image = 6 * count_macs(model, (1, model_cfg.in_channels,
                                                 model_cfg.image_size, model_cfg.image_size))
        if resume and metrics_path.exists():  # training seconds before this sitting
            times = [r["train_s"] for r in map(json.loads, metrics_path.read_text().splitlines())
                     if "train_s" in r]
            train_s = times[-1] if times else 0.0

    bar = None
    if progress and world.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"train {preset or ''}".strip())
    t_start = time.perf_counter()
    t_log, t_eval, seen_since_log = t_start, t_start, 0
    order, order_epoch = None, -1
    loss_val = float("nan")
    model.train()
    with open(metrics_path, "a") if world.main else contextlib.nullcontext() as log:
        while step < total:
            # data: batch `k` of this epoch's permutation
            epoch, k = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, cfg.seed, epoch), epoch
            idx = order[k * bs:(k + 1) * bs]
            x0 = to_model_range(images[idx]).to(device)
            y = labels[idx].to(device) if model_cfg.num_classes else None
            # every random draw of this step is a function of (seed, step): exact resume
            seed = step_seed(cfg.seed, step)
            torch.manual_seed(seed)  # anything drawing from the global RNG (dropout)
            gen = torch.Generator(device=device).manual_seed(seed)
            t_idx, noise = loss_fn.draw(x0.shape, device, gen)  # for the whole global batch
            if y is not None:
                y = drop_labels(y, cfg.label_dropout, model_cfg.num_classes, gen)
            sh = world.shard(len(x0))  # this rank's rows (all of them in a single process)

            # forward
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, total)
            with autocast_context(device, precision):
                loss = loss_fn(net, x0[sh], None if y is None else y[sh], i=t_idx[sh],
                               noise=noise[sh])
            loss_val = distributed.mean(loss, world).item()
            if not math.isfinite(loss_val):
                raise MinidiffError(
                    f"training diverged at step {step}: loss is {loss_val} (lr "
                    f"{opt.param_groups[0]['lr']:.2e}); lower --lr, the last good checkpoint "
                    f"in {out} is kept")

            # update
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            apply_masks(model, masks)

            # EMA (warm-up so early checkpoints are not dominated by the random init)
            ema_update(ema, model, cfg.ema_decay_at(step))
            step += 1
            seen_since_log += bs

            # log
            if world.main and (step % cfg.log_every == 0 or step == total):
                now = time.perf_counter()
                ips = seen_since_log / max(now - t_log, 1e-9)
                rec = {"step": step, "loss": round(loss_val, 6),
                       "lr": opt.param_groups[0]["lr"], "img_per_s": round(ips, 1),
                       "elapsed_s": round(now - t_start, 2)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                t_log, seen_since_log = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)

            # evaluate (the clock stops: evaluation is not training time)
            if step in eval_at:
                now = time.perf_counter()
                train_s += now - t_eval
                rec = {"step": step, "images_seen": step * bs,
                       "train_flops": step * bs * flops_per_image, "train_s": round(train_s, 2),
                       "eval": evaluator(ema)}
                if cfg.eval_raw:
                    rec["eval_raw"] = evaluator(model)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", fid=f"{rec['eval']['pseudo_fid']:.3f}")
                t_eval = t_log = time.perf_counter()

            # checkpoint
            if world.main and (step % cfg.checkpoint_every == 0 or step == total):
                save_state(out, model, ema, opt, step, keep=cfg.keep_checkpoints)
                save_model(out, ema, run_config(model_cfg, diff_cfg, cfg, step, **extra))
    if bar is not None:
        bar.close()
    distributed.finish(world)
    return {"steps": step, "total": total, "final_loss": loss_val,
            "seconds": time.perf_counter() - t_start, "precision": precision,
            "device": str(device), "steps_per_epoch": steps_per_epoch}
