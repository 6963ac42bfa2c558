"""Pruning that really shrinks, sparse / int8 / fp16 storage, fine-tuning that keeps zeros."""

import json

import pytest
import torch

from minidiff.apps.cli import main
from minidiff.checkpoint import load_checkpoint, save_model
from minidiff.codec import decode_state, encode_state
from minidiff.compress import (
    output_error,
    prunable_weights,
    prune_checkpoint,
    prune_structured,
    prune_unstructured,
    quantize_checkpoint,
    sparsity,
)
from minidiff.diffusion import DiffusionConfig
from minidiff.errors import MinidiffError
from minidiff.settings import TrainConfig
from minidiff.train import train
from minidiff.unet import PRESETS, UNet, UNetConfig, count_macs, count_params, width_names

FAST = dict(batch_size=32, subset=128, precision="fp32", device="cpu", warmup_steps=2,
            log_every=2)


def _inputs(cfg, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, cfg.image_size, cfg.image_size, generator=g), \
        torch.tensor([0, 250, 500, 999][:n])


def _config(model):
    return {"model": model.config.to_dict(), "diffusion": DiffusionConfig().to_dict()}


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return UNet(PRESETS["baseline"]).eval()


@pytest.fixture
def trained(tmp_path, tiny_cfg):
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=4, **FAST), tmp_path / "base",
          progress=False)
    return tmp_path / "base"


def test_structured_pruning_removes_channels_per_groupnorm_group(baseline):
    pruned = prune_structured(baseline, 0.1)
    widths = pruned.config.widths
    # GroupNorm(8) layers lose one channel per group of 4 / 8 / 16: 32->24, 64->56, 128->112
    assert widths["down_blocks.0.conv1"] == 24
    assert widths["down_blocks.1.conv2"] == 56
    assert widths["mid.0.conv1"] == widths["mid.1.conv2"] == 112  # residual chain stays equal
    # every block's time-embedding projection shrinks with the conv it is added to
    for name in width_names(pruned.config):
        if name.endswith("conv1"):
            block = pruned.get_submodule(name.rsplit(".", 1)[0])
            assert block.emb.out_features == block.conv1.out_channels == block.norm2.num_channels
    assert pruned.out.out_channels == 1 and pruned.time_mlp[2].out_features == 512  # untouched
    ratio = count_params(pruned) / count_params(baseline)
    assert 0.75 < ratio < 0.85, ratio  # ~0.9^2 of a 10% channel cut, plus rounding
    assert count_macs(pruned) < 0.8 * count_macs(baseline)
    x, t = _inputs(pruned.config)
    assert pruned(x, t).shape == x.shape


def test_pruned_model_reloads_from_json_and_safetensors_alone(tmp_path, baseline):
    pruned = prune_structured(baseline, 0.1)
    save_model(tmp_path / "p", pruned, _config(pruned))
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model"]["widths"]["down_blocks.0.conv1"] == 24  # widths are data, in JSON
    # the declared widths match the stored weights, and the reload is exact
    again, _, _ = load_checkpoint(tmp_path / "p")
    for name in width_names(again.config):
        assert again.get_submodule(name).out_channels == again.config.width(name, -1) or \
            name not in again.config.widths
    x, t = _inputs(pruned.config)
    with torch.no_grad():
        assert torch.equal(pruned(x, t), again(x, t))
    assert (tmp_path / "p" / "model.safetensors").stat().st_size < 0.85 * 4 * count_params(
        baseline)


def test_widths_are_validated():
    with pytest.raises(ValueError, match="name a conv"):
        UNetConfig(channels=(32, 64), widths={"nonsense": 8})
    with pytest.raises(ValueError, match="identity skip"):
        UNet(UNetConfig(channels=(32, 64), widths={"mid.0.conv2": 56}))


def test_unstructured_pruning_is_exact_and_storage_really_shrinks(tmp_path, baseline):
    model = UNet(PRESETS["baseline"]).eval()
    model.load_state_dict(baseline.state_dict())
    names = prune_unstructured(model, 0.3)
    assert len(names) == len(prunable_weights(model))
    assert sparsity(model, names) == pytest.approx(0.3, abs=1e-5)
    # sparse layout round trip: bitmask + values decode to the same dense tensors
    state = model.state_dict()
    enc = encode_state(state, {"sparse": names})
    assert f"{names[0]}:mask" in enc and names[0] not in enc
    dec = decode_state(enc, {k: v.shape for k, v in state.items()})
    assert all(torch.equal(dec[k], state[k]) for k in state)
    save_model(tmp_path / "dense", model, _config(model))
    save_model(tmp_path / "sparse", model, {**_config(model), "storage": {"sparse": names}})
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    stored = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert stored < 0.78 * dense, (stored, dense)  # 70% of values + 1 bit per weight
    again, _, _ = load_checkpoint(tmp_path / "sparse")
    assert all(torch.equal(again.state_dict()[k], state[k]) for k in state)


def test_fine_tuning_keeps_the_zeros_and_resumes(tmp_path, trained):
    rec = prune_checkpoint(trained, tmp_path / "p0", structured=0.5, unstructured=0.3)
    assert rec["after"]["params"] < rec["before"]["params"]
    assert rec["after"]["bytes"] < rec["before"]["bytes"]
    p0, cfg0, _ = load_checkpoint(tmp_path / "p0")
    names = cfg0["storage"]["sparse"]
    zeros0 = {k: p0.state_dict()[k] == 0 for k in names}
    train(None, None, TrainConfig(steps=6, init=str(tmp_path / "p0"), lr=1e-2, **FAST),
          tmp_path / "ft", progress=False)
    ft, cfg, _ = load_checkpoint(tmp_path / "ft")
    assert ft.config == p0.config  # the pruned layout came from the checkpoint
    assert cfg["storage"]["sparse"] == names and cfg["init_sha256"]
    assert sparsity(ft, names) == pytest.approx(0.3, abs=1e-4)
    # the same positions are zero, and the others did move
    assert all(torch.equal(ft.state_dict()[k] == 0, zeros0[k]) for k in names)
    assert not torch.equal(ft.state_dict()[names[3]], p0.state_dict()[names[3]])
    # the raw (non-EMA) weights in the training state are masked too
    from minidiff.checkpoint import load_state

    raw = UNet(ft.config)
    opt = torch.optim.AdamW(raw.parameters())
    load_state(tmp_path / "ft", raw, UNet(ft.config), opt)
    assert sparsity(raw, names) == pytest.approx(0.3, abs=1e-4)


def test_int8_and_fp16_storage_stay_close_to_float(tmp_path, trained):
    model, config, _ = load_checkpoint(trained)
    q = quantize_checkpoint(trained, tmp_path / "q", mode="int8")
    h = quantize_checkpoint(trained, tmp_path / "h", mode="fp16")
    assert q["after_bytes"] < 0.45 * q["before_bytes"]
    assert h["after_bytes"] < 0.55 * h["before_bytes"]
    qm, qcfg, _ = load_checkpoint(tmp_path / "q")
    assert "time_mlp.0.weight" not in qcfg["storage"]["int8"]
    assert "out.weight" not in qcfg["storage"]["int8"]
    assert "down_blocks.0.conv1.weight" not in qcfg["storage"]["int8"]
    assert qcfg["storage"]["int8"]["upsamples.0.weight"] == 1  # ConvTranspose: out axis 1
    err = output_error(model, qm, config)
    assert err == pytest.approx(q["output_rel_rms_error"], rel=1e-3)
    assert qcfg["quantized"]["output_error_inputs"] == 64  # recorded beside the error
    assert 0 < err < 0.03, err
    assert 0 < h["output_rel_rms_error"] < 0.005
    # int8 weights really take 256 levels per channel
    w = qm.state_dict()["mid.0.conv1.weight"]
    assert len(torch.unique(w[0])) <= 256


def test_prune_and_quantize_cli_errors(tmp_path, trained, capsys):
    assert main(["prune", str(trained), "--out", str(tmp_path / "x")]) == 1
    assert "--structured" in capsys.readouterr().err
    assert main(["train", "--recipe", "pruned", "--out", str(tmp_path / "y")]) == 1
    assert "--init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", str(trained), "--structured", "1.5", "--out", str(tmp_path / "z")])
    assert main(["quantize", str(trained), "--out", str(trained)]) == 1  # a run: never replaced
    assert "holds more than a model" in capsys.readouterr().err
    assert (trained / "model.safetensors").is_file()  # nothing on disk was touched


def test_prune_cli_writes_a_smaller_model(tmp_path, trained, capsys):
    assert main(["prune", str(trained), "--structured", "0.5", "--unstructured", "0.3",
                 "--out", str(tmp_path / "p")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert rec["after"]["macs"] < rec["before"]["macs"]
    with pytest.raises(MinidiffError):
        prune_checkpoint(trained, tmp_path / "q")


def test_fine_tuning_a_quantized_checkpoint_stores_float_again(tmp_path, trained):
    quantize_checkpoint(trained, tmp_path / "q", mode="int8")
    train(None, None, TrainConfig(steps=2, init=str(tmp_path / "q"), **FAST), tmp_path / "ft",
          progress=False)
    _, cfg, _ = load_checkpoint(tmp_path / "ft")
    assert "storage" not in cfg and cfg["init_sha256"]
