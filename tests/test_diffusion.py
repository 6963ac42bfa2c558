import pytest
import torch

from minidiff.diffusion import DiffusionConfig, DiffusionLoss, Schedule, make_betas, q_sample
from minidiff.settings import SPACINGS


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_properties(kind):
    s = Schedule.from_config(DiffusionConfig(schedule=kind))
    assert len(s) == 1000 and s.betas.dtype == torch.float64
    assert bool((s.betas > 0).all() and (s.betas < 1).all())
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())  # strictly decreasing
    assert s.alpha_bar[0] > 0.99 and s.alpha_bar[-1] < 1e-3  # data -> (almost) pure noise
    # posterior variance lies between 0 and beta (Ho et al. sec. 3.2)
    assert bool((s.posterior_variance <= s.betas + 1e-12).all())
    assert s.posterior_variance[0] == 0


def test_linear_endpoints():
    b = make_betas(DiffusionConfig(schedule="linear"))
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


def test_respace_keeps_alpha_bar_at_kept_timesteps():
    full = Schedule.from_config(DiffusionConfig())
    r = full.respace(50)
    assert len(r) == 50 and r.timesteps[0] == 0 and r.timesteps[-1] == 999
    assert torch.allclose(r.alpha_bar, full.alpha_bar[r.timesteps], rtol=1e-12)
    assert full.respace(1000) is full
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        full.respace(1001)


def test_q_sample_matches_marginal_statistics():
    s = Schedule.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    i = torch.full((20000,), 300)
    xt = q_sample(s, x0, i, torch.randn(x0.shape, generator=g))
    ab = s.alpha_bar[300].item()
    assert xt.mean().item() == pytest.approx(0.5 * ab ** 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.05)


def test_loss_is_zero_for_the_true_noise_predictor():
    """A model that returns the exact noise has zero loss; a zero predictor has loss ~1."""
    s = Schedule.from_config(DiffusionConfig(schedule="linear", prediction="eps"))
    loss = DiffusionLoss(s)
    x0 = torch.zeros(512, 1, 8, 8)  # x0 = 0 makes x_t = sqrt(1 - ab) * eps, so eps is known
    g = torch.Generator().manual_seed(0)

    def oracle(xt, t, y=None):
        return xt / s.sqrt_one_minus_alpha_bar[t].float().view(-1, 1, 1, 1)

    assert loss(oracle, x0, generator=g).item() < 1e-8
    zero = loss(lambda xt, t, y=None: torch.zeros_like(xt), x0, generator=g).item()
    assert zero == pytest.approx(1, abs=0.03)  # E[eps^2] = 1; std of this mean ~0.008


def test_config_round_trip_and_validation():
    c = DiffusionConfig(schedule="cosine", timesteps=500)
    assert DiffusionConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown schedule"):
        DiffusionConfig(schedule="sigmoid")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_give_increasing_timesteps_with_consistent_alpha_bar(spacing):
    full = Schedule.from_config(DiffusionConfig())
    r = full.respace(20, spacing)
    ts = r.timesteps
    assert len(r) == 20 and bool((ts[1:] > ts[:-1]).all())
    assert torch.allclose(r.alpha_bar, full.alpha_bar[ts], rtol=1e-12)
    assert ts[-1] == {"quadratic": 800}.get(spacing, 999)
    first = {"uniform": 0, "trailing": 49, "quadratic": 0, "karras": 2, "logsnr": 1}
    assert ts[0] == first[spacing]


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
def test_noise_level_spacings_follow_their_rule_and_fit_any_step_count(spacing):
    """Between the first step (from the last timestep) and the end, the kept timesteps' log
    sigma is evenly spaced (logsnr) or its sigma^(1/7) is (karras), up to rounding to a
    timestep; at any step count, even all T, the timesteps are distinct and end at T - 1."""
    full = Schedule.from_config(DiffusionConfig())
    ab = full.respace(12, spacing).alpha_bar
    log_sigma = 0.5 * ((1 - ab).log() - ab.log())
    u = log_sigma[:-1] if spacing == "logsnr" else (log_sigma[:-1] / 7).exp()
    gaps = u[1:] - u[:-1]
    assert float(gaps.max() / gaps.min()) < 1.6, gaps  # rounding to timesteps near t = 0
    for steps in (1, 2, 3, 50, 500, 999, 1000):
        ts = full.respace(steps, spacing).timesteps
        assert len(ts) == steps and ts[-1] == 999 and bool((ts[1:] > ts[:-1]).all())


@pytest.mark.parametrize("rho", [2.0, 3.0, 12.0])
def test_karras_spacing_follows_its_rho(rho):
    """Another rho keeps sigma^(1/rho) evenly spaced; a lower rho puts more steps at high
    noise (more of the kept timesteps in the upper half of the schedule)."""
    full = Schedule.from_config(DiffusionConfig())
    ab = full.respace(12, "karras", rho).alpha_bar
    u = (0.5 * ((1 - ab).log() - ab.log())[:-1] / rho).exp()
    gaps = u[1:] - u[:-1]
    assert float(gaps.max() / gaps.min()) < 1.6, gaps

    def upper(r):
        return int((full.respace(10, "karras", r).timesteps >= 500).sum())
    assert (upper(rho) > upper(7.0)) == (rho < 7.0)


def test_quadratic_spacing_is_denser_at_low_noise_and_never_repeats():
    full = Schedule.from_config(DiffusionConfig())
    q = full.respace(20, "quadratic").timesteps
    assert (q < 200).sum() > (full.respace(20).timesteps < 200).sum()
    for steps in (50, 100, 500, 1000):  # where the plain squares would repeat near t = 0
        ts = full.respace(steps, "quadratic").timesteps
        assert len(ts) == steps and bool((ts[1:] > ts[:-1]).all()) and ts[-1] <= 999
    assert full.respace(100, "quadratic").timesteps[-1] == 800
    with pytest.raises(ValueError, match="unknown spacing"):
        full.respace(10, "cubic")


def test_v_loss_is_zero_for_the_true_v_predictor():
    s = Schedule.from_config(DiffusionConfig(prediction="v"))
    x0 = torch.zeros(512, 1, 8, 8)  # x_t = sqrt(1 - ab) eps and v = sqrt(ab) eps
    g = torch.Generator().manual_seed(0)

    def oracle(xt, t, y=None):
        return xt * (s.sqrt_alpha_bar / s.sqrt_one_minus_alpha_bar)[t].float().view(-1, 1, 1, 1)

    assert DiffusionLoss(s)(oracle, x0, generator=g).item() < 1e-8
    eps_oracle = DiffusionLoss(s)(lambda xt, t, y=None: xt / s.sqrt_one_minus_alpha_bar[t]
                                  .float().view(-1, 1, 1, 1), x0, generator=g).item()
    assert eps_oracle > 0.01  # an eps answer is wrong for a v model


def test_min_snr_weights_cap_the_low_noise_steps():
    """min-SNR-5: weight min(SNR, 5) / SNR for eps (1 where SNR <= 5, 5 / SNR above), and
    min(SNR, 5) / (SNR + 1) for v."""
    for prediction, extra in (("eps", 0), ("v", 1)):
        s = Schedule.from_config(DiffusionConfig(prediction=prediction))
        w = DiffusionLoss(s, "min-snr", 5.0).weights
        snr = s.alpha_bar / (1 - s.alpha_bar)
        assert torch.allclose(w, snr.clamp(max=5) / (snr + extra))
        assert w[0] < 0.01 and w[-1] == pytest.approx(snr[-1] / (snr[-1] + extra))
    s = Schedule.from_config(DiffusionConfig(schedule="linear", prediction="eps"))
    plain, weighted = DiffusionLoss(s), DiffusionLoss(s, "min-snr")
    x0 = torch.zeros(8, 1, 4, 4)
    i = torch.tensor([0, 0, 0, 0, 999, 999, 999, 999])
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda xt, t, y=None: torch.zeros_like(xt)  # noqa: E731
    # the error at t=0 (SNR ~ 1e4) counts 5 / SNR as much; at t=999 (SNR ~ 4e-5) fully
    assert weighted(zero, x0, i=i, noise=noise) < 0.6 * plain(zero, x0, i=i, noise=noise)


def test_edm_weighting_follows_its_formula_in_the_targets_units():
    """EDM's x0-error weight (sigma^2 + sd^2) / (sigma sd)^2 becomes (sigma^2 + sd^2) /
    (sd^2 (1 + sigma^2)) on the v error and (sigma^2 + sd^2) / sd^2 on the eps error, scaled to
    mean 1 over the trained levels; with sigma_data 1, EDM's weighting of v is the plain loss."""
    for prediction in ("v", "eps"):
        s = Schedule.from_config(DiffusionConfig(prediction=prediction))
        w = DiffusionLoss(s, "edm", sigma_data=0.5).weights
        sigma2 = (1 - s.alpha_bar) / s.alpha_bar
        formula = (sigma2 + 0.25) / (0.25 * (1 + sigma2) if prediction == "v" else 0.25)
        assert torch.allclose(w / w[500], formula / formula[500])
        assert w.mean().item() == pytest.approx(1.0)  # uniform levels: mean 1 over all T
    s = Schedule.from_config(DiffusionConfig(prediction="v"))
    assert torch.allclose(DiffusionLoss(s, "edm", sigma_data=1.0).weights, torch.ones(1000,
                                                                                       dtype=torch.float64))
    lognormal = DiffusionLoss(s, "edm", levels="lognormal")
    assert (lognormal.weights * lognormal.level_probs).sum().item() == pytest.approx(1.0)


def test_lognormal_levels_draw_log_sigma_from_their_normal():
    """EDM's levels: log sigma of the drawn timesteps has the normal's mean and spread, and the
    draw is a function of the generator."""
    s = Schedule.from_config(DiffusionConfig())
    loss = DiffusionLoss(s, levels="lognormal", level_mean=-1.2, level_std=1.2)
    assert loss.level_probs.sum().item() == pytest.approx(1.0)
    i, _ = loss.draw((50_000, 1, 1, 1), "cpu", torch.Generator().manual_seed(0))
    log_sigma = 0.5 * torch.log((1 - s.alpha_bar) / s.alpha_bar)[i]
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)
    again, _ = loss.draw((50_000, 1, 1, 1), "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(i, again)
    uniform, _ = DiffusionLoss(s).draw((50_000, 1, 1, 1), "cpu", torch.Generator().manual_seed(0))
    assert 0.5 * torch.log((1 - s.alpha_bar) / s.alpha_bar)[uniform].mean() > 0  # not these


def test_diffusion_config_prediction_is_checked_and_old_configs_load():
    """New runs predict v; a config written before the field existed is a noise predictor."""
    old = {"timesteps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    assert DiffusionConfig.from_dict(old).prediction == "eps"
    assert DiffusionConfig().prediction == "v"
    assert DiffusionConfig.from_dict(DiffusionConfig().to_dict()).prediction == "v"
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="x0")
    with pytest.raises(ValueError, match="weighting"):
        DiffusionLoss(Schedule.from_config(DiffusionConfig()), "p2")
    assert Schedule.from_config(DiffusionConfig(prediction="v")).respace(10).prediction == "v"
