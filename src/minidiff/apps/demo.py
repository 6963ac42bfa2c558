"""``minidiff demo``: train the reduced U-Net briefly on MNIST, sample a grid, write a report.

The demo's U-Net is class-conditional (10% of labels dropped in training) and draws ten of each
digit with classifier-free guidance: at the same CPU seconds that scores a pseudo-FID several times
lower than an unconditional model's, and the grid shows one digit per row (docs/training.md).

The demo trains for a time, not a step count: a short probe of this machine's training speed
turns ``--minutes`` into steps before the run (:func:`minidiff.train.train`), and config.json and
the report record them, so ``--steps N`` with the recorded count repeats the run bit for bit and
a resumed run keeps its count. ``make demo`` then takes about 12 minutes on 2 cores of any CPU,
and a faster CPU trains a better model in that time.

The run holds its folder's lock (:func:`minidiff.files.run_lock`) throughout, so a second demo
on the same folder stops at once; ``--force`` starts over by removing only the demo's own files
(:data:`DEMO_FILES`), and without it the demo never writes over a file of those names that is
not part of a demo run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoint import CHECKPOINTS, CONFIG_FILE, MODEL_FILE
from ..diffusion import DiffusionConfig
from ..errors import MinidiffError
from ..files import atomic_write_text, run_lock
from ..generation import sample_to_file
from ..metrics import MIN_SAMPLES, evaluate
from ..runtime import environment_line, resolve_device, resolve_precision, timed
from ..samplefiles import read_samples
from ..settings import DEMO_MINUTES, SamplingConfig, TrainConfig
from ..train import train
from ..unet import PRESETS, UNet, count_params

DEMO_PRESET = "reduced"
DEMO_UNET = replace(PRESETS[DEMO_PRESET], num_classes=10)  # class-conditional, guided
DEMO_TRAIN = TrainConfig(checkpoint_every=250)  # the default recipe, for DEMO_MINUTES
DEMO_SAMPLING = SamplingConfig()  # the sampling defaults
# what a demo run writes into its folder: all that --force removes
DEMO_FILES = (CONFIG_FILE, MODEL_FILE, CHECKPOINTS, "metrics.jsonl", "metrics.json",
              "samples.npz", "samples.json", "grid.png", "report.md")


def run_demo(out: str | Path = "runs/demo", *, steps: int | None = None,
             minutes: float = DEMO_MINUTES, n: int = 100, data_dir=None,
             force: bool = False) -> Path:
    """Train (or resume, or reuse) the demo run in ``out`` for ``minutes`` of this machine (or
    exactly ``steps``); write samples, grid and report."""
    out = Path(out)
    if n < MIN_SAMPLES or n % DEMO_UNET.num_classes:
        raise MinidiffError(f"--n must be a multiple of {DEMO_UNET.num_classes} and >= "
                            f"{MIN_SAMPLES}: the demo draws as many of each digit and evaluates "
                            "them")
    precision = resolve_precision(DEMO_TRAIN.precision, resolve_device(DEMO_TRAIN.device))
    cfg = replace(DEMO_TRAIN, steps=steps) if steps else replace(DEMO_TRAIN, minutes=minutes)
    with run_lock(out):
        return _run_demo(out, cfg, precision, n=n, data_dir=data_dir, force=force)


def _run_demo(out: Path, cfg: TrainConfig, precision: str, *, n: int, data_dir,
              force: bool) -> Path:
    if force:
        _remove_demo_files(out)
    resume = (out / CONFIG_FILE).exists()
    if resume:
        run_config = json.loads((out / CONFIG_FILE).read_text())
        saved = run_config.get("train", {})
        # a budgeted run continues with the steps its probe fixed
        if run_config.get("model") != DEMO_UNET.to_dict() or (
                saved != cfg.to_dict() and saved != {**cfg.to_dict(), "steps": saved.get("steps")}):
            raise MinidiffError(f"{out} holds a demo run of another recipe or length "
                                f"({saved.get('steps')} steps); pass --force to start over or "
                                "another --out")
    else:
        taken = [name for name in DEMO_FILES if (out / name).exists()]
        if taken:
            raise MinidiffError(f"{out} holds {', '.join(taken)} but no demo run; pass --force "
                                "to replace them or choose another --out")

    timings = {}  # each step's wall time, one call each
    timings["train"], _, summary = timed(lambda: train(
        DEMO_UNET, DiffusionConfig(), cfg, out, data_dir=data_dir, resume=resume,
        preset=DEMO_PRESET))
    timings["sample"], _, meta = timed(lambda: sample_to_file(
        out, out / "samples.npz", DEMO_SAMPLING, n=n, classes="all", grid=str(out / "grid.png")))
    images, labels, _ = read_samples(out / "samples.npz")
    timings["eval"], _, metrics = timed(lambda: evaluate(images, "mnist", "test", data_dir,
                                                         labels=labels))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(
        f"| `{k}` | {metrics[k]:.4f} | {metrics['floor'][k]:.4f} |"
        for k in ("pseudo_fid", "kid", "precision", "recall", "ssim", "class_max_dev",
                  "confidence", "memorization"))
    params = count_params(UNet(DEMO_UNET))
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    loss_line = f"{last[-1]['loss']:.4f} at step {last[-1]['step']}" if last else "n/a"
    run_config = json.loads((out / CONFIG_FILE).read_text())
    budget, cfg = run_config.get("budget"), TrainConfig.from_dict(run_config["train"])
    steps_note = (f"The step count comes from a {budget['minutes']:g}-minute budget and a "
                  f"probe of this machine ({budget['probe_s_per_step'] * 1000:.0f} ms per step"
                  f"); `minidiff demo --steps {budget['steps']} --out OTHER` repeats this run."
                  if budget else "")
    if precision != "bf16":
        steps_note += (" This CPU has no native bf16, so the demo trains in fp32, about a "
                       "third as many steps as a CPU with bf16 in the same time.")
    resumed = summary.get("note") or ("resumed from a checkpoint" if resume else "fresh run")
    report = f"""# minidiff demo

Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
Machine: {environment_line()}
Command: `minidiff demo` ({resumed})

| step | what | time |
|---|---|---|
| train | `{DEMO_PRESET}` U-Net ({params:,} parameters), class-conditional, {cfg.steps} steps \
of batch {cfg.batch_size} on MNIST, AdamW lr {cfg.lr}, {precision} | \
{timings['train']:.0f} s |
| sample | {n} images, {n // DEMO_UNET.num_classes} of each digit, {meta['sampler']}, \
{meta['steps']} steps ({meta['spacing']}), guidance {meta['guidance']}, seed {meta['seed']}, \
{meta['precision']} | {timings['sample']:.0f} s |
| eval | metrics of the {n} samples and of {n} real training images (the floor) | \
{timings['eval']:.0f} s |

Final training loss (one batch): {loss_line}. {steps_note}

The classifier reads {metrics['conditional_accuracy']:.1%} of the samples as the digit they were
drawn for.

Quality against the MNIST test split (definitions in docs/metrics.md of the minidiff
repository; with only {n} samples FID and KID are biased upwards, which is why the floor, the same
metric for {n} *real* images, stands beside each figure):

| metric | samples | real-data floor |
|---|---|---|
{rows}

Files: `config.json` + `model.safetensors` (EMA weights), `checkpoints/` (to resume),
`metrics.jsonl` (loss per 50 steps), `metrics.json` (the table above), `samples.npz`
(uint8 images [N x 28 x 28]) with `samples.json`, and `grid.png`:

![samples](grid.png)

Sample again with `minidiff sample {out} --class all --n 100 --out more.npz --grid more.png`
(or `--class 7` for sevens only).
"""
    atomic_write_text(out / "report.md", report)
    return out / "report.md"


def _remove_demo_files(out: Path) -> None:
    """What a demo run wrote into ``out`` (and nothing else there: not the lock it holds)."""
    for name in DEMO_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
