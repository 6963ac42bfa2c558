"""The evaluation suite: each metric reacts the way its definition says it must."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from minidiff import classifier as clf
from minidiff.data import load_split
from minidiff.errors import MinidiffError
from minidiff.metrics import (
    Reference,
    evaluate_images,
    frechet_distance,
    memorization_threshold,
    nearest,
    precision_recall,
    ssim_mean,
)


@pytest.fixture(scope="module")
def ref():
    return Reference("mnist", "test")


@pytest.fixture(scope="module")
def train_images():
    return load_split("mnist", "train")[0]


def feats(ref, images):
    return clf.features_and_logits(ref.classifier, images)[0]


def test_shipped_classifier_meets_its_target_and_card(ref, tmp_path, capsys):
    """`minidiff classifier evaluate` (one pass over the 10,000 test images) reproduces
    the card's accuracy, prints it and writes it as JSON."""
    from minidiff.apps.cli import main

    out = tmp_path / "acc.json"
    assert main(["classifier", "evaluate", "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["test_accuracy"]
    assert acc >= 0.993 and acc == pytest.approx(ref.card["test_accuracy"], abs=1e-4)
    assert f"test accuracy {acc:.4f}" in capsys.readouterr().out
    assert clf.weights_path("mnist").stat().st_size < 2 * 2**20


def test_fid_of_a_set_with_itself_is_zero_and_train_vs_test_is_small(ref, train_images):
    f = ref.features[:2000]
    assert abs(frechet_distance(f, f)) < 1e-3
    a = frechet_distance(feats(ref, train_images[:2000]), ref.features)
    b = frechet_distance(feats(ref, train_images[2000:4000]), ref.features)
    assert 0 < a < 5 and 0 < b < 5 and abs(a - b) < 0.5 * max(a, b)


def _noisy(images, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255 + sigma * torch.randn(images.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _blurred(images, k):
    if k == 1:
        return images
    x = images.float().unsqueeze(1)
    x = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)
    return x.squeeze(1).round().to(torch.uint8)


def test_fid_grows_with_noise_and_blur(ref, train_images):
    real = train_images[:500]
    by_noise = [frechet_distance(feats(ref, _noisy(real, s)), ref.features)
                for s in (0.0, 0.1, 0.25, 0.5)]
    by_blur = [frechet_distance(feats(ref, _blurred(real, k)), ref.features) for k in (1, 3, 5)]
    assert by_noise == sorted(by_noise) and by_noise[-1] > 10 * by_noise[0], by_noise
    assert by_blur == sorted(by_blur) and by_blur[-1] > 3 * by_blur[0], by_blur


def test_ssim_of_identical_images_is_one(ref):
    x = ref.images[:50]
    assert ssim_mean(x, x) == pytest.approx(1.0, abs=1e-6)
    assert ssim_mean(x, ref.images[50:100]) < 0.6


def test_precision_recall_of_a_collapsed_set(ref):
    f = ref.features
    p, r = precision_recall(f[:1000], f[1000:3000])
    assert p > 0.6 and r > 0.6
    ones = f[ref.labels == 1][:500]  # only one digit: precise but no recall
    p1, r1 = precision_recall(ones, f[1000:3000])
    assert p1 > 0.6 and r1 < 0.3


def test_reference_caches_its_knn_radii_on_disk(ref):
    """The reference's k-NN radii are computed once and kept with its features: a fresh
    Reference reads them back, and precision/recall with them equals the uncached computation."""
    from safetensors.torch import load_file

    from minidiff.metrics import K_NN

    assert str(ref.folder).startswith(os.environ["MINIDIFF_CACHE"])  # the suite's own cache
    cached = load_file(ref.folder / "reference.safetensors")
    assert torch.equal(cached[f"radii_k{K_NN}"], ref.radii)
    assert torch.equal(Reference("mnist", "test").radii, ref.radii)
    fake = ref.features[:500] + 0.1
    assert precision_recall(fake, ref.features, real_radii=ref.radii) == \
        precision_recall(fake, ref.features)


def test_class_balance_memorisation_and_confidence(ref, train_images):
    seven = ref.images[ref.labels == 7][:1]
    one_digit = evaluate_images(seven.repeat(300, 1, 1), ref)
    assert one_digit["class_max_dev"] == pytest.approx(0.9, abs=1e-6)
    copies = evaluate_images(train_images[:500], ref)
    held_out = evaluate_images(ref.images[:1000], ref)  # memorisation 0.062, class dev 0.026
    assert copies["memorization"] > 0.99
    assert 0.02 < held_out["memorization"] < 0.09
    assert held_out["confidence"] > 0.95 and held_out["class_max_dev"] < 0.03
    assert set(json.loads(json.dumps(copies))) >= {"pseudo_fid", "kid", "precision", "recall",
                                                    "ssim", "class_histogram", "n"}


def test_the_registered_memorization_threshold_is_the_datas_own(ref, train_images, monkeypatch):
    """MNIST's threshold is kept in its registry entry instead of 10,000 x 60,000 distances;
    the 5th percentile of 1,000 test images' distances (seeded) is within 4.3% of it over
    seeds 0-4, so a wrong constant (another split, dataset or definition) is caught at 10%."""
    import minidiff.data as data

    known = data.DATASETS["mnist"].memorization_threshold
    assert ref.threshold == known
    idx = torch.randperm(len(ref.images), generator=torch.Generator().manual_seed(0))[:1000]
    d, _ = nearest(ref.images[idx], train_images)
    assert torch.quantile(d, 0.05).item() == pytest.approx(known, rel=0.1)
    # without a registered value it is computed (on a slice here, as the full split would be)
    monkeypatch.setitem(data.DATASETS, "mnist",
                        dataclasses.replace(data.DATASETS["mnist"], memorization_threshold=None))
    monkeypatch.setattr("minidiff.metrics.load_split",
                        lambda name, split, data_dir=None: (ref.images[idx], None))
    assert memorization_threshold("mnist", train_images=train_images) == pytest.approx(
        torch.quantile(d, 0.05).item())


def test_nearest_finds_exact_copies(ref):
    d, idx = nearest(ref.images[[5, 17]], ref.images)
    assert idx.tolist() == [5, 17] and d.max().item() == 0


def test_tampered_classifier_is_refused(tmp_path, monkeypatch):
    for f in ("classifier-mnist.safetensors", "classifier-mnist.json"):
        shutil.copy(clf.ASSETS / f, tmp_path / f)
    w = tmp_path / "classifier-mnist.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(MinidiffError, match="does not match its card"):
        clf.load_classifier("mnist", tmp_path)


def test_eval_cli_prints_table_with_floor_and_writes_json(tmp_path, capsys, ref):
    from minidiff.apps.cli import main
    from minidiff.samplefiles import save_samples

    samples = tmp_path / "s.npz"
    save_samples(samples, ref.images[:200].numpy(), {"dataset": "mnist"})
    out = tmp_path / "m.json"
    assert main(["eval", str(samples), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pseudo_fid" in text and "real floor" in text and "n = 200" in text
    res = json.loads(out.read_text())
    assert set(res) == {"pseudo_fid", "kid", "precision", "recall", "ssim", "ssim_nearest",
                        "class_histogram", "class_max_dev", "confidence", "memorization", "n",
                        "floor"}
    assert res["n"] == 200 and res["floor"]["n"] == 200
    assert len(res["class_histogram"]) == 10 and abs(sum(res["class_histogram"]) - 1) < 1e-3


def test_score_is_a_seeded_draw_scored_in_full(tiny_run, ref):
    """evaluation.score (the benchmarks' row): the keys they record, the same numbers for the
    same seed, other ones for another seed."""
    from dataclasses import replace

    from minidiff.checkpoint import load_checkpoint
    from minidiff.evaluation import SCORES, score
    from minidiff.settings import SamplingConfig

    model, config, _ = load_checkpoint(tiny_run)
    cfg = SamplingConfig(steps=2, precision="fp32", batch_size=16)
    a, b = (score(model, config, cfg, 32, ref) for _ in range(2))
    other = score(model, config, replace(cfg, seed=1), 32, ref)
    assert set(a) == {"seconds", *SCORES} and a["pseudo_fid"] > 0  # seconds: 0.0 when fast
    assert {k: a[k] for k in SCORES} == {k: b[k] for k in SCORES}
    assert other["pseudo_fid"] != a["pseudo_fid"]
