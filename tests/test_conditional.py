"""Class-conditional models: label dropout, classifier-free guidance, per-class sampling."""

import json

import numpy as np
import pytest
import torch

from minidiff.apps.cli import main
from minidiff.diffusion import DiffusionConfig, Schedule
from minidiff.errors import MinidiffError
from minidiff.generation import generate, sample_to_file
from minidiff.guidance import Guided
from minidiff.loop import drop_labels
from minidiff.settings import SamplingConfig, TrainConfig
from minidiff.train import train
from minidiff.unet import UNet, UNetConfig

COND = UNetConfig(channels=(8, 16), norm_groups=4, time_dim=16, num_classes=10)
STEPS2 = SamplingConfig(steps=2)
DEFAULT_GUIDANCE = SamplingConfig().guidance


def test_label_dropout_rate_and_null_class():
    y = torch.arange(100_000) % 10
    out = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    dropped = out == 10
    assert 0.095 < dropped.float().mean().item() < 0.105
    assert torch.equal(out[~dropped], y[~dropped])  # the rest keep their labels
    assert torch.equal(drop_labels(y, 0.0, 10), y)


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


@pytest.fixture
def cond_model():
    torch.manual_seed(0)
    model = UNet(COND).eval()
    with torch.no_grad():  # a non-zero class embedding, so conditioning changes eps
        model.class_emb.weight.normal_()
    return model


def test_guidance_zero_is_unconditional_and_one_is_conditional(cond_model):
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([10, 200, 500, 999])
    y = torch.tensor([3, 7, 0, 9])
    with torch.no_grad():
        cond, uncond = cond_model(x, t, y), cond_model(x, t, None)
        assert not torch.allclose(cond, uncond, atol=1e-3)
        counted = Counting(cond_model)
        assert torch.allclose(Guided(counted, 0.0)(x, t, y), uncond, atol=1e-5)
        assert torch.allclose(Guided(counted, 1.0)(x, t, y), cond, atol=1e-5)
        g3 = Guided(counted, 3.0)(x, t, y)
        assert torch.allclose(g3, uncond + 3 * (cond - uncond), atol=1e-4)
    assert counted.batches == [8, 8, 8]  # one forward pass of 2N each


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp-sde"])
def test_every_sampler_takes_guidance(cond_model, sampler):
    sched = Schedule.from_config(DiffusionConfig()).respace(3)
    y = torch.tensor([1, 2])
    a = generate(cond_model, sched, 2, sampler=sampler, y=y, guidance=0.0)
    b = generate(cond_model, sched, 2, sampler=sampler, y=y, guidance=4.0)
    assert a.shape == b.shape == (2, 28, 28) and not torch.equal(a, b)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    train(COND, DiffusionConfig(), TrainConfig(steps=3, batch_size=16, subset=64,
                                               precision="fp32", device="cpu"),
          out, progress=False)
    return out


def test_class_all_is_balanced_and_sorted(cond_run, tmp_path):
    meta = sample_to_file(cond_run, tmp_path / "s.npz", STEPS2, n=20, classes="all",
                          grid=str(tmp_path / "g.png"), progress=False)
    with np.load(tmp_path / "s.npz") as z:
        assert z["labels"].tolist() == [d for d in range(10) for _ in range(2)]
        assert z["images"].shape == (20, 28, 28)
    assert meta["class"] == "all" and meta["guidance"] == DEFAULT_GUIDANCE
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["guidance"] == DEFAULT_GUIDANCE
    from PIL import Image
    w, h = Image.open(tmp_path / "g.png").size
    assert h > 4 * w  # 10 rows (one per class) of 2 images


def test_single_class(cond_run, tmp_path):
    sample_to_file(cond_run, tmp_path / "s.npz", SamplingConfig(steps=2, guidance=3.0), n=5,
                   classes="7", progress=False)
    with np.load(tmp_path / "s.npz") as z:
        assert z["labels"].tolist() == [7] * 5


@pytest.mark.parametrize("kw,msg", [
    ({"classes": "all", "n": 15}, "divisible by 10"),
    ({"classes": "12"}, "class id in 0..9"),
    ({"classes": "seven"}, "class id in 0..9"),
    ({"classes": "3", "guidance": -1.0}, "--guidance must be >= 0"),
])
def test_bad_class_requests(cond_run, tmp_path, kw, msg):
    kw = {"n": 10, **kw}
    with pytest.raises(MinidiffError, match=msg):
        cfg = SamplingConfig(steps=2, guidance=kw.pop("guidance", DEFAULT_GUIDANCE))
        sample_to_file(cond_run, tmp_path / "s.npz", cfg, **kw, progress=False)
    assert not (tmp_path / "s.npz").exists()


def test_guidance_without_class_is_refused(cond_run, tmp_path, capsys):
    rc = main(["sample", str(cond_run), "--guidance", "2", "--n", "10", "--steps", "2",
               "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["minidiff: error: --guidance needs --class (a digit or all)"]
    assert not (tmp_path / "s.npz").exists()


def test_class_on_an_unconditional_model_names_the_fix(tmp_path, tiny_cfg, capsys):
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=1, batch_size=8, subset=16,
                                                   precision="fp32", device="cpu"),
          tmp_path / "u", progress=False)
    rc = main(["sample", str(tmp_path / "u"), "--class", "3", "--n", "2", "--steps", "2",
               "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--conditional" in err[0]


def test_train_cli_conditional_flag(tmp_path):
    rc = main(["train", "--channels", "8,16", "--conditional", "--steps", "2", "--batch-size",
               "8", "--subset", "16", "--precision", "fp32", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "c")])
    assert rc == 0
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 10 and cfg["train"]["label_dropout"] == 0.1


def test_conditional_accuracy_tells_right_labels_from_wrong():
    from minidiff.data import load_split
    from minidiff.metrics import Reference, evaluate_conditional

    ref = Reference("mnist", "test")
    images, labels = load_split("mnist", "train")
    images, labels = images[:300], labels[:300]
    right = evaluate_conditional(images, labels, ref)
    wrong = evaluate_conditional(images, (labels + 1) % 10, ref)
    assert right["conditional_accuracy"] > 0.97
    assert wrong["conditional_accuracy"] < 0.05
    assert sum(e["n"] for e in right["per_class"].values()) == 300
    assert right["per_class_pseudo_fid_mean"] < wrong["per_class_pseudo_fid_mean"]


def test_eval_cli_reports_conditional_accuracy(cond_run, tmp_path, capsys):
    sample_to_file(cond_run, tmp_path / "s.npz", STEPS2, n=20, classes="all", progress=False)
    assert main(["eval", str(tmp_path / "s.npz"), "--json", str(tmp_path / "m.json")]) == 0
    assert "conditional accuracy" in capsys.readouterr().out
    res = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= res["conditional_accuracy"] <= 1 and set(res["per_class"]) == set("0123456789")


def test_label_dropout_without_conditional_is_refused(tmp_path, capsys):
    rc = main(["train", "--label-dropout", "0.2", "--steps", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err == ["minidiff: error: --label-dropout applies to --conditional "
                               "training only"]
    assert not (tmp_path / "x").exists()


def test_ect_refuses_a_conditional_teacher_in_one_line(cond_run, tmp_path, capsys):
    """ECT runs no teacher, so it cannot fold guidance into a conditional student."""
    from minidiff.apps.cli import main

    assert main(["distill", str(cond_run), "--method", "ect", "--updates", "1",
                 "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minidiff: error: {cond_run} is class-conditional and --method ect folds no "
                   "guidance in: use --method progressive or dmd for it"]


# ----------------------------------------------------------------------------- the demo


def test_the_demo_draws_each_digit_guided_and_reports_their_accuracy(tmp_path, monkeypatch,
                                                                     capsys):
    """The demo trains a class-conditional U-Net and draws n / 10 of each digit with the
    default guidance; the report and metrics.json carry the share read as the digit asked
    for. A folder of an earlier, unconditional demo is not resumed as if it were this one."""
    from dataclasses import replace

    from minidiff.apps import demo
    from minidiff.samplefiles import read_samples

    monkeypatch.setattr(demo, "DEMO_SAMPLING", SamplingConfig(steps=2))
    monkeypatch.setattr(demo, "DEMO_TRAIN", replace(demo.DEMO_TRAIN, subset=64, batch_size=8,
                                                    warmup_steps=1))
    out = tmp_path / "demo"
    demo.run_demo(out, steps=2, n=20)
    _, labels, meta = read_samples(out / "samples.npz")
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert meta["guidance"] == SamplingConfig().guidance and meta["class"] == "all"
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["num_classes"] == 10 and config["preset"] == "reduced"
    accuracy = json.loads((out / "metrics.json").read_text())["conditional_accuracy"]
    assert f"{accuracy:.1%} of the samples as the digit" in (out / "report.md").read_text()

    assert main(["demo", "--out", str(out), "--n", "25"]) == 1
    assert "--n must be a multiple of 10" in capsys.readouterr().err
    config["model"]["num_classes"] = None  # a demo folder from before
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinidiffError, match="holds a demo run of another recipe"):
        demo.run_demo(out, steps=2, n=20)
