"""The one optimisation loop that :mod:`~minidiff.train` and :mod:`~minidiff.distill` run.

:func:`fit` owns what every method shares: resume, the data order, per-step seeding, the
learning-rate schedule, EMA, the metrics log, checkpoints and the divergence error. A
:class:`Method` supplies what differs: its loss for a batch, the modules it trains and the config
written beside their weights. An entry point takes the run folder's lock (:func:`hold`) before
it reads the folder and keeps it until :func:`fit` returns.

Every source of randomness is a function of ``(seed, step)``: the data order of an epoch comes
from ``(seed, epoch)`` and each step's draws from a generator seeded with ``(seed, step)``. A run
resumed from a checkpoint therefore continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from . import distributed
from .checkpoint import CONFIG_FILE, clean_partial, load_state, save_model, save_state
from .data import epoch_order, load_split, to_model_range
from .distributed import World
from .errors import MinidiffError
from .files import atomic_write_text, run_lock
from .runtime import autocast_context
from .settings import DistillConfig, TrainConfig

METRICS_FILE = "metrics.jsonl"
T = TypeVar("T")


class Method:
    """What one way of training supplies to :func:`fit`; the hooks' defaults do nothing.

    A subclass sets ``cfg`` (seed, batch size, LR schedule, EMA, clipping, log and checkpoint
    cadence), ``model`` (whose parameters are clipped and averaged into ``ema``), ``opt`` (which
    :meth:`begin_round` may replace) and ``per_round``; ``trained`` is what a training state's
    ``model.`` tensors hold (default ``model``). A run is ``rounds`` rounds of ``per_round``
    steps; each round starts its LR schedule and EMA warm-up afresh.
    """

    name = "training"  # what diverged, in the error
    cfg: TrainConfig | DistillConfig
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    rounds: int = 1
    per_round: int
    eval_at: frozenset[int] | set[int] = frozenset()  # steps after which to call evaluate

    @property
    def trained(self) -> torch.nn.Module:
        return self.model

    def config_at(self, step: int) -> dict:
        """The config.json written beside the EMA weights after ``step`` steps."""
        raise NotImplementedError

    def loss(self, x0: torch.Tensor, y: torch.Tensor | None, generator,
             step: int) -> torch.Tensor:
        """The mean loss of a batch ``x0: [N x C x H x W]`` in [-1, 1] with labels ``y: [N]``
        (None: unconditional) at optimizer step ``step``; every random draw from
        ``generator``."""
        raise NotImplementedError

    def begin_round(self, r: int, fresh: bool) -> None:
        """Before round ``r``'s first step (``fresh``) or a resumed run's first step in it."""

    def after_update(self) -> None:
        """After each optimizer step, before the EMA update."""

    def end_round(self, r: int, step: int) -> None:
        """After round ``r``'s last step (rank 0), before the training state is saved."""

    def log_fields(self, r: int) -> dict:
        """Fields of each metrics line beside step, loss, lr and speed."""
        return {}

    def evaluate(self, step: int, images_seen: int, train_s: float) -> dict:
        """The metrics line of an evaluation after ``step`` (a step of ``eval_at``); its
        ``"eval"`` entry holds a ``pseudo_fid``. ``train_s``: training seconds so far."""
        raise NotImplementedError


@dataclass
class Run:
    """Where and on what a method trains: the run folder and its data (``images: [N x H x W]``
    uint8, ``labels: [N]`` or None for an unconditional model)."""

    out: Path
    images: torch.Tensor
    labels: torch.Tensor | None
    device: torch.device
    precision: str
    world: World = field(default_factory=World)
    resume: bool = False
    progress: bool = True
    desc: str = ""


# ---------------------------------------------------------------------------- the loop

def fit(method: Method, run: Run) -> dict:
    """Train ``method`` in ``run.out`` for ``rounds * per_round`` steps, from the newest good
    checkpoint when ``run.resume``; returns ``{"steps", "total", "final_loss", "seconds"}``."""
    cfg, world, device = method.cfg, run.world, run.device
    total = method.rounds * method.per_round
    step = _start(method, run)
    if step >= total:
        return {"steps": step, "total": total, "note": "already finished"}
    n = len(run.images)
    bs = min(cfg.batch_size, n)
    per_epoch = steps_per_epoch(n, bs)
    order, order_epoch, current, loss_val = None, -1, None, float("nan")
    method.model.train()
    with _Log(run, step, total, method.eval_at) as log:
        while step < total:
            r, k = divmod(step, method.per_round)
            if r != current:  # a round's set-up: a fresh start at its first step
                current = r
                method.begin_round(r, fresh=k == 0)

            # data: batch `b` of this epoch's permutation
            epoch, b = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, cfg.seed, epoch), epoch
            idx = order[b * bs:(b + 1) * bs]
            x0 = to_model_range(run.images[idx]).to(device)
            y = None if run.labels is None else run.labels[idx].to(device)
            # every random draw of this step is a function of (seed, step): exact resume
            seed = step_seed(cfg.seed, step)
            torch.manual_seed(seed)  # anything drawing from the global RNG (dropout)
            gen = torch.Generator(device=device).manual_seed(seed)

            # forward
            lr = lr_at(cfg, k, method.per_round)
            for group in method.opt.param_groups:
                group["lr"] = lr
            with autocast_context(device, run.precision):
                loss = method.loss(x0, y, gen, step)
            loss_val = distributed.mean(loss, world).item()
            if not math.isfinite(loss_val):
                raise MinidiffError(f"{method.name} diverged at step {step}: loss is {loss_val} "
                                    f"(lr {lr:.2e}); lower --lr, the last good checkpoint in "
                                    f"{run.out} is kept")

            # update
            _update(method, loss)

            # EMA (warmed up per round, so it is not dominated by the round's starting weights)
            ema_update(method.ema, method.model, cfg.ema_decay_at(k))
            step += 1
            round_done = step % method.per_round == 0

            # log
            log.seen(bs)
            if step % cfg.log_every == 0 or round_done:
                log.line({"step": step, **method.log_fields(r), "loss": round(loss_val, 6),
                          "lr": lr}, loss_val)

            # evaluate (the clock stops: evaluation is not training time)
            if step in method.eval_at:
                log.evaluation(method.evaluate(step, step * bs, log.train_seconds()), loss_val)

            # checkpoint (a finished round first: a later round may start from it)
            if world.main and round_done:
                method.end_round(r, step)
            if world.main and (step % cfg.checkpoint_every == 0 or round_done):
                save_state(run.out, method.trained, method.ema, method.opt, step,
                           keep=cfg.keep_checkpoints)
                save_model(run.out, method.ema, method.config_at(step))
    return {"steps": step, "total": total, "final_loss": loss_val, "seconds": log.seconds()}


def _update(method: Method, loss: torch.Tensor) -> None:
    """Backward, clip, optimizer step and the method's after-update hook."""
    method.opt.zero_grad(set_to_none=True)
    loss.backward()
    if method.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(method.model.parameters(), method.cfg.grad_clip)
    method.opt.step()
    method.after_update()


def seconds_per_step(method: Method, run: Run, steps: int = 20, warmup: int = 5) -> float:
    """The median seconds of one optimizer step of ``method`` on ``run``'s batch size and
    precision (forward, backward, update, EMA), after ``warmup`` untimed steps. It trains
    ``method`` on the data's first batch: probe a method built for the purpose."""
    bs = min(method.cfg.batch_size, len(run.images))
    x0 = to_model_range(run.images[:bs]).to(run.device)
    y = None if run.labels is None else run.labels[:bs].to(run.device)
    method.model.train()
    method.begin_round(0, fresh=True)
    times = []
    for k in range(warmup + steps):
        gen = torch.Generator(device=run.device).manual_seed(k)
        t0 = time.perf_counter()
        with autocast_context(run.device, run.precision):
            loss = method.loss(x0, y, gen, k)
        loss.item()  # as fit does: the step ends when its loss is known (a GPU's too)
        _update(method, loss)
        ema_update(method.ema, method.model, 0.9)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    # every rank must take the same number of steps: the ranks' mean
    return distributed.mean(torch.tensor(statistics.median(times)), run.world).item()


def budget_steps(seconds: float, per_step: float) -> int:
    """The optimizer steps that fit ``seconds`` at ``per_step`` seconds each, rounded down to
    two significant digits (3,247 -> 3,200) so that the count reads as chosen, not measured."""
    n = max(1, int(seconds / per_step))
    unit = 10 ** max(0, len(str(n)) - 2)
    return n // unit * unit


def _start(method: Method, run: Run) -> int:
    """Write a new run's first sampling pair, or restore a resumed run's newest good training
    state -> the step to continue from."""
    out, world = run.out, run.world
    distributed.barrier(world)  # every rank has checked `out` before rank 0 writes to it
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if run.resume:
            clean_partial(out)
        else:
            save_model(out, method.ema, method.config_at(0))
    distributed.barrier(world)
    if not run.resume:
        return 0
    step = load_state(out, method.trained, method.ema, method.opt,
                      warn=print if world.main else lambda _: None)["step"]
    if world.main:
        # the sampling pair may be newer than the restored state (or half-written): re-sync
        save_model(out, method.ema, method.config_at(step))
        trim_log(out / METRICS_FILE, step)
    return step


class _Log:
    """metrics.jsonl and the progress bar (rank 0 only) and the clocks of a sitting: wall time,
    speed since the last line, and training seconds (evaluations excluded, summed across
    resumes through the log's ``train_s``)."""

    def __init__(self, run: Run, step: int, total: int, eval_at):
        self.main, self.path = run.world.main, run.out / METRICS_FILE
        self.train_s = _last_train_s(self.path) if run.resume and eval_at else 0.0
        self.bar = None
        if run.progress and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                            desc=run.desc)
        self.t_start = self.t_log = self.t_eval = time.perf_counter()
        self.images = 0

    def __enter__(self):
        self.file = open(self.path, "a") if self.main else None
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()

    def seen(self, images: int) -> None:
        self.images += images
        if self.bar is not None:
            self.bar.update(1)

    def line(self, rec: dict, loss: float) -> None:
        """One metrics line, with the speed since the last one and the sitting's seconds."""
        if not self.main:
            return
        now = time.perf_counter()
        ips = self.images / max(now - self.t_log, 1e-9)
        self._write({**rec, "img_per_s": round(ips, 1), "elapsed_s": round(now - self.t_start, 2)})
        self.t_log, self.images = now, 0
        if self.bar is not None:
            extra = {k: v for k, v in rec.items() if k not in ("step", "loss", "lr")}
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", **extra)

    def train_seconds(self) -> float:
        """Training seconds so far, with the clock stopped until :meth:`evaluation`."""
        self.train_s += time.perf_counter() - self.t_eval
        return round(self.train_s, 2)

    def evaluation(self, rec: dict, loss: float) -> None:
        """Log an evaluation's line and restart the clocks after it."""
        self._write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", fid=f"{rec['eval']['pseudo_fid']:.3f}")
        self.t_eval = self.t_log = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t_start

    def _write(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()


def _last_train_s(path: Path) -> float:
    """The training seconds the log of a resumed run reached (0 without an evaluation)."""
    if not path.exists():
        return 0.0
    times = [r["train_s"] for _, r in _records(path) if "train_s" in r]
    return times[-1] if times else 0.0


# ------------------------------------------------------- for the methods' entry points

def hold(out: Path, world: World | None = None):
    """The run folder's lock (:func:`~minidiff.files.run_lock`) for a whole run, so a second
    writer is refused in one line; under torchrun only rank 0 writes, so only it holds one."""
    return run_lock(out) if world is None or world.main else contextlib.nullcontext(out)


def previous_run(out: Path, resume: bool, command: str, parse: Callable[[dict], T]) -> T | None:
    """``parse`` of the config.json of the run in ``out`` when ``resume`` (None otherwise);
    a new run refuses a folder that holds one."""
    if not resume:
        if (out / CONFIG_FILE).exists():
            raise MinidiffError(f"{out} already holds a run; pass --resume to continue it or "
                                "choose another --out")
        return None
    try:
        return parse(json.loads((out / CONFIG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MinidiffError(f"{out}: cannot resume ({e}); pass the --out of an earlier "
                            f"`minidiff {command}` run, or drop --resume") from None


def training_images(dataset: str, subset: int | None, image_size: int, data_dir=None):
    """The training split's ``(images [N x H x W] uint8, labels [N])``, the first ``subset``."""
    images, labels = load_split(dataset, "train", data_dir)
    if subset:
        images, labels = images[:subset], labels[:subset]
    if images.shape[1:] != (image_size, image_size):
        raise MinidiffError(f"{dataset} images are {tuple(images.shape[1:])}, the model "
                            f"expects {image_size}x{image_size}")
    return images, labels


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n`` images (a last partial batch is dropped)."""
    return max(1, n // min(batch_size, n))


# ------------------------------------------------------------------------- the pieces

def step_seed(seed: int, step: int) -> int:
    """The seed of every random draw of optimizer step ``step``: resuming replays them exactly."""
    return seed * 1_000_003 + step


def lr_at(cfg: TrainConfig | DistillConfig, step: int, total: int) -> float:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``lr_min_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * cos)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over parameters; buffers are copied."""
    pairs = list(zip(ema.parameters(), model.parameters(), strict=True))
    # one fused kernel per tensor group, not one per parameter (launch-bound on a GPU)
    torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - decay)
    for (_, e), (_, b) in zip(ema.named_buffers(), model.named_buffers(), strict=True):
        e.copy_(b)


def drop_labels(y: torch.Tensor, p: float, null: int, generator=None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each of ``y: [N]`` becomes the ``null`` class
    with probability ``p``, so one model learns both p(x | y) and p(x)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null), y)


def trim_log(path: Path, step: int) -> None:
    """Keep only the lines of a metrics.jsonl that a run restored at ``step`` has produced."""
    if path.exists():
        kept = [ln for ln, r in _records(path) if r["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _records(path: Path) -> list[tuple[str, dict]]:
    """The lines of a metrics.jsonl with their records; a line a crash cut short (the last)
    is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            continue
    return out
