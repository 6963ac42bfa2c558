"""What a user chooses, importable without torch (``minidiff --help`` reads only this).

The names each choice offers, and the configs of the commands: :class:`SamplingConfig`, whose
field defaults are the sampling defaults of every command (``sample``, ``eval --model``,
``study``, ``serve``, ``bench``) and of the notebook, :class:`TrainConfig` and
:class:`DistillConfig`. Each field a command takes as a flag carries that flag's help
(:func:`option`), so ``--help`` shows the default from the field itself. The registries live
beside their code (``data.DATASETS``, ``unet.PRESETS``); tests/test_settings.py checks that the
names here are theirs, in their order. The samplers register under :data:`SAMPLER_NAMES`; the
study's presets are ``minidiff.study.presets.PRESETS`` (torch-free too).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields

from .errors import DataError, MinidiffError

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp", "dpmpp-sde", "unipc")
DISTILL_METHODS = ("progressive", "consistency", "adversarial", "ect", "dmd")
ECT_STEPS = (1, 2, 4)  # the step counts an ECT student is sampled at
SPACINGS = ("uniform", "trailing", "quadratic", "karras", "logsnr")
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min-snr", "edm")
NOISE_LEVELS = ("uniform", "lognormal")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = ("mnist", "fashion-mnist")
MODEL_PRESETS = ("baseline", "reduced", "shallow")


# sampling batch per precision: the fastest on 2 cores of either CPU class
# (benchmarks/results/cpu_choices*.md)
BATCH_BY_PRECISION = {"bf16": 256, "fp32": 128}


def option(default, help: str = "", **flag):
    """A dataclass field that a command takes as ``--name`` (:func:`minidiff.cli.common.options`):
    its ``help``, and argparse's ``choices`` / ``metavar`` or a ``type`` other than the one its
    annotation implies (``nonneg_int``, ``number``: any float, ``steps``) in ``flag``."""
    return field(default=default, metadata={"help": help, **flag})


# flags that several configs take with one meaning
PRECISION_FLAG = dict(choices=PRECISIONS, help="auto: bf16 where the CPU/GPU runs it "
                      "natively, else fp32")
SEED_FLAG = dict(type="nonneg_int", help="seed of every random draw")


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`MinidiffError` naming ``--flag``."""
    if value not in choices:
        raise MinidiffError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed ``(ok, message)`` check."""
    for ok, msg in checks:
        if not ok:
            raise MinidiffError(msg)


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a model; written into every samples sidecar.

    ``steps`` None is all T of the model. ``eta`` is DDIM's noise scale (``ddim`` only; None is
    0). ``guidance`` is the classifier-free guidance scale used when labels are given (None: no
    guidance). ``precision`` ``auto`` becomes, per device, what runs natively there
    (:func:`minidiff.runtime.resolve_precision`); a sidecar records the resolved one.
    """

    # the fewest network evaluations whose pseudo-FID stays within 10% of DDPM-1000's on the
    # same checkpoint (shipped `reduced`, 3 seeds x 1,000: 8 karras steps at rho 2 -39%, 6 +71%;
    # results/default_sampler-reduced.md); at 10,000 samples 8 of them score 0.174 against 0.253
    # for the 20 trailing steps that were the default before (docs/sampling.md)
    sampler: str = option("dpmpp-sde", "docs/sampling.md compares them; a distilled student "
                          "takes its own", choices=SAMPLER_NAMES)
    steps: int | None = option(8, "network evaluations; the original DDPM takes 1000")
    spacing: str = option("karras", "the timesteps --steps keeps", choices=SPACINGS)
    # Karras et al. 2022 use 7; on these pixel-space models a lower rho, more steps at high
    # noise, is better (benchmarks/karras_rho.py, docs/sampling.md)
    rho: float = option(2.0, "with --spacing karras: sigma^(1/rho) evenly spaced; Karras et "
                        "al. use 7", type="number")
    eta: float | None = option(None, "DDIM's noise scale, 0..1 (default 0)", type="number")
    # the guidance sweep's best trade-off (benchmarks/results/guidance_sweep.md)
    guidance: float | None = option(1.5, "with --class: classifier-free guidance scale, 0 "
                                    "unconditional", type="number")
    precision: str = option("auto", **PRECISION_FLAG)
    # None: the fastest measured for the precision `auto` resolves to (BATCH_BY_PRECISION)
    batch_size: int | None = option(None, "default: " + ", ".join(
        f"{b} {p}" for p, b in BATCH_BY_PRECISION.items()))
    seed: int = option(0, **SEED_FLAG)
    # the fields a command line gave (from_flags); not a setting: left out of to_dict and ==
    chosen: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise MinidiffError(f"unknown sampler {self.sampler!r}; choose one of: "
                                f"{', '.join(SAMPLER_NAMES)}")
        if self.steps is not None and self.steps < 1:
            raise MinidiffError(f"--steps must be >= 1, got {self.steps}")
        if self.spacing not in SPACINGS:
            raise MinidiffError(f"--spacing {self.spacing}: unknown spacing {self.spacing!r}; "
                                f"choose one of {SPACINGS}")
        if not self.rho > 0:
            raise MinidiffError(f"--rho must be > 0, got {self.rho}")
        if self.spacing != "karras" and self.given("rho"):
            raise MinidiffError("--rho applies to --spacing karras only")
        if self.eta is not None and self.sampler != "ddim":
            raise MinidiffError("--eta applies to --sampler ddim only")
        if self.eta is not None and self.eta < 0:
            raise MinidiffError(f"--eta must be >= 0, got {self.eta}")
        if self.guidance is not None and self.guidance < 0:
            raise MinidiffError(f"--guidance must be >= 0, got {self.guidance}")
        check_choice("precision", self.precision, PRECISIONS)
        if self.batch_size is not None and self.batch_size < 1:
            raise MinidiffError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise MinidiffError(f"--seed must be >= 0, got {self.seed}")

    @classmethod
    def from_flags(cls, **flags) -> SamplingConfig:
        """From a command's flags, None meaning not given; the config records which were given
        (:meth:`given`): ``--steps 8`` is a choice even though 8 is the default."""
        given = {k: v for k, v in flags.items() if v is not None}
        return cls(**given, chosen=frozenset(given))

    def given(self, name: str) -> bool:
        """Whether field ``name`` was chosen: one of ``chosen`` (:meth:`from_flags`) or, in a
        config built without it, set to other than its default."""
        if self.chosen is not None:
            return name in self.chosen
        return getattr(self, name) != getattr(type(self), name)  # the class holds the defaults

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "chosen"}

    @classmethod
    def from_dict(cls, d: dict) -> SamplingConfig:
        """From a dict holding these fields among others (a samples sidecar); a missing field
        takes its default."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "chosen"})


# How a model is scored while it trains (`train --eval-every`, the study's curves) and how the
# study samples: 8 trailing steps of SDE-DPM-Solver++, the setting of the committed curves and
# study results, so new ones compare with them
EVAL_SAMPLING = SamplingConfig(steps=8, spacing="trailing")
EVAL_N = 2000  # samples per evaluation during training
# the demo's training time: with set-up (~1.5 min), sampling and evaluation, `make demo` stays
# within 12 minutes on 2 cores of any CPU, which trains as many steps as it can in this time. A
# short probe can catch a busy host in a quick moment: on an AVX2-only Zen 3 the steps it fixed
# trained 12-13% over their budget in two demos of three, so it keeps a fifth of headroom
# (docs/training.md)
DEMO_MINUTES = 8.5


@dataclass(frozen=True)
class TrainConfig:
    """How to train (:func:`minidiff.train.train`); serialised into every run folder's
    config.json."""

    dataset: str = option("mnist", choices=DATASET_NAMES)
    # exactly one of epochs / steps (None/None -> 10 epochs), or minutes: a probe of this
    # machine's speed fixes steps before the run, and config.json records them
    epochs: float | None = option(None, "passes over the data (default 10)")
    steps: int | None = option(None, "optimizer steps (or --epochs, or --minutes)")
    minutes: float | None = option(None, "train for about M minutes of this machine: a short "
                                   "probe fixes --steps, recorded in config.json; --steps "
                                   "overrides", type="number", metavar="M")
    # the recipe: the convergence benchmark's winner (benchmarks/results/convergence.md; with
    # v-prediction, DiffusionConfig's default); minidiff.study.reference.TRAINING is the older one
    batch_size: int = option(64, "images per step")
    lr: float = option(2e-3, "peak learning rate; --recipe and --original-recipe bring theirs")
    lr_schedule: str = "cosine"  # "cosine" (to lr_min_ratio * lr) or "constant" after warm-up
    lr_min_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the EMA's final (largest) decay
    # EMA warm-up: None is (1 + step) / (10 + step); a number p is the power law
    # 1 - (1 + step)^-p of ema-pytorch / diffusers' EMAModel (2/3 or 3/4); capped at ema_decay
    ema_power: float | None = option(None, "EMA power-law warm-up, e.g. 0.75")
    loss_weighting: str = option("none", "min-snr: Hang et al. 2023, gamma 5; edm: Karras et "
                                 "al. 2022, sigma_data 0.5", choices=LOSS_WEIGHTINGS)
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.5  # the data's standard deviation in EDM's weighting
    # which noise levels a step trains on: every timestep alike, or log sigma ~ N(mean, std)
    # (EDM's P_mean / P_std), sigma = sqrt((1 - alpha_bar) / alpha_bar)
    noise_levels: str = option("uniform", "lognormal: EDM's log-normal noise levels, "
                               "N(-1.2, 1.2) in log sigma", choices=NOISE_LEVELS)
    level_mean: float = -1.2
    level_std: float = 1.2
    # EDM2's power-function EMA (Karras et al. 2024) of relative width S, which replaces
    # ema_decay and its warm-up: the average weighs step t of the run so far by t^gamma
    ema_std: float | None = option(None, "EDM2's power-function EMA of relative width S, e.g. "
                                   "0.1, instead of the EMA's fixed decay", type="number",
                                   metavar="S")
    seed: int = option(0, **SEED_FLAG)
    precision: str = option("auto", **PRECISION_FLAG)
    device: str = option("auto", choices=DEVICES)
    log_every: int = 50
    checkpoint_every: int = option(500, "save every N steps", metavar="N")
    keep_checkpoints: int = option(3, "keep the newest K training states on disk", metavar="K")
    subset: int | None = option(None, "train on the first N images only: tests, quick looks",
                                metavar="N")
    label_dropout: float = option(0.1, "with --conditional: share of labels replaced by no "
                                  "label", type="number")
    init: str | None = option(None, "fine-tune this checkpoint (its EMA weights), keeping its "
                              "layout and zeros", metavar="CKPT")
    eval_every: int | tuple[int, ...] | None = option(
        None, "pseudo-FID of the EMA weights every N steps or at these steps (and at the end), "
        "into metrics.jsonl", type="steps", metavar="N|S1,S2")
    eval_n: int = option(EVAL_N, "samples per evaluation: pseudo-FID, 8 steps of the default "
                         "sampler, seed 0")
    eval_raw: bool = False  # also evaluate the raw (non-EMA) weights, as a control

    def __post_init__(self):
        _raise_first([
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.steps is None or self.steps > 0, f"--steps must be > 0, got {self.steps}"),
            (self.epochs is None or self.steps is None, "give --epochs or --steps, not both"),
            (self.minutes is None or self.minutes > 0, f"--minutes must be > 0, got "
             f"{self.minutes}"),
            (self.minutes is None or self.epochs is None, "give --epochs or --minutes, not "
             "both"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lr_schedule in ("cosine", "constant"),
             f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.precision in PRECISIONS,
             f"--precision must be {_one_of(PRECISIONS)}, got {self.precision!r}"),
            (self.device in DEVICES, f"--device must be {_one_of(DEVICES)}, got {self.device!r}"),
            (self.log_every > 0, "log_every must be > 0"),
            (self.checkpoint_every > 0, f"--checkpoint-every must be > 0, got "
             f"{self.checkpoint_every}"),
            (self.subset is None or self.subset > 0, "subset must be > 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (0 <= self.label_dropout < 1,
             f"--label-dropout must be in [0, 1), got {self.label_dropout}"),
            (self.ema_power is None or self.ema_power > 0,
             f"--ema-power must be > 0, got {self.ema_power}"),
            (self.loss_weighting in LOSS_WEIGHTINGS,
             f"--loss-weighting must be {_one_of(LOSS_WEIGHTINGS)}, got "
             f"{self.loss_weighting!r}"),
            (self.min_snr_gamma > 0, f"--min-snr-gamma must be > 0, got {self.min_snr_gamma}"),
            (self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}"),
            (self.noise_levels in NOISE_LEVELS,
             f"--noise-levels must be {_one_of(NOISE_LEVELS)}, got {self.noise_levels!r}"),
            (self.level_std > 0, f"level_std must be > 0, got {self.level_std}"),
            (self.ema_std is None or 0 < self.ema_std < 0.28, "--ema-std must be in (0, 0.28), "
             f"got {self.ema_std}"),
            (all(k > 0 for k in self.eval_steps(1)), "--eval-every must be > 0 (a step count "
             "or a list of steps)"),
            (self.eval_n >= 10, f"--eval-n must be >= 10, got {self.eval_n}"),
        ])
        if self.dataset not in DATASET_NAMES:  # as minidiff.data.get_spec words it
            raise DataError(f"unknown dataset {self.dataset!r}; choose one of: "
                            f"{', '.join(DATASET_NAMES)}")

    def eval_steps(self, total: int) -> list[int]:
        """The steps after which the model is evaluated (none without ``eval_every``)."""
        e = self.eval_every
        if e is None:
            return []
        if isinstance(e, int):
            return sorted({*range(e, total + 1, e), total}) if e > 0 else [e]
        return sorted({*(k for k in e if k <= total), total})

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay applied after optimizer step ``step`` (0-based)."""
        return ema_decay_at(step, self.ema_decay, self.ema_power, self.ema_std)

    def to_dict(self) -> dict:
        # the fields added after the committed study leave config.json while at their
        # defaults, so its stage names (hashes of this dict) match the runs written without them
        d = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if isinstance(d.get("eval_every"), list):
            d = {**d, "eval_every": tuple(d["eval_every"])}
        return cls(**d)


_LATER_FIELDS = ("minutes", "sigma_data", "noise_levels", "level_mean", "level_std", "ema_std")


def ema_decay_at(step: int, decay: float, power: float | None = None,
                 std: float | None = None) -> float:
    """The EMA decay after optimizer step ``step`` (0-based): the warm-up ``(1 + step) / (10 +
    step)`` (``power`` None) or ``1 - (1 + step)^-power``, capped at ``decay``; or, with
    ``std``, EDM2's power function ``(1 - 1 / t)^(gamma + 1)`` after ``t = step + 1`` steps,
    which makes the average weigh step ``tau`` by about ``tau^gamma`` (Karras et al. 2024,
    eq. 2)."""
    if std is not None:
        return (1 - 1 / (step + 1)) ** (power_ema_exponent(std) + 1)
    warm = (1 + step) / (10 + step) if power is None else 1 - (1 + step) ** -power
    return min(decay, warm)


@functools.lru_cache
def power_ema_exponent(std: float) -> float:
    """EDM2's exponent ``gamma`` of the power-function EMA of relative width ``std``: the root
    of ``std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))`` (Karras et al. 2024, eq. 3), which
    falls as gamma grows; ``std`` 0.05 and 0.10 give EDM2's 16.97 and 6.94."""
    lo, hi = -1.0, 1e6
    for _ in range(200):  # bisection: the width falls from 0.289 at gamma -1 towards 0
        mid = (lo + hi) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > std * std:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class DistillConfig:
    """How a student is distilled (:func:`minidiff.distill.distill`); serialised into its
    config.json under ``"distill"``."""

    method: str = option("progressive", "docs/distillation.md compares them",
                         choices=DISTILL_METHODS)
    steps: int = option(2, "the student's network evaluations per image")
    # progressive: the first teacher's DDIM steps, halved round by round down to `steps`;
    # consistency: the noise levels of the teacher's DDIM solver grid
    teacher_steps: int = option(64, "progressive: the teacher's DDIM steps, halved each round; "
                                "consistency: its solver grid")
    # adversarial: the student's first weights (default: the teacher's), e.g. a progressive
    # student to refine, and the weight of the pull towards their output beside the GAN loss
    # (docs/distillation.md compares weights)
    init: str | None = option(None, "adversarial, dmd: start the student from this checkpoint "
                              "(same U-Net) instead of the teacher", metavar="CKPT")
    distill_weight: float = option(0.1, "adversarial, dmd: weight of the distance to the starting "
                                   "network's x0 beside the GAN or distribution-matching loss",
                                   type="number")
    # dmd: the fake score learns the student's outputs at every update, the student moves at
    # every `fake_updates`-th (DMD2's two time-scale rule: 5 on ImageNet; 2 and 5 measure alike
    # here, docs/distillation.md)
    fake_updates: int = option(2, "dmd: fake-score updates per student update")
    # dmd: train on the student's own DDIM path from pure noise, back-propagated through every
    # step (DMD2's backward simulation), instead of real images noised to its grid's levels
    simulate: bool = option(False, "dmd: train on the student's own sampling path from noise "
                            "instead of real images noised to its levels")
    # dmd: DMD's regression pairs: the student's path from N fixed noises is pulled towards
    # the teacher's own deterministic samples from them instead of its start's x0
    # (docs/distillation.md measures it; 0: the start's)
    pairs: int = option(0, "dmd: pull the student's path from N fixed noises towards the "
                        "teacher's deterministic samples from them (0: towards its start's x0)",
                        metavar="N")
    # dmd: the share of each batch drawn from the pairs; the rest is fresh noise that meets
    # distribution matching only (DMD's split; 1: every row from the pairs, docs/distillation.md)
    pair_fraction: float = option(1.0, "dmd with --pairs: share of each batch drawn from the "
                                  "pairs; the rest starts from fresh noise", type="number",
                                  metavar="F")
    # dmd: DMD2's GAN term beside it, a head on the fake score's bottleneck judging noised
    # images real or the student's (0: none; docs/distillation.md measures it)
    gan_weight: float = option(0.0, "dmd: weight of a GAN term beside distribution matching "
                               "(DMD2); 0 for none", type="number")
    # ect: the stages of its schedule, each halving the gap between the two noise levels it
    # compares (ECT's CIFAR-10 run has 8)
    stages: int = option(4, "ect: times the gap between its two noise levels halves")
    dropout: float = option(0.0, "the student's dropout while it trains (ECT: 0.2 on "
                            "CIFAR-10)", type="number")
    # optimizer steps in all (progressive: split evenly over its rounds; docs/distillation.md
    # has what more updates per round buy)
    updates: int = option(10000, "optimizer steps in all")
    batch_size: int = option(64, "images per step")
    # the student starts from trained weights: ~1/10 of training's
    lr: float = option(2e-4, "peak learning rate of each round")
    lr_schedule: str = "cosine"  # per round: warm-up, then cosine to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    warmup_steps: int = 20  # per round (each round starts a fresh optimizer)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_power: float = 0.75  # EMA warm-up 1 - (1 + k)^-p per round: rounds are short
    # a conditional teacher's guidance, distilled into the student
    guidance: float = SamplingConfig.guidance
    label_dropout: float = 0.1  # conditional: rows that learn the teacher's unguided output
    seed: int = option(0, **SEED_FLAG)
    precision: str = option("auto", **PRECISION_FLAG)
    device: str = option("auto", choices=DEVICES)
    log_every: int = 50
    checkpoint_every: int = option(500, "save every N steps", metavar="N")
    keep_checkpoints: int = 3
    subset: int | None = option(None, "distil on the first N images only, for tests", metavar="N")

    def __post_init__(self):
        _raise_first([
            (self.method in DISTILL_METHODS, f"--method must be one of "
             f"{', '.join(DISTILL_METHODS)}, got {self.method!r}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.teacher_steps >= 2, f"--teacher-steps must be >= 2, got {self.teacher_steps}"),
            (self.updates >= 1, f"--updates must be >= 1, got {self.updates}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be cosine or constant"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
            (0 <= self.label_dropout < 1, "label_dropout must be in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.device in DEVICES, f"--device must be one of {DEVICES}"),
            (min(self.log_every, self.checkpoint_every, self.keep_checkpoints) >= 1,
             "log_every, checkpoint_every and keep_checkpoints must be >= 1"),
            (self.subset is None or self.subset >= 1, "subset must be >= 1"),
            (self.distill_weight >= 0, f"--distill-weight must be >= 0, got "
             f"{self.distill_weight}"),
            (self.init is None or self.method in ("adversarial", "dmd"), "--init is for "
             "--method adversarial or dmd (the other methods start from the teacher)"),
            (self.fake_updates >= 1, f"--fake-updates must be >= 1, got {self.fake_updates}"),
            (self.gan_weight >= 0, f"--gan-weight must be >= 0, got {self.gan_weight}"),
            (self.pairs >= 0, f"--pairs must be >= 0, got {self.pairs}"),
            (not self.pairs or self.method == "dmd", "--pairs is for --method dmd"),
            (0 < self.pair_fraction <= 1, f"--pair-fraction must be in (0, 1], got "
             f"{self.pair_fraction}"),
            (self.pair_fraction == 1 or self.pairs, "--pair-fraction is for --pairs"),
            (self.stages >= 1, f"--stages must be >= 1, got {self.stages}"),
            (self.method != "ect" or self.steps in ECT_STEPS, f"--method ect samples in "
             f"{', '.join(map(str, ECT_STEPS))} steps, got --steps {self.steps}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
        ])
        ratio = self.teacher_steps / self.steps
        if self.method == "progressive" and (ratio < 2 or 2 ** round(math.log2(ratio)) != ratio):
            raise MinidiffError(f"progressive distillation halves the steps: --teacher-steps "
                                f"({self.teacher_steps}) must be --steps ({self.steps}) times "
                                "a power of two >= 2, e.g. --teacher-steps "
                                f"{self.steps * 2 ** max(1, math.ceil(math.log2(max(ratio, 1))))}")
        if self.method == "consistency" and self.teacher_steps % self.steps:
            raise MinidiffError(f"--steps {self.steps} must divide --teacher-steps "
                                f"{self.teacher_steps} (the student samples on the teacher's "
                                "grid), e.g. --steps 1, 2 or 4")

    def rounds(self) -> list[int]:
        """The student's step count in each round: ``[32, 16, 8, 4, 2]`` for progressive
        64 -> 2, ``[steps]`` for the other methods (one round)."""
        if self.method != "progressive":
            return [self.steps]
        n = round(math.log2(self.teacher_steps / self.steps))
        return [self.teacher_steps >> k for k in range(1, n + 1)]

    def stage_at(self, step: int) -> int:
        """ECT's stage after ``step`` of :attr:`updates` optimizer steps: ``stages`` equal
        parts."""
        return min(self.stages - 1, step * self.stages // self.updates)

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay applied after step ``step`` (0-based) of a round."""
        return ema_decay_at(step, self.ema_decay, self.ema_power)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        return cls(**d)
