import pytest
import torch

from minidiff.unet import UNetConfig

# A model small enough that a few training steps take well under a second on 2 cores.
TINY = UNetConfig(channels=(8, 16), norm_groups=4, time_dim=16)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Checksum stamps and reference features go to a per-session temp folder, never the user's
    cache. Session-scoped, so module-scoped fixtures (a metrics Reference) see it too."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.delenv("MINIDIFF_DATA", raising=False)
    yield
    mp.undo()


@pytest.fixture
def tiny_cfg():
    return TINY


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
