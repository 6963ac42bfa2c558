import pytest
import torch

from minidiff.diffusion import DiffusionConfig, Schedule
from minidiff.generation import generate, time_generation
from minidiff.runtime import timed
from minidiff.samplers import SAMPLERS, sample_ddpm
from minidiff.settings import SamplingConfig
from minidiff.unet import UNet


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return UNet(tiny_cfg).eval()


def test_generate_shape_dtype_and_determinism(tiny_model):
    sched = Schedule.from_config(DiffusionConfig()).respace(10)
    a = generate(tiny_model, sched, 5, seed=1, batch_size=2)
    assert a.shape == (5, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, generate(tiny_model, sched, 5, seed=1, batch_size=2))
    assert not torch.equal(a, generate(tiny_model, sched, 5, seed=2, batch_size=2))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_visits_each_respaced_step_once_and_is_reproducible(tiny_model, name):
    """One signature for all: the callback sees every respaced step in order, the output keeps
    the input's shape inside [-1, 1], and the same generator seed gives the same images."""
    sched = Schedule.from_config(DiffusionConfig()).respace(7)
    seen = []
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    run = [SAMPLERS[name](tiny_model, x, sched, generator=torch.Generator().manual_seed(1),
                          callback=lambda d: seen.append(d["t"])) for _ in range(2)]
    assert seen == 2 * sorted(sched.timesteps.tolist(), reverse=True)
    assert run[0].shape == x.shape and run[0].min() >= -1 and run[0].max() <= 1
    assert torch.equal(run[0], run[1])


def test_ddpm_with_oracle_recovers_a_point_mass():
    """With the exact noise predictor for data x0 = c, ancestral sampling returns c."""
    sched = Schedule.from_config(DiffusionConfig(schedule="linear", prediction="eps"))
    c = 0.3

    def oracle(x, t, y=None):
        ab = sched.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    for steps in (1000, 20):
        x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        out = sample_ddpm(oracle, x, sched.respace(steps))
        assert torch.allclose(out, torch.full_like(out, c), atol=1e-3), steps


def test_time_generation_draws_what_generate_draws_for_the_config(tiny_model):
    """The images of the last timed run, after a warm-up of ``warmup`` images: the network sees
    one warm-up batch of 2, then per repeat the batches 2, 2, 1, each for every step."""
    sched = Schedule.from_config(DiffusionConfig()).respace(3)
    cfg = SamplingConfig(sampler="ddim", steps=3, spacing="uniform", eta=0.5, batch_size=2,
                         seed=4, precision="fp32")
    rows = []
    hook = tiny_model.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    run = time_generation(tiny_model, sched, cfg, 5, warmup=2, repeats=2)
    hook.remove()
    want = generate(tiny_model, sched, 5, sampler="ddim", eta=0.5, seed=4, batch_size=2)
    assert torch.equal(run.result, want)
    assert rows == [2] * 3 + ([2] * 3 + [2] * 3 + [1] * 3) * 2


def test_timed_warms_up_once_then_takes_the_median(monkeypatch):
    """On a clock that only the work advances: the warm-up's own time, then the median of the
    timed calls."""
    import minidiff.runtime as runtime

    clock, calls = [0.0], []
    durations = iter([7.0, 1.0, 5.0, 2.0])  # the warm-up, then three timed calls

    def work(tag):
        calls.append(tag)
        clock[0] += next(durations)
        return len(calls)

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    t = timed(lambda: work("f"), 3, warmup=lambda: work("w"))
    assert calls == ["w", "f", "f", "f"] and t.result == 4
    assert (t.seconds, t.warmup_seconds) == (2.0, 7.0)
    assert timed(lambda: clock.append(0)).warmup_seconds == 0.0 and len(clock) == 2


def test_n_must_be_positive(tiny_model):
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(tiny_model, Schedule.from_config(DiffusionConfig()), 0)


def test_compile_falls_back_to_eager_with_a_note(tiny_model, monkeypatch):
    """A machine where torch.compile cannot build gets the eager result and one note."""
    import minidiff.generation as generation_mod

    def broken_compile(model, **kw):
        def fn(*a):
            raise RuntimeError("CppCompileError: no working C++ compiler\nlong log")
        return fn

    notes = []
    monkeypatch.setattr(generation_mod.torch, "compile", broken_compile)
    monkeypatch.setattr("builtins.print", lambda *a, **k: notes.append(" ".join(map(str, a))))
    sched = Schedule.from_config(DiffusionConfig()).respace(5)
    eager = generate(tiny_model, sched, 5, seed=3, batch_size=2)
    fallback = generate(tiny_model, sched, 5, seed=3, batch_size=2, compile=True)
    assert torch.equal(eager, fallback)
    assert notes == ["note: torch.compile failed (CppCompileError: no working C++ compiler); "
                     "running eagerly"]


def test_compiled_output_that_disagrees_with_eager_is_dropped(tiny_model, monkeypatch):
    """A compiler that builds but computes wrong values (NaN, as Inductor's AVX2 code did here
    under ATEN_CPU_CAPABILITY=avx2) is caught on its first call: eager images and one note."""
    import minidiff.generation as generation_mod

    def nan_compile(model, **kw):
        return lambda x, t, y=None: torch.full_like(model(x, t, y), float("nan"))

    notes = []
    monkeypatch.setattr(generation_mod.torch, "compile", nan_compile)
    monkeypatch.setattr("builtins.print", lambda *a, **k: notes.append(" ".join(map(str, a))))
    sched = Schedule.from_config(DiffusionConfig()).respace(5)
    eager = generate(tiny_model, sched, 5, seed=3, batch_size=2)
    assert torch.equal(eager, generate(tiny_model, sched, 5, seed=3, batch_size=2, compile=True))
    assert len(notes) == 1 and notes[0].startswith("note: torch.compile disagreed with eager")


def test_compiled_sampling_matches_eager(tiny_model, monkeypatch, capsys):
    """The real compiler (tens of seconds on 2 cores): same images up to rounding; the padded
    last batch keeps the one graph (a recompile would raise here, and fall back with a note)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    sched = Schedule.from_config(DiffusionConfig()).respace(4)
    eager = generate(tiny_model, sched, 5, seed=3, batch_size=4, sampler="ddim")
    compiled = generate(tiny_model, sched, 5, seed=3, batch_size=4, sampler="ddim",
                        compile=True)
    assert "note: torch.compile" not in capsys.readouterr().out
    assert (eager.int() - compiled.int()).abs().max() <= 2
