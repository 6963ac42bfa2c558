"""Distillation: students are ordinary checkpoints sampled in their recorded number of network
calls; the progressive and consistency targets checked against the exact Gaussian denoiser of
test_samplers_gaussian.py; the adversarial terms reach only their own player; the
distribution-matching gradient on the Gaussian; exact resume; refused step counts."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from minidiff import distill as distill_mod
from minidiff import loop
from minidiff.apps.cli import main
from minidiff.checkpoint import load_checkpoint
from minidiff.diffusion import DiffusionConfig, Schedule, q_sample
from minidiff.distill import (
    PAIRS_FILE,
    Discriminator,
    DMDLoss,
    ECTLoss,
    FeatureHead,
    adversarial_losses,
    consistency_target,
    ddim_path,
    distill,
    dmd_loss,
    pair_seed,
    progressive_target,
    teacher_pairs,
)
from minidiff.errors import MinidiffError
from minidiff.generation import generate, resolve_sampling, to_uint8
from minidiff.samplers import sample_ddim
from minidiff.settings import DistillConfig, SamplingConfig
from tests.test_faults import other_process_holds
from tests.test_samplers_gaussian import FULL, FULL_V, MU, S, oracle

# four updates over two rounds (8 -> 4 -> 2 steps): the hand-over between rounds is exercised
TINY_RUN = dict(teacher_steps=8, updates=4, batch_size=4, subset=8, precision="fp32",
                checkpoint_every=1, warmup_steps=1)


@pytest.fixture(scope="module")
def teacher(tiny_run):
    return tiny_run


# each run's DistillConfig; "dmd-gan": distribution matching with DMD2's GAN term beside it
RUNS = {**{method: DistillConfig(method=method, **TINY_RUN)
           for method in ("progressive", "consistency", "adversarial", "ect", "dmd")},
        "dmd-gan": DistillConfig(method="dmd", gan_weight=1.0, fake_updates=2, **TINY_RUN),
        "dmd-sim": DistillConfig(method="dmd", simulate=True, **TINY_RUN),
        "dmd-pairs": DistillConfig(method="dmd", pairs=6, distill_weight=1.0, **TINY_RUN)}


@pytest.fixture(scope="module")
def students(teacher):
    runs = RUNS
    for name, cfg in runs.items():
        distill(teacher, teacher.parent / name, cfg, progress=False)
    return {name: teacher.parent / name for name in runs}


class Counting(torch.nn.Module):
    """A model wrapper that counts its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        self.calls += 1
        return self.model(x, t, y)


@pytest.mark.parametrize("method,sampler", [("progressive", "ddim"), ("consistency", "ddpm"),
                                            ("adversarial", "ddim"), ("ect", "ddpm"),
                                            ("dmd", "ddim")])
def test_student_samples_in_its_recorded_network_calls(students, method, sampler):
    model, config, _ = load_checkpoint(students[method])
    assert config["diffusion"]["prediction"] == "v" and config["distill"]["method"] == method
    assert config["sampling"]["steps"] == 2 and config["step"] == 4
    # the defaults, no flags: the student's own sampler and step count
    cfg, sched = resolve_sampling(SamplingConfig(precision="fp32"), config, torch.device("cpu"))
    assert (cfg.sampler, cfg.steps, cfg.guidance) == (sampler, 2, None)
    net = Counting(model)
    images = generate(net, sched, 3, sampler=cfg.sampler, batch_size=3)
    assert net.calls == config["sampling"]["steps"] and images.shape == (3, 28, 28)


def test_progressive_run_keeps_each_rounds_student(students):
    _, config, _ = load_checkpoint(students["progressive"] / "rounds" / "4-step")
    assert config["sampling"]["steps"] == 4 and config["sampling"]["serves"] == [4]
    assert not (students["progressive"] / "rounds" / "2-step").exists()  # the run folder is it


def test_a_step_count_the_student_cannot_serve_is_refused_in_one_line(students, tmp_path,
                                                                      capsys):
    rc = main(["sample", str(students["progressive"]), "--steps", "3", "--n", "2",
               "--out", str(tmp_path / "s.npz"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "2-step progressive student" in err[0] and "serves --steps 2, got 3" in err[0]
    assert "drop --steps" in err[0]
    config = load_checkpoint(students["consistency"])[1]
    assert config["sampling"]["serves"] == [1, 2, 4, 8]  # the divisors of its 8-level grid
    with pytest.raises(MinidiffError, match="drop --sampler"):
        resolve_sampling(SamplingConfig(sampler="ddim"), config, torch.device("cpu"))
    with pytest.raises(MinidiffError, match=r"--steps \(3\) times a power of two"):
        DistillConfig(teacher_steps=8, steps=3)


def test_a_typed_default_step_count_is_refused_too(students, tmp_path, capsys):
    """`--steps N` typed with N SamplingConfig's default is refused for a 2-step student
    (the SamplingConfig records what was typed); without --steps the student samples in its
    own 2 steps."""
    out = tmp_path / "s.npz"
    argv = ["sample", str(students["progressive"]), "--n", "2", "--out", str(out),
            "--no-progress"]
    default = SamplingConfig().steps
    assert main([*argv, "--steps", str(default)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"serves --steps 2, got {default}; drop --steps" in err[0]
    assert not out.exists()
    assert main(argv) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["steps"] == 2 and "chosen" not in sidecar  # a record, not a setting


@pytest.mark.parametrize("method,rounds", [("progressive", 2), ("adversarial", 1), ("dmd", 1),
                                           ("dmd-gan", 1), ("dmd-sim", 1),
                                           ("dmd-pairs", 1)])
def test_resume_after_interruption_matches_an_uninterrupted_run(teacher, students, tmp_path,
                                                                monkeypatch, method, rounds):
    """Progressive: stopped mid-way through its second round; adversarial: its discriminator
    and that player's optimizer state come back too; dmd: its fake score (and discriminator)
    and their state."""
    out = tmp_path / "resumed"
    real = loop.save_state

    def stop_after_step_3(folder, model, ema, opt, step, keep=3):
        real(folder, model, ema, opt, step, keep)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", stop_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, out, RUNS[method], progress=False)
    monkeypatch.setattr(loop, "save_state", real)
    distill(teacher, out, resume=True, progress=False)
    a = load_checkpoint(students[method])[0].state_dict()
    b = load_checkpoint(out)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(logged) == rounds  # one line per round's end, none repeated by the resume


def test_a_second_writer_of_a_student_folder_is_refused_in_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    with other_process_holds(out) as pid:
        rc = main(["distill", str(teacher), "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"{out} is in use by process {pid}" in err[0]
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written


def test_adversarial_terms_reach_only_their_own_player():
    """One backward pass of the sum trains both players: the student's GAN term moves the
    student's output and not the discriminator; the discriminator's term the reverse; the
    distillation term pulls the output towards its target."""
    torch.manual_seed(0)
    disc = Discriminator()
    pred = torch.randn(4, 1, 28, 28, requires_grad=True)
    real, target = torch.rand(4, 1, 28, 28) * 2 - 1, torch.zeros(4, 1, 28, 28)
    terms = adversarial_losses(pred, real, target, disc)
    terms["gan"].backward(retain_graph=True)
    assert pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    pred.grad = None
    terms["disc"].backward(retain_graph=True)
    assert pred.grad is None
    assert all(p.grad is not None for p in disc.parameters())  # (the head's bias: exactly 0
    assert sum(p.grad.abs().sum() for p in disc.parameters()) > 0  # while both hinges are open)
    disc.zero_grad(set_to_none=True)
    terms["distill"].backward()
    torch.testing.assert_close(pred.grad, 0.5 * pred.detach())  # d/dx |x - 0|^2 / 4 rows
    assert all(p.grad is None for p in disc.parameters())


def test_dmd2_gan_head_reads_the_fake_score_and_each_term_reaches_its_own_player(teacher):
    """DMD2's GAN head judges noised images through the fake score's bottleneck: the head's
    loss trains the head and the fake score and not the student; the student's GAN term moves
    the student's images and neither judge."""
    net = load_checkpoint(teacher)[0]
    fake = copy.deepcopy(net).train().requires_grad_(True)
    head = FeatureHead(net.mid[-1].conv2.out_channels)
    loss_fn = DMDLoss(DistillConfig(method="dmd", gan_weight=1.0), DiffusionConfig(), "eps",
                      2, fake, head)
    gen = torch.zeros(4, 1, 28, 28, requires_grad=True)
    real = torch.rand(4, 1, 28, 28) * 2 - 1
    loss_fn.head_loss(real, None, gen, None, torch.Generator().manual_seed(0)).backward()
    assert gen.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert sum(p.grad.abs().sum() for p in fake.mid.parameters()) > 0  # its encoder learns
    assert all(p.grad is None for p in fake.up_blocks.parameters())  # its decoder is not read
    fake.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)
    loss_fn.gan_loss(gen, None, torch.Generator().manual_seed(0)).backward()
    assert gen.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*head.parameters(), *fake.parameters()])
    assert all(p.requires_grad for p in [*head.parameters(), *fake.parameters()])


def test_a_tiny_pair_fraction_still_holds_one_row_to_its_pair(teacher):
    """`--pair-fraction` rounds to at least one pulled row, so the pull is never an empty mean."""
    net = load_checkpoint(teacher)[0]
    loss_fn = DMDLoss(DistillConfig(method="dmd", pairs=4, pair_fraction=0.01), DiffusionConfig(),
                      "eps", 2, copy.deepcopy(net))
    loss = loss_fn(net, net, net, torch.rand(4, 1, 28, 28) * 2 - 1,
                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_init_must_be_a_student_of_the_teachers_u_net(teacher, tmp_path):
    with pytest.raises(MinidiffError, match="not the teacher's U-Net"):
        distill(teacher, tmp_path / "s", DistillConfig(method="adversarial", init="reduced",
                                                       **TINY_RUN), progress=False)
    with pytest.raises(MinidiffError, match="--init is for --method adversarial"):
        DistillConfig(init="reduced")
    with pytest.raises(MinidiffError, match="--pair-fraction is for --pairs"):
        DistillConfig(method="dmd", pair_fraction=0.5)
    with pytest.raises(MinidiffError, match=r"--pair-fraction must be in \(0, 1\]"):
        DistillConfig(method="dmd", pairs=8, pair_fraction=0)


# ------------------------------------------- targets against the exact Gaussian denoiser

X_T = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
TOL = 1e-4  # float32 arithmetic over a few steps; a wrong coefficient is off by >= 1e-2


def test_one_student_step_on_the_progressive_target_is_two_teacher_ddim_steps():
    """A student that predicts exactly the target x~ (as v), sampled with DDIM on the student's
    4 steps, passes through every second point of the teacher's 8-step DDIM path."""
    teacher_sched = FULL.respace(8, "trailing")
    student_sched = FULL_V.respace(4, "trailing")
    index = {int(t): i for i, t in enumerate(teacher_sched.timesteps)}

    def student(x, t, y=None):
        i = torch.tensor([index[int(s)] for s in t])
        x0 = progressive_target(oracle, teacher_sched, x, i, clip=False)
        ab = teacher_sched.alpha_bar[i].float().view(-1, 1, 1, 1)
        return (ab.sqrt() * x - x0) / (1 - ab).sqrt()  # v, from x0 = sqrt(ab) x - sqrt(1-ab) v

    path_t, path_s = [], []
    end_t = sample_ddim(oracle, X_T, teacher_sched, clip_denoised=False,
                        callback=lambda d: path_t.append(d["x"]))
    end_s = sample_ddim(student, X_T, student_sched, clip_denoised=False,
                        callback=lambda d: path_s.append(d["x"]))
    assert len(path_s) == 4
    for k, x in enumerate(path_s):
        assert torch.allclose(x, path_t[2 * k + 1], atol=TOL), k
    assert torch.allclose(end_s, end_t, atol=TOL)
    # and not trivially: one teacher step of the same size lands elsewhere
    one_step = sample_ddim(oracle, X_T, FULL.respace(4, "trailing"), clip_denoised=False)
    assert (one_step - end_t).abs().max() > 100 * TOL


def test_consistency_target_maps_one_teacher_trajectory_to_its_endpoint():
    """With the ideal consistency function (the teacher's DDIM path run to the end), the target
    at every point of one teacher trajectory is that trajectory's endpoint; the teacher's
    one-shot x0 prediction, not a consistency function, misses it."""
    grid = FULL.respace(8, "trailing")
    grid_v = Schedule(grid.betas, grid.timesteps, "v")
    index = {int(t): i for i, t in enumerate(grid.timesteps)}

    def ideal(x, t, y=None):  # f*(x, t): the rest of the teacher's path, as v
        n = index[int(t[0])]
        x0 = sample_ddim(oracle, x, Schedule(grid.betas[:n + 1], grid.timesteps[:n + 1]),
                         clip_denoised=False)
        ab = grid.alpha_bar[n].item()
        return (ab ** 0.5 * x - x0) / (1 - ab) ** 0.5

    points = [X_T]
    end = sample_ddim(oracle, X_T, grid, clip_denoised=False,
                      callback=lambda d: points.append(d["x"]))
    points = points[:-1]  # x at grid index 7, 6, ..., 0
    for n in (7, 4, 1, 0):
        x, i = points[7 - n], torch.full((len(X_T),), n)
        target = consistency_target(ideal, oracle, grid, grid_v, x, i, clip=False)
        assert torch.allclose(target, end, atol=TOL), n
    one_shot = consistency_target(lambda x, t, y=None: _as_v(oracle, grid, x, t, index),
                                  oracle, grid, grid_v, points[0], torch.full((len(X_T),), 7),
                                  clip=False)
    assert (one_shot - end).abs().max() > 0.01


def _as_v(eps_model, grid, x, t, index):
    """An eps model's output re-expressed as v (for a v-schedule)."""
    ab = grid.alpha_bar[index[int(t[0])]].item()
    eps = eps_model(x, t)
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    return ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0


def test_a_later_rounds_teacher_is_the_previous_student_as_it_samples(tmp_path, monkeypatch):
    """From an `eps`, conditional teacher: round 1's teacher is round 0's student (a `v` model
    with the guidance distilled in), read with its own parameterisation and not guided again,
    so its x0 is the one that student's own sampling computes (regression: read as `eps` and
    guided twice, a 2-step student of `reduced-cond` drew noise)."""
    from dataclasses import replace

    from minidiff.diffusion import DiffusionConfig
    from minidiff.samplers import predict_x0
    from minidiff.settings import TrainConfig
    from minidiff.train import train
    from tests.conftest import TINY

    teacher = tmp_path / "cond-eps"
    train(replace(TINY, num_classes=10), DiffusionConfig(prediction="eps"),
          TrainConfig(steps=2, batch_size=8, subset=16, precision="fp32"), teacher,
          progress=False)
    seen = {}  # id of each round's teacher -> (teacher, schedule)
    real = distill_mod.progressive_target

    def spy(net, sched, x, i, y=None, clip=True):
        seen.setdefault(id(net), (net, sched))
        return real(net, sched, x, i, y, clip)

    monkeypatch.setattr(distill_mod, "progressive_target", spy)
    out = tmp_path / "student"
    distill(teacher, out, DistillConfig(**TINY_RUN), progress=False)
    (first, _), (later, sched) = seen.values()
    assert isinstance(first, distill_mod.Guided) and not isinstance(later, distill_mod.Guided)
    model, config, _ = load_checkpoint(out / "rounds" / "4-step")
    own = Schedule.from_config(DiffusionConfig.from_dict(config["diffusion"])).respace(
        len(sched), "trailing")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.arange(4)
    i = torch.full((4,), len(sched) - 1)
    torch.testing.assert_close(predict_x0(later, x, sched, i, y)[1],
                               predict_x0(model, x, own, i, y)[1])


# ----------------------------------------------------------- easy consistency tuning

def test_ect_levels_follow_its_sigmoid_map_and_halve_the_gap_each_stage():
    """r is below t, the clean image (-1) exactly where sigma_r falls below the lowest level,
    and the relative gap (sigma_t - sigma_r) / sigma_t is q^-(stage+1) (1 + k sigmoid(-sigma_t))
    up to rounding r down to a timestep."""
    from minidiff.diffusion import DiffusionConfig

    loss = ECTLoss(DiffusionConfig())
    sig = loss.sigma
    for stage in (0, 2, 5):
        t, r = loss.draw(20000, stage, torch.Generator().manual_seed(stage))
        assert bool((r < t).all()) and bool((t >= 1).all())
        want = sig[t] * (1 - 2.0 ** -(stage + 1) * (1 + 8 * torch.sigmoid(-sig[t])))
        assert bool(((r == -1) == (want < sig[0])).all())
        inside = r >= 0
        assert bool((sig[r[inside]] <= want[inside] + 1e-12).all())  # rounded down...
        nxt = (r[inside] + 1).clamp(max=len(sig) - 1)
        assert bool(((sig[nxt] > want[inside]) | (r[inside] + 1 == t[inside])).all())  # ...by one
    # the median gap halves from one stage to the next (large sigma: ratio -> q^-(stage+1))
    gaps = []
    for stage in (1, 2):
        t, r = loss.draw(20000, stage, torch.Generator().manual_seed(9))
        big = (sig[t] > 5) & (r >= 0)
        gaps.append(((sig[t] - sig[r]) / sig[t])[big].median().item())
    assert gaps[1] == pytest.approx(gaps[0] / 2, rel=0.1)


def test_ect_student_maps_one_teacher_trajectory_to_its_endpoint():
    """On the Gaussian of the sampler tests, a tiny model (one slope per timestep: x0 =
    mu + h_t (x / sqrt(ab_t) - mu)) started as the exact denoiser and tuned by ECTLoss alone
    maps two points of one probability-flow trajectory (sigma ~1 and ~3) to its endpoint within
    0.12, where the denoiser it started from misses by more than 0.4: consistency is learnt
    from the data and the model itself, with no teacher step."""
    from minidiff.diffusion import DiffusionConfig

    mu, s = 0.2, 0.3
    loss_fn = ECTLoss(DiffusionConfig(timesteps=50, schedule="cosine"))
    ab, sigma = loss_fn.sched.alpha_bar.float(), loss_fn.sigma.float()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = torch.nn.Parameter(s ** 2 / (s ** 2 + sigma ** 2))  # the denoiser

        def forward(self, x, t, y=None):  # -> v, as a student predicts
            a = ab[t].view(-1, 1, 1, 1)
            x0 = mu + self.h[t].view(-1, 1, 1, 1) * (x / a.sqrt() - mu)
            return (a.sqrt() * x - x0) / (1 - a).sqrt()

    def miss(model) -> list[float]:
        """Largest distance to the trajectories' endpoint mu + s z, at the two points."""
        z = torch.linspace(-2, 2, 9).view(-1, 1, 1, 1)
        out = []
        for t in (int(torch.searchsorted(sigma, torch.tensor(v))) for v in (1.0, 3.0)):
            x = ab[t].sqrt() * mu + (ab[t] * s ** 2 + 1 - ab[t]).sqrt() * z  # on the trajectory
            x0 = ab[t].sqrt() * x - (1 - ab[t]).sqrt() * model(x, torch.full((9,), t))
            out.append((x0 - (mu + s * z)).abs().max().item())
        return out

    torch.manual_seed(0)
    model = Tiny()
    assert min(miss(model)) > 0.4
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for k in range(800):
        x0 = mu + s * torch.randn(4096, 1, 1, 1, generator=gen)
        loss = loss_fn(model, x0, generator=gen, stage=k * 3 // 800)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max(miss(model)) < 0.12, miss(model)


def test_ect_reads_the_r_level_under_the_t_levels_dropout_mask():
    """Both passes of one ECT loss see the same dropout mask (ECT restores the RNG state), and
    a step count its sampler cannot serve is refused in one line."""
    from minidiff.diffusion import DiffusionConfig

    class Masks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.masks = torch.nn.Parameter(torch.zeros(())), []

        def forward(self, x, t, y=None):
            mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
            self.masks.append(mask)
            return x * self.w + mask

    model = Masks()
    ECTLoss(DiffusionConfig())(model, torch.zeros(8, 1, 4, 4),
                               generator=torch.Generator().manual_seed(0), stage=3)
    a, b = model.masks
    assert torch.equal(a, b) and 0 < a.count_nonzero() < a.numel()
    with pytest.raises(MinidiffError, match="--method ect samples in 1, 2, 4 steps, got --steps 3"):
        DistillConfig(method="ect", steps=3)


def _gaussian_x0(mean: float, x, t):
    """The exact denoiser's x0 for data N(mean, S^2) at FULL's timesteps ``t: [N]``."""
    ab = FULL.alpha_bar[t].float().view(-1, 1, 1, 1)
    eps = (1 - ab).sqrt() * (x - ab.sqrt() * mean) / (ab * S**2 + 1 - ab)
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


@pytest.mark.parametrize("shift", [0.1, -0.2])
def test_dmd_gradient_moves_each_sample_towards_the_data_and_vanishes_at_a_match(shift):
    """On the Gaussian of test_samplers_gaussian.py: a generator whose samples follow
    N(MU + shift, S^2), a fake score that is the exact denoiser of that distribution and a
    real one of the data's N(MU, S^2). The loss's gradient has the sign of ``shift`` at every
    sample (a descent step moves each towards the data), its size per sample is 1 / N times the
    normalised difference, and with the fake score equal to the real one it is zero."""
    t = torch.randint(20, 980, (len(X_T),), generator=torch.Generator().manual_seed(1))
    gen = (MU + shift + S * X_T).requires_grad_(True)
    xt = q_sample(FULL, gen.detach(), t, torch.randn_like(X_T))
    real, fake = _gaussian_x0(MU, xt, t), _gaussian_x0(MU + shift, xt, t)
    dmd_loss(gen, real, fake).backward()
    assert (gen.grad.sign() == math.copysign(1, shift)).all()
    norm = (gen.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-6
    torch.testing.assert_close(gen.grad, (fake - real) / norm / len(X_T))
    gen.grad = None
    dmd_loss(gen, real, real).backward()
    assert gen.grad.abs().max() == 0


def test_dmd_trains_the_fake_score_and_not_the_teacher(teacher, students):
    """The fake score moved away from the teacher it started as (it learns the student's
    outputs), a run without a GAN term keeps no discriminator, and the student's config names
    its method and sampler."""
    from safetensors.torch import load_file

    t_model = load_checkpoint(teacher)[0].state_dict()
    state = max((students["dmd"] / "checkpoints").glob("step-*")) / "state.safetensors"
    fake = {k.removeprefix("model.fake."): v for k, v in load_file(state).items()
            if k.startswith("model.fake.")}
    gan = load_file(max((students["dmd-gan"] / "checkpoints").glob("step-*"))
                    / "state.safetensors")
    assert any(k.startswith("model.disc.") for k in gan)  # the GAN run keeps its judge
    assert not any(k.startswith("model.disc.") for k in load_file(state))
    assert fake.keys() == t_model.keys()
    assert any(not torch.equal(fake[k], t_model[k]) for k in fake)
    config = load_checkpoint(students["dmd"])[1]
    assert config["distill"]["method"] == "dmd" and config["sampling"]["sampler"] == "ddim"


def test_dmd_of_a_conditional_teacher_reads_it_guided_and_folds_the_guidance_in(tmp_path,
                                                                              monkeypatch):
    """The real score of a conditional teacher is its guided output, also when the student
    starts from another checkpoint (`--init`, e.g. a guided 2-step student); the fake score
    learns the student's outputs by class, and the student records the guidance it serves."""
    from dataclasses import replace

    from minidiff.diffusion import DiffusionConfig
    from minidiff.settings import TrainConfig
    from minidiff.train import train
    from tests.conftest import TINY

    teacher = tmp_path / "cond"
    train(replace(TINY, num_classes=10), DiffusionConfig(prediction="eps"),
          TrainConfig(steps=2, batch_size=8, subset=16, precision="fp32"), teacher,
          progress=False)
    start = tmp_path / "start"
    distill(teacher, start, DistillConfig(**TINY_RUN), progress=False)
    seen = []
    real = distill_mod.DMDLoss.__call__

    def spy(self, student, teacher_net, start_net, x0, y=None, generator=None, step=0):
        seen.append((teacher_net, y))
        return real(self, student, teacher_net, start_net, x0, y, generator, step)

    monkeypatch.setattr(distill_mod.DMDLoss, "__call__", spy)
    out = tmp_path / "dmd"
    distill(teacher, out, DistillConfig(method="dmd", init=str(start), **TINY_RUN),
            progress=False)
    net, y = seen[0]
    assert isinstance(net, distill_mod.Guided) and net.scale == DistillConfig().guidance
    assert y is not None
    config = load_checkpoint(out)[1]
    assert config["sampling"]["guidance"] == DistillConfig().guidance


def test_the_simulated_path_is_the_students_own_ddim_sample_with_gradient(students):
    """`--simulate` trains on what the student's sampler computes: the path's last x0, clipped,
    is sample_ddim's output from the same noise, and the gradient reaches the network through
    both steps."""
    model, config, _ = load_checkpoint(students["dmd-sim"])
    sched = resolve_sampling(SamplingConfig(precision="fp32"), config, torch.device("cpu"))[1]
    z = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net = Counting(model)
    out = ddim_path(net, z, sched)
    assert net.calls == 2 and out.requires_grad
    torch.testing.assert_close(out.clamp(-1, 1), sample_ddim(model, z, sched))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pairs_are_the_teachers_deterministic_draws_from_their_own_noise(teacher, students,
                                                                         monkeypatch):
    """`--pairs N`: each pair is what `minidiff sample --sampler dpmpp --steps 10 --spacing
    karras --rho 2 --seed S` draws from the pair's noise, S the run seed's own pair stream and
    never the run seed itself (sampling with the run's seed must not redraw the training
    noises), the same pairs come back for the same seed (so a resumed run pulls towards the same
    images), a conditional teacher's labels take each class in turn, and the run pulls the
    student's own path from those noises towards them; with `--pair-fraction 0.5` half of each
    batch starts from those noises and the other half from fresh noise."""
    model, config, _ = load_checkpoint(teacher)
    sched = Schedule.from_config(distill_mod.DiffusionConfig.from_dict(config["diffusion"]))
    z, x, y = teacher_pairs(model, sched, 5, (1, 28, 28), seed=3, num_classes=None)
    grid = sched.respace(10, "karras", 2.0)
    drawn = generate(model, grid, 5, sampler="dpmpp", seed=pair_seed(3), batch_size=5)
    assert y is None and torch.equal(to_uint8(x)[:, 0], drawn)
    assert pair_seed(3) not in range(1000) and pair_seed(3) != pair_seed(4)
    same_seed = generate(model, grid, 5, sampler="dpmpp", seed=3, batch_size=5)
    assert not torch.equal(same_seed, drawn)
    again = teacher_pairs(model, sched, 5, (1, 28, 28), seed=3, num_classes=None)
    assert torch.equal(again[0], z) and torch.equal(again[1], x)
    assert torch.equal(teacher_pairs(model, sched, 5, (1, 28, 28), 3, 3)[2],
                       torch.tensor([0, 1, 2, 0, 1]))

    seen = []
    real = distill_mod.ddim_path

    def spy(net, z, sched, y=None):
        seen.append(z)
        return real(net, z, sched, y)

    monkeypatch.setattr(distill_mod, "ddim_path", spy)
    distill(teacher, teacher.parent / "pairs-spy", RUNS["dmd-pairs"], progress=False)
    bank = teacher_pairs(model, sched, 6, (1, 28, 28), seed=0, num_classes=None)[0]
    assert seen and all(any(torch.equal(row, b) for b in bank) for z in seen for row in z)
    assert load_checkpoint(students["dmd-pairs"])[1]["distill"]["pairs"] == 6

    # a run started from that one (--init) reads its pairs instead of drawing them again
    seen.clear()
    drawn = []
    monkeypatch.setattr(distill_mod, "teacher_pairs", lambda *a, **k: drawn.append(a))
    half = replace(RUNS["dmd-pairs"], pair_fraction=0.5, updates=2,
                   init=str(teacher.parent / "pairs-spy"))
    distill(teacher, teacher.parent / "pairs-half", half, progress=False)
    in_bank = [[any(torch.equal(row, b) for b in bank) for row in z] for z in seen]
    assert in_bank and all(rows == [True, True, False, False] for rows in in_bank)
    assert drawn == [] and (teacher.parent / "pairs-half" / PAIRS_FILE).is_file()
