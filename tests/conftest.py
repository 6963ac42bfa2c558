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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder of TINY trained 2 steps (fp32), shared read-only by the tests that need
    any checkpoint: the CLI's, the distillation teacher."""
    from minidiff.diffusion import DiffusionConfig
    from minidiff.settings import TrainConfig
    from minidiff.train import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(TINY, DiffusionConfig(), TrainConfig(steps=2, batch_size=8, subset=16,
                                               precision="fp32"), out, progress=False)
    return out


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
