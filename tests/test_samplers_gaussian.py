"""Samplers driven by the exact noise predictor of a known Gaussian must recover it.

For data x0 ~ N(mu, s^2) (per pixel), x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and the ideal
predictor is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
"""

import pytest
import torch

from minidiff.diffusion import DiffusionConfig, Schedule
from minidiff.samplers import SAMPLERS, sample_ddim, sample_ddpm

MU, S, N = 0.2, 0.3, 20000
FULL = Schedule.from_config(DiffusionConfig(schedule="linear", prediction="eps"))


def oracle(x, t, y=None):
    ab = FULL.alpha_bar[t].float().view(-1, 1, 1, 1)
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)


def noise(seed=0):
    return torch.randn(N, 1, 1, 1, generator=torch.Generator().manual_seed(seed))


def run(name, steps, **kw):
    g = torch.Generator().manual_seed(1)
    return SAMPLERS[name](oracle, noise(), FULL.respace(steps), generator=g, clip_denoised=False,
                          **kw)


# Deterministic samplers transport the fixed noise z; their exact target is mu + S * z, whose
# sample statistics we know, so the check is free of sampling noise.
Z = noise()
EXACT_MEAN, EXACT_STD = MU + S * Z.mean().item(), S * Z.std().item()


@pytest.mark.parametrize("name,steps,kw,tol", [
    ("ddpm", 1000, {}, 0.01), ("ddpm", 200, {}, 0.02), ("ddim", 1000, {"eta": 1.0}, 0.01),
    ("dpmpp-sde", 1000, {}, 0.005), ("dpmpp-sde", 200, {}, 0.015),
])
def test_stochastic_samplers_recover_mean_and_std(name, steps, kw, tol):
    out = run(name, steps, **kw)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=tol)


@pytest.mark.parametrize("name,steps,kw,tol", [
    ("ddim", 400, {"eta": 0.0}, 0.006), ("dpmpp", 200, {}, 0.003), ("dpmpp", 100, {}, 0.01),
])
def test_deterministic_samplers_transport_noise_to_the_gaussian(name, steps, kw, tol):
    out = run(name, steps, **kw)
    assert out.mean().item() == pytest.approx(EXACT_MEAN, abs=0.005)
    assert out.std().item() == pytest.approx(EXACT_STD, abs=tol)


def test_convergence_orders():
    """Halving the step size halves DDIM's error (first order), cuts DPM-Solver++(2M)'s by
    more than four (second order) and UniPC-2's by more than six (its corrector adds an order:
    ~8 in the limit): a wrong coefficient would break a ratio."""
    err = {(n, k): abs(run(n, k).std().item() - EXACT_STD) for n in ("ddim", "dpmpp", "unipc")
           for k in (80, 160)}
    assert 1.5 < err["ddim", 80] / err["ddim", 160] < 2.5, err
    assert 4 < err["dpmpp", 80] / err["dpmpp", 160] < 6, err
    assert err["unipc", 80] > 6 * err["unipc", 160], err
    assert err["unipc", 160] < err["dpmpp", 160], err


def test_unipc_predictor_alone_is_dpmpp_2m():
    """UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M)'s update: the two differ only by the
    corrector, so on one step (no point to correct yet, then straight to x0) they agree, and on
    more steps they differ."""
    x = noise()[:500]
    for steps, same in ((1, True), (2, True), (10, False)):
        a = SAMPLERS["unipc"](oracle, x, FULL.respace(steps), clip_denoised=False)
        b = SAMPLERS["dpmpp"](oracle, x, FULL.respace(steps), clip_denoised=False)
        assert torch.allclose(a, b, atol=1e-6) == same, steps


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
def test_noise_level_spacings_cut_the_few_step_error(spacing):
    """Spacing the 8 steps by noise level (Karras rho 7, or even in log-SNR) resolves the low
    noise where this narrow Gaussian is decided: DPM-Solver++(2M)'s error falls by more than
    five against uniform timesteps."""
    def err(sp):
        out = SAMPLERS["dpmpp"](oracle, Z, FULL.respace(8, sp), clip_denoised=False)
        return abs(out.std().item() - EXACT_STD)

    assert err(spacing) < 0.2 * err("uniform")


def test_ddim_with_eta_one_and_all_steps_is_ddpm():
    """Same noise, same path: DDIM(eta=1) over all T steps is DDPM with beta-tilde variance."""
    a = sample_ddpm(oracle, noise(), FULL, generator=torch.Generator().manual_seed(2),
                    clip_denoised=False)
    b = sample_ddim(oracle, noise(), FULL, generator=torch.Generator().manual_seed(2),
                    clip_denoised=False, eta=1.0)
    assert torch.allclose(a, b, atol=1e-4)


def test_deterministic_samplers_ignore_the_generator():
    x = noise()[:100]
    for name in ("ddim", "dpmpp"):
        a = SAMPLERS[name](oracle, x, FULL.respace(10), generator=torch.Generator().manual_seed(0))
        b = SAMPLERS[name](oracle, x, FULL.respace(10), generator=torch.Generator().manual_seed(9))
        assert torch.equal(a, b)


def test_quadratic_spacing_cuts_the_few_step_error():
    """Uniform spacing under-resolves low noise, where this narrow Gaussian is decided."""
    def err(spacing):
        out = sample_ddim(oracle, Z, FULL.respace(20, spacing), clip_denoised=False)
        return abs(out.std().item() - EXACT_STD)

    assert err("quadratic") < 0.5 * err("uniform")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_recovers_the_gaussian(name):
    """Any registered sampler, at 250 steps, lands on the data distribution's mean and std."""
    out = run(name, 250)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.02)


FULL_V = Schedule.from_config(DiffusionConfig(schedule="linear", prediction="v"))


def v_oracle(x, t, y=None):
    """The same ideal denoiser, parameterised as v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    ab = FULL.alpha_bar[t].float().view(-1, 1, 1, 1)
    eps = oracle(x, t)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reads_v_prediction_like_eps(name):
    """A v-predicting network is sampled through the schedule's eps_x0: the same denoiser in
    either parameterisation gives the same samples, on the same noise and generator."""
    x = noise()[:2000]
    a = SAMPLERS[name](oracle, x, FULL.respace(20), generator=torch.Generator().manual_seed(3))
    b = SAMPLERS[name](v_oracle, x, FULL_V.respace(20),
                       generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert b.mean().item() == pytest.approx(MU, abs=0.03)
