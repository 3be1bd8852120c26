"""The inference gaps against the linear-Gaussian closed forms: the best mean-field Gaussian,
the amortized ELBO of a deliberately bad encoder, and the refusals."""

import pyro
import pytest
import torch
from helpers import Flatten, MeanField

from ppl_vae.ais import annealed_log_likelihood
from ppl_vae.errors import InputError
from ppl_vae.gaps import PointFit, elbo_per_point, fit_point_guide, inference_gaps
from ppl_vae.guides import FullRankGaussianGuide

KEYS = {"log_px", "elbo", "elbo_optimal", "approximation_gap", "amortization_gap"}


def bad_encoder(case: MeanField):
    """A guide whose means are 0.8 of the posterior's and scales 1.2 times the best ones."""
    gain, scale = 0.8 * case.gain, 1.2 * case.scale
    case.set_guide(gain, scale)
    return gain, scale


def test_gaps_match_the_closed_forms_for_a_bad_encoder():
    pyro.set_rng_seed(0)
    case = MeanField()
    gain, scale = bad_encoder(case)
    r = inference_gaps(case.model, case.guide, case.x, log_px=case.log_px)
    assert set(r) >= KEYS and all(v.shape == (8,) and v.dtype == torch.float64 for v in r.values())
    # the Monte Carlo ELBOs are aimed at a standard error of 0.01 nats
    assert (r["elbo_standard_error"] <= 0.01).all() and (
        r["elbo_optimal_standard_error"] < 0.011
    ).all()
    optimal = case.log_px - case.gap()
    amortized = case.guide_elbo(gain, scale)
    # tolerances: 4 standard errors of the estimate (0.04 nats), the fit's own error far below
    assert torch.allclose(r["elbo"], amortized, atol=0.04, rtol=0)
    assert torch.allclose(r["elbo_optimal"], optimal, atol=0.04, rtol=0)
    assert torch.allclose(
        r["approximation_gap"], torch.full((8,), case.gap(), dtype=torch.float64), atol=0.04, rtol=0
    )
    assert torch.allclose(r["amortization_gap"], optimal - amortized, atol=0.06, rtol=0)
    assert (r["amortization_gap"] > 0.05).all() and case.gap() > 0.1  # both gaps are real here
    assert torch.equal(r["approximation_gap"], r["log_px"] - r["elbo_optimal"])
    assert torch.equal(r["amortization_gap"], r["elbo_optimal"] - r["elbo"])


def test_the_best_encoder_has_no_amortization_gap():
    pyro.set_rng_seed(1)
    case = MeanField(seed=1)
    r = inference_gaps(case.model, case.guide, case.x, log_px=lambda m, g, x: case.log_px)
    assert r["amortization_gap"].abs().max() < 0.04
    assert torch.allclose(r["elbo"], case.log_px - case.gap(), atol=0.04, rtol=0)


def test_the_fitted_means_and_scales_are_the_mean_field_optimum():
    pyro.set_rng_seed(2)
    case = MeanField(seed=2)
    bad_encoder(case)
    point, steps, converged = fit_point_guide(case.model, case.guide, case.x)
    assert converged and steps < PointFit().max_steps
    q = point.distribution().base_dist
    mean = (case.x - case.b) @ case.gain.T
    assert torch.allclose(q.loc.detach(), mean, atol=0.03, rtol=0)
    assert torch.allclose(q.scale.detach(), case.scale.expand(8, -1), atol=0.03, rtol=0)


def test_a_full_rank_guide_closes_the_approximation_gap():
    """Started from the best mean-field Gaussian, the full-rank q* is the exact posterior: the
    amortization gap is the mean-field gap and the approximation gap vanishes."""
    pyro.set_rng_seed(3)
    case = MeanField(seed=3, n=4)
    guide = FullRankGaussianGuide(Flatten(4), 3).double()
    with torch.no_grad():  # the mean-field guide's loc and scales; correlations 0 (as built)
        guide.head.load_state_dict(case.guide.head.state_dict())
    assert not guide.shear.weight.any() and not guide.shear.bias.any()
    r = inference_gaps(case.model, guide, case.x, log_px=case.log_px)
    assert r["approximation_gap"].abs().max() < 0.04
    assert torch.allclose(r["amortization_gap"], torch.full_like(r["elbo"], case.gap()), atol=0.04)


def test_the_number_of_draws_follows_the_measured_variance():
    pyro.set_rng_seed(4)
    case = MeanField(seed=4)
    bad_encoder(case)
    coarse = elbo_per_point(case.model, case.guide, case.x, standard_error=0.1)
    fine = elbo_per_point(case.model, case.guide, case.x, standard_error=0.02)
    assert 20 < fine.num_draws / coarse.num_draws < 30  # (0.1 / 0.02)^2 = 25, up to the pilot
    assert fine.standard_error.max() < 0.022


def test_the_cap_on_draws_and_on_steps_warn():
    pyro.set_rng_seed(5)
    case = MeanField(seed=5)
    bad_encoder(case)
    with pytest.warns(UserWarning, match="max_draws=200"):
        elbo_per_point(case.model, case.guide, case.x, standard_error=1e-3, max_draws=200)
    with pytest.warns(UserWarning, match="max_steps=3"):
        inference_gaps(
            case.model, case.guide, case.x, log_px=case.log_px, standard_error=0.5,
            fit=PointFit(max_steps=3),
        )  # fmt: skip


def test_refusals():
    case = MeanField()

    def plain_guide(x):  # a Pyro guide with no family to optimize
        return case.guide(x)

    with pytest.raises(InputError, match="function does not"):
        inference_gaps(case.model, plain_guide, case.x, log_px=case.log_px)
    with pytest.raises(InputError, match=r"log_px must have shape \(8,\)"):
        inference_gaps(case.model, case.guide, case.x, log_px=case.log_px[:3], standard_error=1)
    with pytest.raises(InputError, match="num_particles must be a positive integer"):
        PointFit(num_particles=0)
    with pytest.raises(InputError, match="dtype"):
        inference_gaps(case.model, case.guide, case.x.float(), log_px=case.log_px)


def test_log_px_by_ais_by_default_matches_the_closed_form():
    case = MeanField()
    bad_encoder(case)
    pyro.set_rng_seed(0)
    r = inference_gaps(case.model, case.guide, case.x, standard_error=0.05, num_steps=100)
    pyro.set_rng_seed(0)  # the same draws: log p(x) is AIS's, taken first, with these settings
    ais = annealed_log_likelihood(case.model, case.guide, case.x, num_steps=100)
    assert torch.equal(r["log_px"], ais)
    # and near the closed form: 16 chains leave about 0.1 nats of noise per point (AIS's own
    # accuracy is tested in test_ais.py), so the mean over 8 points within 0.06, each within 0.3
    error = r["log_px"] - case.log_px
    assert abs(error.mean()) < 0.06 and error.abs().max() < 0.3
