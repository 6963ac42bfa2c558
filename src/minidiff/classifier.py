"""The feature network behind every quality metric: a small CNN classifier, shipped with its card.

Weights live in ``minidiff/assets/classifier-<dataset>.safetensors`` beside a JSON card with the
recipe, seed, epochs, test accuracy and the weights' SHA-256, which is checked on every load.
``minidiff classifier train`` rebuilds them from the recipe.

Layout (~140K parameters): four 3x3 conv blocks (32, 32 | 64, 64 channels, BatchNorm + ReLU,
max-pool after each pair), one 3x3 conv to 128 channels at 7x7, global average pooling -> the
**128-wide penultimate feature** used by Pseudo-FID, KID and precision/recall, then a linear
layer to 10 logits.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F

from .data import epoch_order, load_split
from .errors import MinidiffError
from .files import ASSETS, atomic_write_bytes, atomic_write_text

FEATURE_DIM = 128
# Images per forward pass when scoring: batches of 100 keep the first layers' activations
# (100 x 32 x 28 x 28 floats) in cache and ran 1.4-1.9x as fast as 1,000 on an AVX2-only
# AMD EPYC Zen 3 (docs/speed.md), with the same features to the bit there.
SCORE_BATCH = 100


@dataclass(frozen=True)
class ClassifierRecipe:
    """How a shipped classifier was trained (recorded in its card)."""

    dataset: str = "mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    shift: int = 2  # random translation of up to this many pixels (augmentation)
    seed: int = 0


# Fashion-MNIST is harder: the same net needs more epochs to pass its 91% target.
RECIPES = {"mnist": ClassifierRecipe(), "fashion-mnist": ClassifierRecipe("fashion-mnist", 8)}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """``logits = Classifier(x)`` for uint8 or [-1, 1] images ``[N x 1 x 28 x 28]``."""

    num_features = FEATURE_DIM

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            _block(1, 32), _block(32, 32), nn.MaxPool2d(2),
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),
            _block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N x 28 x 28]`` / ``[N x 1 x 28 x 28]`` or floats in [-1, 1] -> float input."""
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N x 128]`` (after global average pooling)."""
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x: [N x 1 x H x W]`` by up to ``shift`` pixels (zero fill)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    di = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dj = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (di[:, None] + torch.arange(h))[:, :, None]
    cols = (dj[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = SCORE_BATCH) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        correct += (model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum()
    return correct.item() / len(images)


def train_classifier(recipe: ClassifierRecipe, data_dir=None, progress: bool = True):
    """Train a classifier from ``recipe`` -> ``(model, card)``; card has the test accuracy."""
    torch.manual_seed(recipe.seed)
    images, labels = load_split(recipe.dataset, "train", data_dir)
    test_x, test_y = load_split(recipe.dataset, "test", data_dir)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(images) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total)
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", desc=f"classifier {recipe.dataset}")
    t0 = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = epoch_order(len(images), recipe.seed, epoch)
        for k in range(steps_per_epoch):
            idx = order[k * recipe.batch_size:(k + 1) * recipe.batch_size]
            x = random_shift(Classifier.prepare(images[idx]), recipe.shift, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
    if bar is not None:
        bar.close()
    acc = accuracy(model, test_x, test_y)
    card = {"dataset": recipe.dataset, "recipe": asdict(recipe), "test_accuracy": acc,
            "feature_layer": "body (after global average pooling)",
            "feature_dim": FEATURE_DIM,
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}
    return model.eval(), card


def weights_path(dataset: str, folder: Path | None = None) -> Path:
    return (folder or ASSETS) / f"classifier-{dataset}.safetensors"


def save_classifier(model: Classifier, card: dict, folder: Path | None = None) -> Path:
    """Write weights + card (with the weights' SHA-256) atomically."""
    path = weights_path(card["dataset"], folder)
    data = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write_bytes(path, data)
    card = {**card, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    return path


def retrain(dataset: str, *, epochs: int | None = None, data_dir=None,
            out: str | Path | None = None) -> tuple[Path, dict]:
    """Rebuild the shipped classifier of ``dataset`` from its recipe (``epochs``, if given,
    replacing the recipe's) into ``out`` (default: the package's assets) -> (weights, card)."""
    recipe = RECIPES[dataset] if not epochs else replace(RECIPES[dataset], epochs=epochs)
    model, card = train_classifier(recipe, data_dir)
    return save_classifier(model, card, Path(out) if out else None), card


_CACHE: dict[tuple[str, str], tuple[Classifier, dict]] = {}


def load_classifier(dataset: str = "mnist", folder: Path | None = None):
    """The shipped classifier for ``dataset`` -> ``(model, card)``; refuses tampered weights."""
    key = (dataset, str(folder))
    if key in _CACHE:
        return _CACHE[key]
    path = weights_path(dataset, folder)
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise MinidiffError(f"no classifier for {dataset!r} at {path}; build it with "
                            f"`minidiff classifier train --dataset {dataset}`")
    data = path.read_bytes()
    card = json.loads(card_path.read_text())
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.get("sha256"):
        raise MinidiffError(f"{path}: SHA-256 {digest[:12]}... does not match its card "
                            f"({str(card.get('sha256'))[:12]}...); the weights were modified, "
                            f"rebuild them with `minidiff classifier train --dataset {dataset}`")
    model = Classifier()
    model.load_state_dict(st_load(data))
    model.eval().requires_grad_(False)
    _CACHE[key] = (model, card)
    return model, card


def shipped_accuracy(dataset: str = "mnist", data_dir=None) -> tuple[float, int, dict]:
    """The shipped classifier's accuracy on ``dataset``'s test split -> (accuracy, images,
    card)."""
    model, card = load_classifier(dataset)
    x, y = load_split(dataset, "test", data_dir)
    return accuracy(model, x, y), len(x), card


@torch.no_grad()
def features_and_logits(model: Classifier, images: torch.Tensor,
                        batch_size: int = SCORE_BATCH):
    """uint8 images ``[N x 28 x 28]`` -> (features ``[N x 128]``, logits ``[N x 10]``)."""
    feats, logits = [], []
    for s in range(0, len(images), batch_size):
        f = model.features(images[s:s + batch_size])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)
