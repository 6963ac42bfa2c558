import pytest
import torch

from minidiff.unet import UNetConfig

# A model small enough that a few training steps take well under a second on 2 cores.
TINY = UNetConfig(channels=(8, 16), norm_groups=4, time_dim=16)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Checksum stamps go to a per-session temp folder, never the user's cache."""
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("MINIDIFF_DATA", raising=False)


@pytest.fixture
def tiny_cfg():
    return TINY


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
