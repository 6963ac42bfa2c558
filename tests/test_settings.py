"""The torch-free settings: names equal to the registries they name, SamplingConfig's checks,
and sidecars (today's and older ones) that read back into a SamplingConfig."""

import json

import numpy as np
import pytest

from minidiff import settings
from minidiff.errors import MinidiffError
from minidiff.settings import EVAL_SAMPLING, SamplingConfig


def test_names_are_the_registries():
    from minidiff.data import DATASETS
    from minidiff.samplers import SAMPLERS
    from minidiff.unet import PRESETS

    assert settings.SAMPLER_NAMES == tuple(SAMPLERS)
    assert settings.DATASET_NAMES == tuple(DATASETS)
    assert settings.MODEL_PRESETS == tuple(PRESETS)


def test_every_listed_choice_is_one_the_code_takes():
    """The names without a registry of their own: each one a flag offers runs."""
    import torch

    from minidiff.diffusion import DiffusionConfig, Schedule
    from minidiff.runtime import resolve_device, resolve_precision

    spaced = {}
    for schedule in settings.SCHEDULES:
        sched = Schedule.from_config(DiffusionConfig(schedule=schedule))
        assert len(sched) == 1000 and bool((sched.betas > 0).all())
        for spacing in settings.SPACINGS:
            spaced[schedule, spacing] = sched.respace(10, spacing).timesteps.tolist()
            assert len(spaced[schedule, spacing]) == 10
    for schedule in settings.SCHEDULES:  # all differ (noise-level spacings follow the schedule)
        kinds = {tuple(spaced[schedule, s]) for s in settings.SPACINGS}
        assert len(kinds) == len(settings.SPACINGS)
    betas = [Schedule.from_config(DiffusionConfig(schedule=s)).betas for s in settings.SCHEDULES]
    assert all(not torch.equal(a, b) for a, b in zip(betas, betas[1:], strict=False))
    cpu = torch.device("cpu")
    assert {resolve_precision(p, cpu) for p in settings.PRECISIONS} <= {"fp32", "bf16"}
    for name in settings.DEVICES:
        try:
            assert resolve_device(name).type in ("cpu", "cuda")
        except MinidiffError as e:  # cuda on a machine without a GPU
            assert name == "cuda" and "--device cpu" in str(e)


def test_defaults_are_the_chosen_sampler():
    d = SamplingConfig()
    assert (d.sampler, d.steps, d.spacing, d.rho, d.guidance) == ("dpmpp-sde", 8, "karras", 2.0,
                                                                  1.5)
    assert (EVAL_SAMPLING.steps, EVAL_SAMPLING.spacing) == (8, "trailing")  # the curves' ruler
    assert SamplingConfig.from_dict(d.to_dict()) == d


@pytest.mark.parametrize("kw,msg", [
    ({"sampler": "euler"}, "unknown sampler 'euler'; choose one of: ddpm, ddim, dpmpp, "
                           "dpmpp-sde"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"spacing": "cubic"}, "--spacing cubic: unknown spacing 'cubic'"),
    ({"eta": 0.5}, "--eta applies to --sampler ddim only"),
    ({"spacing": "karras", "rho": 0.0}, "--rho must be > 0, got 0.0"),
    ({"spacing": "uniform", "rho": 3.0}, "--rho applies to --spacing karras only"),
    ({"sampler": "ddim", "eta": -1.0}, "--eta must be >= 0, got -1.0"),
    ({"guidance": -1.0}, "--guidance must be >= 0, got -1.0"),
    ({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16, got 'fp8'"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"seed": -1}, "--seed must be >= 0, got -1"),
])
def test_each_bad_field_is_one_line(kw, msg):
    with pytest.raises(MinidiffError) as e:
        SamplingConfig(**kw)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_sidecars_old_and_new_read_back(tmp_path):
    from minidiff.samplefiles import read_sidecar, save_samples

    # what `minidiff sample` wrote before SamplingConfig: no eta, no guidance without --class
    old = {"n": 4, "sampler": "ddpm", "steps": 10, "spacing": "uniform", "seed": 3,
           "batch_size": 2, "precision": "fp32", "compile": False, "device": "cpu",
           "checkpoint": "runs/x", "checkpoint_sha256": "0" * 64, "seconds": 0.1,
           "dataset": "fashion-mnist"}
    save_samples(tmp_path / "old.npz", np.zeros((4, 28, 28), np.uint8), old)
    meta = read_sidecar(tmp_path / "old.npz")
    assert meta["dataset"] == "fashion-mnist"
    assert SamplingConfig.from_dict(meta) == SamplingConfig(
        sampler="ddpm", steps=10, spacing="uniform", seed=3, batch_size=2, precision="fp32",
        guidance=None)
    cond = {**old, "class": "all", "guidance": 2.0}
    (tmp_path / "cond.json").write_text(json.dumps(cond))
    assert SamplingConfig.from_dict(read_sidecar(tmp_path / "cond.npz")).guidance == 2.0
    (tmp_path / "bad.json").write_text("{not json")
    assert read_sidecar(tmp_path / "bad.npz") == {} == read_sidecar(tmp_path / "none.npz")
