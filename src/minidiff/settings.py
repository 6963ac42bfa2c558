"""What a user chooses, importable without torch (``minidiff --help`` reads only this).

The names each choice offers, and :class:`SamplingConfig`, whose field defaults are the
sampling defaults of every command (``sample``, ``eval --model``, ``study``, ``serve``,
``bench``) and of the notebook. The registries themselves live beside their code
(``samplers.SAMPLERS``, ``data.DATASETS``, ``unet.PRESETS``, ``study.PRESETS``);
tests/test_settings.py checks that the names here are theirs, in their order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import MinidiffError

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp", "dpmpp-sde")
DISTILL_METHODS = ("progressive", "consistency")
SPACINGS = ("uniform", "trailing", "quadratic")
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min-snr")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = ("mnist", "fashion-mnist")
MODEL_PRESETS = ("baseline", "reduced", "shallow")
STUDY_PRESETS = ("smoke", "quick", "standard", "paper", "long")


# sampling batch per precision, the fastest measured on 2 cores (benchmarks/results/
# cpu_choices*.md): bf16 256 (64 on par); fp32 128: 1.62x / 1.25x batch 256's images/s for
# reduced / baseline with AVX-512, 0.99x / 1.25x under the AVX2 imitation
BATCH_BY_PRECISION = {"bf16": 256, "fp32": 128}


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`MinidiffError` naming ``--flag``."""
    if value not in choices:
        raise MinidiffError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a model; written into every samples sidecar.

    ``steps`` None is all T of the model. ``eta`` is DDIM's noise scale (``ddim`` only; None is
    0). ``guidance`` is the classifier-free guidance scale used when labels are given (None: no
    guidance). ``precision`` ``auto`` becomes, per device, what runs natively there
    (:func:`minidiff.runtime.resolve_precision`); a sidecar records the resolved one.
    """

    # the fewest network evaluations whose pseudo-FID stays within 10% of DDPM-1000's on the
    # same checkpoint (benchmarks/results/default_sampler.md)
    sampler: str = "dpmpp-sde"
    steps: int | None = 8
    spacing: str = "trailing"
    eta: float | None = None
    # the guidance sweep's best trade-off (benchmarks/results/guidance_sweep.md)
    guidance: float | None = 1.5
    precision: str = "auto"
    # None: the fastest measured for the precision `auto` resolves to (BATCH_BY_PRECISION)
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise MinidiffError(f"unknown sampler {self.sampler!r}; choose one of: "
                                f"{', '.join(SAMPLER_NAMES)}")
        if self.steps is not None and self.steps < 1:
            raise MinidiffError(f"--steps must be >= 1, got {self.steps}")
        if self.spacing not in SPACINGS:
            raise MinidiffError(f"--spacing {self.spacing}: unknown spacing {self.spacing!r}; "
                                f"choose one of {SPACINGS}")
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        """From a dict holding these fields among others (a samples sidecar); a missing field
        takes its default."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
