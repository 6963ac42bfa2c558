"""Fixed-seed regression values: a silent numerical change to a sampler, the training loss, a
training step or a metric fails here, in fp32 on the CPU.

Every number below was computed by this file's own functions. When a change is meant to move
them (a fixed bug, a new default), regenerate them with

    .venv/bin/python tests/test_regression.py

paste the printed literals over the old ones, and say in the commit why they moved.

Tolerances leave room for the last bits that differ between CPUs (AVX-512, AVX2) and oneDNN's
kernels, nothing more: a real change to a coefficient moves these numbers by far more.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from minidiff.diffusion import DiffusionConfig, DiffusionLoss, Schedule
from minidiff.unet import UNet, UNetConfig

# tests/conftest.py's TINY, spelled out: a change there must not move these values
TINY = UNetConfig(channels=(8, 16), norm_groups=4, time_dim=16)
# the default recipe's forward process and the one before it, named in full for the same reason
V_COSINE = DiffusionConfig(timesteps=1000, schedule="cosine", prediction="v")
EPS_LINEAR = DiffusionConfig(timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02,
                             prediction="eps")
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp", "dpmpp-sde")  # pinned by name: new ones are not here
PIXELS = ((0, 0, 3, 5), (1, 0, 14, 14), (0, 0, 27, 27))


def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()


def summary(x: torch.Tensor) -> list[float]:
    """Sum, absolute sum and three pixels of ``x: [2 x 1 x 28 x 28]``, in float64."""
    x = x.double()
    return [x.sum().item(), x.abs().sum().item(), *(x[p].item() for p in PIXELS)]


# ------------------------------------------------------------------------------- computed


def sampler_values() -> dict[str, dict[str, list[float]]]:
    """Per sampler: the state after its first step and its output, 3 steps of ``V_COSINE``
    (trailing spacing would move them too: uniform is the spacing pinned here)."""
    from minidiff.samplers import SAMPLERS

    model, out = tiny_model(), {}
    sched = Schedule.from_config(V_COSINE).respace(3)
    for name in SAMPLER_NAMES:
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        steps = []
        final = SAMPLERS[name](model, x, sched, generator=torch.Generator().manual_seed(1),
                               callback=lambda d, seen=steps: seen.append(d["x"].clone()))
        out[name] = {"first_step": summary(steps[0]), "output": summary(final)}
    return out


def loss_values() -> dict[str, float]:
    """DiffusionLoss of the tiny model on the first 8 test images, draws from seed 0."""
    from minidiff.data import load_split

    x0 = load_split("mnist", "test")[0][:8].unsqueeze(1).float() / 127.5 - 1
    model = tiny_model().train()
    return {name: DiffusionLoss(Schedule.from_config(cfg))(
                model, x0, generator=torch.Generator().manual_seed(0)).item()
            for name, cfg in (("v_cosine", V_COSINE), ("eps_linear", EPS_LINEAR))}


def train_values() -> dict[str, float]:
    """Two fp32 steps of :func:`minidiff.train.train`: the logged losses (metrics.jsonl keeps
    6 decimals) and the sum and absolute sum of the saved (EMA) weights."""
    from safetensors.torch import load_file

    from minidiff.settings import TrainConfig
    from minidiff.train import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train(TINY, V_COSINE, TrainConfig(steps=2, batch_size=8, subset=16, lr=2e-3,
                                          warmup_steps=1, seed=0, precision="fp32",
                                          device="cpu", log_every=1), out, progress=False)
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(out / "model.safetensors")
    return {"loss_step_1": log[0]["loss"], "loss_step_2": log[1]["loss"],
            "weights_sum": sum(w.double().sum().item() for w in weights.values()),
            "weights_abs_sum": sum(w.double().abs().sum().item() for w in weights.values())}


def metric_values() -> dict[str, float]:
    """The metrics of the first 500 MNIST test images against the last 2,000 as the reference,
    in the shipped classifier's feature space."""
    from minidiff.classifier import features_and_logits, load_classifier
    from minidiff.data import load_split
    from minidiff.metrics import frechet_distance, kernel_distance, precision_recall, ssim_mean

    images = load_split("mnist", "test")[0]
    samples, reference = images[:500], images[-2000:]
    classifier, _ = load_classifier("mnist")
    feats, logits = features_and_logits(classifier, samples)
    ref_feats, _ = features_and_logits(classifier, reference)
    precision, recall = precision_recall(feats, ref_feats)
    return {"pseudo_fid": frechet_distance(feats, ref_feats),
            "kid": kernel_distance(feats, ref_feats, subsets=10),
            "precision": precision, "recall": recall,
            "confidence": logits.softmax(1).max(1).values.mean().item(),
            "ssim": ssim_mean(samples, reference[:500])}


# --------------------------------------------------------------------------------- pinned

SAMPLERS_PINNED = {
    "ddpm": {
        "first_step": [237.9971891, 945.2856678, -0.2859588861, -1.286535978, 0.07091367245],
        "output": [349.9360113, 709.5405527, -0.03686743975, -0.9589261413, 0.1668578535],
    },
    "ddim": {
        "first_step": [246.3993224, 946.1464406, 1.712258339, 0.06351263821, 0.1268261373],
        "output": [353.4203982, 726.005963, 1, 0.1319328547, 0.288818866],
    },
    "dpmpp": {
        "first_step": [246.3993256, 946.1464453, 1.71225822, 0.06351263821, 0.1268261373],
        "output": [346.7308551, 827.075962, 1, 0.1587857753, 0.2864929736],
    },
    "dpmpp-sde": {
        "first_step": [237.9971891, 945.2856678, -0.2859588861, -1.286535978, 0.07091367245],
        "output": [343.3606729, 822.2123412, -0.07399591804, -1, 0.1327606589],
    },
}

LOSS_PINNED = {
    "v_cosine": 1.23104918,
    "eps_linear": 1.044479728,
}

TRAIN_PINNED = {
    "loss_step_1": 1.215757,
    "loss_step_2": 1.052578,
    "weights_sum": 191.8139921,
    "weights_abs_sum": 2029.048504,
}

METRICS_PINNED = {
    "pseudo_fid": 0.9564777015,
    "kid": 0.01096615034,
    "precision": 0.7239999771,
    "recall": 0.8345000148,
    "confidence": 0.9946062565,
    "ssim": 0.3483144939,
}


# ---------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def sampler_run():
    return sampler_values()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_step_and_short_run_are_pinned(sampler_run, name):
    got, want = sampler_run[name], SAMPLERS_PINNED[name]
    for key in ("first_step", "output"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (name, key, got[key])


def test_loss_on_a_fixed_batch_is_pinned():
    got = loss_values()
    assert got == pytest.approx(LOSS_PINNED, rel=1e-6), got


def test_two_training_steps_are_pinned():
    got = train_values()
    assert [got["loss_step_1"], got["loss_step_2"]] == pytest.approx(
        [TRAIN_PINNED["loss_step_1"], TRAIN_PINNED["loss_step_2"]], abs=2e-6), got
    assert [got["weights_sum"], got["weights_abs_sum"]] == pytest.approx(
        [TRAIN_PINNED["weights_sum"], TRAIN_PINNED["weights_abs_sum"]], rel=1e-5), got


def test_metrics_of_a_fixed_slice_are_pinned():
    got = metric_values()
    assert got == pytest.approx(METRICS_PINNED, rel=1e-4, abs=1e-6), got


def literal(value, indent: int = 0) -> str:
    """``value`` as the Python literal this file pins (10 significant digits: ample for the
    tolerances, short enough to read)."""
    if isinstance(value, dict):
        pad = " " * (indent + 4)
        items = "".join(f'{pad}"{k}": {literal(v, indent + 4)},\n' for k, v in value.items())
        return "{\n" + items + " " * indent + "}"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return f"{value:.10g}"


if __name__ == "__main__":
    torch.set_num_threads(2)
    for name, fn in (("SAMPLERS_PINNED", sampler_values), ("LOSS_PINNED", loss_values),
                     ("TRAIN_PINNED", train_values), ("METRICS_PINNED", metric_values)):
        print(f"{name} = {literal(fn())}")
