import pytest
import torch

from minidiff.study.reference import STUDY
from minidiff.study.report import preset_table
from minidiff.unet import PRESETS, UNet, UNetConfig, count_macs, count_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes_and_params_near_the_study(name):
    model = UNet(PRESETS[name])
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([0, 500, 999])).shape == (3, 1, 28, 28)
    params = count_params(model)
    assert abs(params / STUDY[name]["params"] - 1) < 0.10, params


def test_macs_scale_with_width():
    assert count_macs(UNet(PRESETS["baseline"])) > 3 * count_macs(UNet(PRESETS["reduced"]))


def test_time_changes_the_output(tiny_cfg):
    torch.manual_seed(0)
    model = UNet(tiny_cfg)
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))


def test_class_conditioning_room(tiny_cfg):
    cfg = UNetConfig(**{**tiny_cfg.to_dict(), "num_classes": 10})
    torch.manual_seed(0)
    model = UNet(cfg)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    torch.nn.init.normal_(model.class_emb.weight)  # make the embedding matter
    a, b = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(a, b)
    assert model(x, t).shape == (2, 1, 28, 28)  # y=None -> the null class


def test_config_round_trip_and_bad_sizes(tiny_cfg):
    assert UNetConfig.from_dict(tiny_cfg.to_dict()) == tiny_cfg
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(channels=(8, 16, 32, 64), image_size=28)
    with pytest.raises(ValueError, match="unknown model config keys"):
        UNetConfig.from_dict({"channels": [8], "colour": 3})


def test_preset_table_has_a_header_and_one_line_per_row():
    rows = [{"preset": "reduced", "channels": [16, 32], "params": 634_123, "study_params": 634_000,
             "macs_per_image": 12_500_000}]
    header, line = preset_table(rows).splitlines()
    assert header.split() == ["preset", "channels", "params", "study", "MACs/image"]
    assert line.split() == ["reduced", "(16,", "32)", "634,123", "634,000", "12.5", "M"]


def test_block_structure_follows_the_nominal_layout(tiny_cfg):
    """The first block sees raw pixels (no norm in front); a block that changes width has a
    1x1 skip conv, one that keeps it an identity skip; pruning keeps both (same keys)."""
    keys = set(UNet(tiny_cfg).state_dict())
    assert "down_blocks.0.pre.0.weight" not in keys and "down_blocks.1.pre.0.weight" in keys
    assert {"down_blocks.0.skip.weight", "down_blocks.1.skip.weight"} <= keys
    assert "mid.0.skip.weight" not in keys and "mid.0.pre.0.weight" in keys
    pruned = UNetConfig(**{**tiny_cfg.to_dict(), "widths": {"mid.0.conv1": 8,
                                                            "down_blocks.1.conv1": 8}})
    assert set(UNet(pruned).state_dict()) == keys


def test_attention_starts_as_the_identity_and_then_mixes_all_positions(tiny_cfg):
    """``attention=True`` adds one self-attention block at the lowest resolution, whose zeroed
    output projection makes a new model compute what the model without it computes; once
    trained, every output position there depends on every input position (a 3 x 3 conv reaches
    only its neighbours). The config round-trips and a config without it stays free of the key."""
    from dataclasses import replace

    cfg = replace(tiny_cfg, attention=True)
    assert "attention" not in tiny_cfg.to_dict()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    plain = UNet(tiny_cfg)
    torch.manual_seed(0)
    with_attn = UNet(cfg)
    assert set(with_attn.state_dict()) - set(plain.state_dict()) == {
        k for k in with_attn.state_dict() if k.startswith("mid_attn.")}
    with_attn.load_state_dict({**with_attn.state_dict(), **plain.state_dict()})
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    assert torch.allclose(with_attn(x, t), plain(x, t))
    attn = with_attn.mid_attn
    torch.nn.init.normal_(attn.proj.weight)
    h = torch.randn(1, attn.proj.in_channels, 7, 7, requires_grad=True)
    attn(h)[0, :, 0, 0].sum().backward()
    assert (h.grad[0].abs().sum(0) > 0).all()  # the top-left output reads all 49 positions
