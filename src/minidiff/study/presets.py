"""The study's presets: how long each architecture trains, how every model is sampled and
scored. Torch-free, so ``minidiff study --help`` offers them without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..settings import EVAL_N, EVAL_SAMPLING, SamplingConfig
from .reference import EPOCHS


@dataclass(frozen=True)
class StudyConfig:
    """One preset of the study. Fine-tuning follows the study's recipes
    (:data:`minidiff.study.reference.RECIPES`), their epochs scaled by the architecture's
    from-scratch epochs / :data:`~minidiff.study.reference.EPOCHS`."""

    preset: str
    # the baseline's from-scratch epochs; reduced and shallow train as long (equal epochs) or
    # its FLOPs (equal_compute)
    base_epochs: float
    dataset: str = "mnist"
    # the training recipe before the convergence benchmark (minidiff.study.reference.TRAINING),
    # which the committed study results and shipped models come from; the defaults where False
    original_recipe: bool = True
    batch_size: int | None = None  # None: the recipe's
    lr: float | None = None  # from scratch; None: the recipe's
    subset: int | None = None
    structured: float = 0.1
    unstructured: float = 0.3
    n: int = 1000  # samples per model for the metrics (and the timing)
    # how every model is sampled (8 steps, the default when the committed results were made),
    # so a re-run reproduces them
    sampling: SamplingConfig = EVAL_SAMPLING
    seed: int = 0  # training and metrics
    checkpoint_every: int = 500
    # equal compute: reduced and shallow train the baseline's FLOPs (epochs x MACs ratio) instead
    # of its epochs; fine-tuning then scales with each architecture's own epochs
    equal_compute: bool = False
    # evaluation during training: this many log-spaced points per from-scratch stage (halving
    # back from the end), at most 3 per fine-tuning stage; pseudo-FID of eval_n samples
    eval_points: int = 0
    eval_n: int = EVAL_N

    def epochs_of(self, arch: str, macs: Callable[[str], int]) -> float:
        """From-scratch epochs of ``arch`` (``baseline``, ``reduced`` or ``shallow``); ``macs``
        gives an architecture's MACs per image (equal compute scales by their ratio)."""
        if not self.equal_compute or arch == "baseline":
            return self.base_epochs
        return round(self.base_epochs * macs("baseline") / macs(arch), 4)

    def finetune_epochs(self, recipe_epochs: float, macs: Callable[[str], int],
                        arch: str = "baseline") -> float:
        return recipe_epochs * self.epochs_of(arch, macs) / EPOCHS


PRESETS: dict[str, StudyConfig] = {
    # about a minute: a few steps on 256 images (tests, CI)
    "smoke": StudyConfig("smoke", base_epochs=1.0, batch_size=32, subset=256, n=64,
                         sampling=SamplingConfig(steps=2), checkpoint_every=50,
                         original_recipe=False, equal_compute=True, eval_points=3, eval_n=16),
    # `long` at a tenth of its budget (34 min on a 2-core Xeon with native bf16)
    "quick": StudyConfig("quick", base_epochs=1.0, n=1000, original_recipe=False,
                         equal_compute=True, eval_points=6, eval_n=1000),
    # ~90 min on a 2-core CPU (resumable); 10,000 samples per model
    "standard": StudyConfig("standard", base_epochs=3.0, n=10_000),
    # the study's epochs (50 / 20 / 10 / 20): meant for a GPU
    "paper": StudyConfig("paper", base_epochs=50.0, n=10_000, checkpoint_every=2000),
    # today's recipe at equal training compute, with quality-vs-compute curves: the baseline's
    # 10 epochs, every architecture its FLOPs (~4.5 h on a 2-core CPU with native bf16,
    # estimated; resumable)
    "long": StudyConfig("long", base_epochs=10.0, n=10_000, original_recipe=False,
                        equal_compute=True, eval_points=8, checkpoint_every=1000),
}
