"""Annealed importance sampling and BDMC against closed forms, quadrature and importance
sampling; the refusals."""

import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import linear_gaussian_programs, quadrature

from ppl_vae.ais import annealed_log_likelihood, annealing_schedule, bdmc
from ppl_vae.errors import InputError
from ppl_vae.guides import FlowGuide, GaussianGuide
from ppl_vae.importance import log_likelihood, log_likelihood_diagnostics
from ppl_vae.model import FixedGaussianLikelihood, VAEModel
from ppl_vae.networks import MLPDecoder, MLPEncoder

F64 = torch.float64


def _standard_error(record) -> torch.Tensor:
    """The delta-method standard error of log mean_c w_c, sqrt((C / ESS - 1) / C), per point."""
    return ((record.num_chains / record.ess - 1) / record.num_chains).sqrt()


@pytest.mark.parametrize("schedule", ["sigmoid", "geometric"])
def test_exact_posterior_guide_gives_the_closed_form_at_every_step(schedule):
    """With q(z|x) = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z: every chain's
    weight is log p(x) exactly, whatever HMC does."""
    model, guide, _, x, exact = linear_gaussian_programs()
    r = annealed_log_likelihood(
        model, guide, x, num_chains=4, num_steps=20, schedule=schedule, diagnostics=True
    )
    assert r.log_px.shape == (6,) and r.log_px.dtype == F64
    assert torch.allclose(r.log_px, exact, atol=1e-9, rtol=0)
    assert torch.allclose(r.log_weight_variance, torch.zeros(6, dtype=F64), atol=1e-12)
    assert torch.allclose(r.ess, torch.full((6,), 4.0, dtype=F64))


def test_one_step_is_importance_sampling_with_the_same_draws():
    model, _, guide, x, _ = linear_gaussian_programs()
    pyro.set_rng_seed(5)
    ais = annealed_log_likelihood(model, guide, x, num_chains=8, num_steps=1)
    pyro.set_rng_seed(5)
    assert torch.allclose(ais, log_likelihood(model, guide, x, num_samples=8), atol=1e-12, rtol=0)


def test_from_the_prior_the_error_shrinks_as_chains_and_steps_grow():
    """Linear-Gaussian, d = 4, latent 2, sigma 0.7: the posterior sd is about 0.2 against the
    prior's 1. The largest setting must lie within 4 standard errors (the chains' own, by the
    delta method) and 0.15 nats of the closed form at every point."""
    model, _, guide, x, exact = linear_gaussian_programs()
    errors = []
    for chains, steps in ((4, 1), (8, 30), (32, 400)):
        pyro.set_rng_seed(0)
        r = annealed_log_likelihood(
            model, guide, x, num_chains=chains, num_steps=steps, leapfrog_steps=3,
            diagnostics=True,
        )  # fmt: skip
        errors.append((r.log_px - exact).abs())
    means = [e.mean().item() for e in errors]
    assert means[0] > means[1] > means[2], means
    assert (errors[-1] < 4 * _standard_error(r) + 1e-6).all(), (errors[-1], _standard_error(r))
    assert errors[-1].max() < 0.15, errors[-1]


def test_bdmc_brackets_the_exact_log_likelihood_of_simulated_points():
    """Forward AIS is low and reverse AIS high in expectation; each is a log-mean-exp over C
    chains, so a single run may cross by its sampling error: sqrt(var(log w) / C) per point
    (the chains' weights are near log-normal here). The bounds must hold within 3 of those,
    per point and on average, and the gap must be small at this length."""
    model, _, guide, x, _ = linear_gaussian_programs()
    pyro.set_rng_seed(1)
    r = bdmc(model, guide, 8, like=x, num_chains=16, num_steps=200, leapfrog_steps=3)
    assert r.x.shape == (8, 4) and r.latents["z"].shape == (8, 2)
    exact = model.marginal.log_prob(r.x)
    se_lower = (r.forward_log_weights.var(0) / 16).sqrt()
    se_upper = (r.reverse_log_weights.var(0) / 16).sqrt()
    assert (r.lower <= exact + 3 * se_lower).all(), (r.lower - exact, se_lower)
    assert (r.upper >= exact - 3 * se_upper).all(), (r.upper - exact, se_upper)
    assert r.gap.mean() < 0.3, r.gap
    n = len(exact)  # on average over the points, the noise is sqrt(mean se^2 / N)
    assert r.lower.mean() <= exact.mean() + 3 * (se_lower.pow(2).mean() / n).sqrt()
    assert r.upper.mean() >= exact.mean() - 3 * (se_upper.pow(2).mean() / n).sqrt()


def _squared(z):
    return torch.stack([z[..., 0] ** 2, z[..., 1]], -1)


def test_bimodal_posterior_matches_quadrature():
    """x | z ~ N((z1^2, z2), 0.3^2): for x1 = 2 the posterior has two modes, z1 near +1.4 and
    -1.4, about 0.1 wide. Chains started from the prior settle in either; the weights share
    the mass between them. Tolerance: 4 standard errors (about 0.03 each) and 0.12 nats."""
    sigma = 0.3

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(_squared(z), sigma).to_event(1), obs=x)

    def prior(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 2, dtype=x.dtype), 1.0).to_event(1))

    x = torch.tensor([[2.0, 0.5], [1.0, -1.0], [3.0, 0.0]], dtype=F64)
    exact = quadrature(x, half_width=5.0, n=1001, decoder=_squared, sigma=sigma)[0]
    pyro.set_rng_seed(0)
    r = annealed_log_likelihood(
        model, prior, x, num_chains=256, num_steps=300, leapfrog_steps=3, diagnostics=True
    )
    err = (r.log_px - exact).abs()
    assert (err < 4 * _standard_error(r) + 1e-6).all() and err.max() < 0.12, err


def test_two_latent_sites_from_the_prior():
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 0.5^2), so p(x) = N(0, 2.25).
    Tolerance: 4 standard errors (at most about 0.05) and 0.15 nats."""

    def model(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 0.5), obs=x)

    def prior(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("z2", dist.Normal(z1, 1.0))

    x = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.5, 4.0], dtype=F64)
    pyro.set_rng_seed(0)
    r = annealed_log_likelihood(model, prior, x, num_chains=64, num_steps=200, diagnostics=True)
    exact = dist.Normal(0.0, 1.5).log_prob(x)
    err = (r.log_px - exact).abs()
    assert (err < 4 * _standard_error(r) + 1e-6).all() and err.max() < 0.15, err


def test_a_positive_latent_moves_in_unconstrained_space():
    """rate ~ Gamma(a, b), x ~ Poisson(rate): p(x) is the negative binomial. HMC moves log rate
    (biject_to) with its log-Jacobian; from the prior, no proposal leaves the support.
    Tolerance: 4 standard errors (at most about 0.03) and 0.1 nats."""
    a, b = 2.5, 0.7
    x = torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=F64)

    def model(x):
        with pyro.plate("data", len(x)):
            rate = pyro.sample("rate", dist.Gamma(torch.full((len(x),), a, dtype=F64), b))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def prior(x):
        with pyro.plate("data", len(x)):
            pyro.sample("rate", dist.Gamma(torch.full((len(x),), a, dtype=F64), b))

    exact = (
        torch.lgamma(a + x) - math.lgamma(a) - torch.lgamma(x + 1)
        + a * math.log(b / (b + 1)) - x * math.log(b + 1)
    )  # fmt: skip
    pyro.set_rng_seed(0)
    r = annealed_log_likelihood(model, prior, x, num_chains=256, num_steps=200, diagnostics=True)
    err = (r.log_px - exact).abs()
    assert (err < 4 * _standard_error(r) + 1e-6).all() and err.max() < 0.1, err
    assert (r.acceptance > 0.4).all(), r.acceptance


def test_the_step_size_adapts_toward_the_target_acceptance():
    """With the exact posterior as the guide every tempered target is the posterior, so the
    step size has one right value: from 0.001 and from 3 it goes to the same place (within the
    scatter of the multiplicative updates), and a run started there accepts 65% of proposals
    on average; held fixed, the step size stays as given."""
    model, guide, _, x, _ = linear_gaussian_programs()
    found = []
    for start in (1e-3, 3.0):
        r = annealed_log_likelihood(
            model, guide, x, num_chains=16, num_steps=150, leapfrog_steps=3, step_size=start,
            diagnostics=True,
        )  # fmt: skip
        found.append(r.step_size)
    assert ((found[0] / found[1]).log().abs() < math.log(1.5)).all(), found
    again = annealed_log_likelihood(
        model, guide, x, num_chains=16, num_steps=150, leapfrog_steps=3,
        step_size=found[0].mean().item(), diagnostics=True,
    )  # fmt: skip
    assert ((again.acceptance - 0.65).abs() < 0.05).all(), again.acceptance
    fixed = annealed_log_likelihood(
        model, guide, x, num_chains=2, num_steps=3, step_size=0.2, target_acceptance=None,
        diagnostics=True,
    )  # fmt: skip
    assert torch.equal(fixed.step_size, torch.full((6,), 0.2, dtype=F64))


def test_log_weights_accumulate_in_float64():
    """A factor of -1e7 per point: each step adds a fraction of -1e7 + log p(x); in float32
    the 100 partial sums would be off by whole nats, in float64 by about 1e-8."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            pyro.factor("offset", torch.full((len(x),), -1e7, dtype=F64))

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))  # the exact posterior

    x = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    est = annealed_log_likelihood(model, guide, x, num_chains=2, num_steps=100)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x) - 1e7
    assert est.dtype == F64
    assert torch.allclose(est, exact, atol=1e-6, rtol=0), est - exact


def test_chunks_give_the_same_answer_as_one_pass_for_the_same_seed():
    """The passes draw from the guide one after the other and share each step's momenta and
    uniforms, so they take the same numbers as one pass (torch's CPU normal sampler works in
    blocks of 16 numbers: each pass's draws, 4 or 12 chains x 6 points x 2, are whole blocks)."""
    model, _, guide, x, _ = linear_gaussian_programs()
    results = []
    for chunk in (16, 4, 12):
        pyro.set_rng_seed(3)
        results.append(
            annealed_log_likelihood(model, guide, x, num_chains=16, num_steps=20, chunk_size=chunk)
        )
    assert torch.allclose(results[0], results[1], atol=1e-10, rtol=0)
    assert torch.allclose(results[0], results[2], atol=1e-10, rtol=0)  # passes of 12 and 4


def test_progress_counts_the_annealing_steps():
    model, _, guide, x, _ = linear_gaussian_programs()
    seen = []
    annealed_log_likelihood(model, guide, x, num_chains=2, num_steps=5, progress=seen.append)
    assert seen == [1, 2, 3, 4, 5]
    seen.clear()
    bdmc(model, guide, 3, like=x, num_chains=2, num_steps=4, progress=seen.append)
    assert seen == list(range(1, 9))


def _tiny_vae(sigma=0.5):
    torch.manual_seed(0)
    model = VAEModel(MLPDecoder(2, [3], [8], "tanh"), FixedGaussianLikelihood([3], sigma), 2, [3])
    return model, GaussianGuide(MLPEncoder([3], [8], "tanh"), 2)


def test_an_untrained_vae_matches_quadrature_and_importance_sampling_at_large_k():
    """A float32 VAE with z of dimension 2 (untrained, so its guide is poor), points drawn from
    it; log p(x) by quadrature on a grid in float64. AIS from the guide must lie within 4 of
    its standard errors (about 0.02 each) and 0.1 nats of it, and agree with importance
    sampling from the prior at K = 20,000 (bounded weights, so its delta-method error holds)
    within 4 combined errors.
    (Importance sampling from this guide scatters by up to 0.2 nats at that K: its weights
    are heavy-tailed.)"""
    model, guide = _tiny_vae()
    x = model.sample(5, mean=False)
    t = torch.linspace(-6.0, 6.0, 801, dtype=F64)
    z = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 1, 2)
    with torch.no_grad():
        decoder = copy.deepcopy(model).double()
        log_joint = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + decoder.observation(z).log_prob(x)
    exact = torch.logsumexp(log_joint, 0) + 2 * (t[1] - t[0]).log()
    pyro.set_rng_seed(0)
    r = annealed_log_likelihood(model, guide, x, num_chains=64, num_steps=200, diagnostics=True)
    assert r.log_px.shape == (5,) and r.log_px.dtype == F64 and torch.isfinite(r.log_px).all()
    err = (r.log_px - exact).abs()
    assert (err < 4 * _standard_error(r) + 1e-6).all() and err.max() < 0.1, err

    def prior(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", model.prior(x.shape[:1]))

    is_ = log_likelihood_diagnostics(model, prior, x, num_samples=20000)
    is_se = ((20000 / is_.ess - 1) / 20000).sqrt()
    bound = 4 * (is_se**2 + _standard_error(r) ** 2).sqrt()
    assert ((is_.log_px - r.log_px).abs() < bound).all(), (is_.log_px - r.log_px, bound)


def test_bdmc_on_a_vae_simulates_points_of_its_shape_dtype_and_device():
    model, guide = _tiny_vae()
    r = bdmc(model, guide, 4, num_chains=2, num_steps=5)
    assert r.x.shape == (4, 3) and r.x.dtype == torch.float32
    assert r.lower.shape == r.upper.shape == (4,) and torch.isfinite(r.gap).all()


def test_discrete_latents_sites_outside_the_plate_and_bad_options_are_refused():
    def discrete(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(torch.full((len(x),), 0.5)))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    x = torch.zeros(3)
    with pytest.raises(InputError, match="the model's latent site 'c' is discrete \\(Bernoulli"):
        annealed_log_likelihood(discrete, discrete_guide, x, num_steps=2)

    def global_model(x):
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    def global_guide(x):
        pyro.sample("s", dist.Normal(0.0, 1.0))

    with pytest.raises(InputError, match="site 's' lies outside the plate 'data'"):
        annealed_log_likelihood(global_model, global_guide, x, num_steps=2)
    model, _, guide, x, _ = linear_gaussian_programs()
    for option, message in [
        ({"num_chains": 0}, "num_chains must be a positive integer, got 0"),
        ({"num_steps": 2.5}, "num_steps must be a positive integer, got 2.5"),
        ({"step_size": -1.0}, "step_size must be a positive number"),
        ({"target_acceptance": 1.0}, r"target_acceptance must lie in \(0, 1\)"),
        ({"schedule": "linear"}, "schedule must be one of \\['geometric', 'sigmoid'\\]"),
    ]:
        with pytest.raises(InputError, match=message):
            annealed_log_likelihood(model, guide, x, **option)
    with pytest.raises(InputError, match="pass like=<a tensor of points>"):
        bdmc(model, guide, 3)


def discrete_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("c", dist.Bernoulli(torch.full((len(x),), 0.5)))


def test_a_guide_without_a_density_away_from_its_draws_is_refused_in_z_space():
    """In z space a planar flow has no density away from its draws; by default a flow guide
    is annealed in its base space instead (tests/test_basespace.py), where it needs none."""
    model, _ = _tiny_vae()
    guide = FlowGuide(MLPEncoder([3], [8], "tanh"), 2, flow="planar", flow_length=2)
    with pytest.raises(InputError, match="guide's density cannot be evaluated at latents"):
        annealed_log_likelihood(model, guide, torch.zeros(4, 3), num_steps=2, base_space=False)
    assert annealed_log_likelihood(model, guide, torch.zeros(4, 3), num_steps=2).isfinite().all()


def test_schedules_rise_from_zero_to_one():
    for name in ("sigmoid", "geometric"):
        betas = annealing_schedule(name, 50)
        assert betas.shape == (51,) and betas[0] == 0 and betas[-1] == 1
        assert (betas.diff() > 0).all()
    assert torch.equal(annealing_schedule("geometric", 1), torch.tensor([0.0, 1.0], dtype=F64))
    assert annealing_schedule("geometric", 4)[1].item() == pytest.approx(1e-3)


@pytest.mark.cuda
def test_ais_and_bdmc_run_on_the_device_of_the_points():
    model, guide = _tiny_vae()
    model, guide = model.cuda(), guide.cuda()
    x = torch.randn(4, 3, device="cuda")
    est = annealed_log_likelihood(model, guide, x, num_chains=4, num_steps=10)
    assert est.device == x.device and torch.isfinite(est).all()
    r = bdmc(model, guide, 4, num_chains=4, num_steps=10)
    assert r.x.device == x.device and torch.isfinite(r.gap).all()


def _gamma_poisson():
    def model(x):
        with pyro.plate("data", len(x)):
            rate = pyro.sample("rate", dist.Gamma(torch.full((len(x),), 2.5, dtype=F64), 0.7))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def prior(x):
        with pyro.plate("data", len(x)):
            pyro.sample("rate", dist.Gamma(torch.full((len(x),), 2.5, dtype=F64), 0.7))

    return model, prior, torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=F64)


@pytest.mark.parametrize("case", ["vae", "positive latent", "bdmc"])
def test_recorded_evaluations_give_the_programs_estimates(case, monkeypatch):
    """With ``capture`` (the default) each pass's evaluation of both programs, gradients
    included, is recorded once per shape and replayed: the same estimates as running the
    programs at every leapfrog step, from the same seed, to float rounding; the programs then
    run only to be recorded (twice per shape: once as themselves, once traced)."""
    from ppl_vae.hmc import Target

    calls, evaluate = [], Target._evaluate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Target, "_evaluate", counted)
    if case in ("vae", "bdmc"):
        model, guide = _tiny_vae()
        x = model.sample(5, mean=False)
    else:
        model, guide, x = _gamma_poisson()
    results = {}
    for capture in (False, True):
        calls.clear()
        pyro.set_rng_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a record refused would warn
            if case == "bdmc":
                r = bdmc(model, guide, 4, num_chains=4, num_steps=30, chunk_size=2, capture=capture)
                results[capture] = torch.stack([r.lower, r.upper])
            else:
                results[capture] = annealed_log_likelihood(
                    model, guide, x, num_chains=8, num_steps=30, chunk_size=4, capture=capture
                )
        results[capture, "calls"] = len(calls)
    assert torch.allclose(results[True], results[False], rtol=0, atol=1e-9), results
    assert results[False, "calls"] > 100 and results[True, "calls"] <= 4
