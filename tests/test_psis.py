"""Per-point Pareto k-hat against Pyro's psis_diagnostic and fit_generalized_pareto."""

import math

import pyro
import torch
from helpers import linear_gaussian_programs
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights
from pyro.ops.stats import fit_generalized_pareto

from ppl_vae.importance import log_likelihood_diagnostics, log_weights_of_programs
from ppl_vae.psis import LargestLogWeights, pareto_k, tail_size


def test_each_point_gets_pyros_psis_diagnostic_of_that_point_alone():
    model, _, prior_guide, x, _ = linear_gaussian_programs(sigma=0.5, n=5, seed=2)
    for i in range(5):
        one = x[i : i + 1]
        pyro.set_rng_seed(i)
        expected = psis_diagnostic(model, prior_guide, one, num_particles=1000)
        pyro.set_rng_seed(i)  # the same draws again
        lw = vectorized_importance_weights(
            model, prior_guide, one, num_samples=1000, max_plate_nesting=7
        )[0]
        assert math.isclose(pareto_k(lw[:, None]).item(), expected, abs_tol=1e-6)


def test_generalized_pareto_shapes_match_pyros_fit_row_by_row():
    g = torch.Generator().manual_seed(0)
    k, n = torch.tensor([-0.2, 0.1, 0.5, 0.9, 1.4], dtype=torch.float64), 2000
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    draws = ((1 - u) ** -k - 1) / k  # generalized Pareto(k, sigma=1) by inversion
    lw = draws.log()
    mine = pareto_k(lw)
    for j in range(5):
        col = (lw[:, j] - lw[:, j].max()).sort().values
        m = tail_size(n)
        cutoff = max(math.log(1e-15), col[-m - 1].item())
        tail = col[col > cutoff]
        assert math.isclose(
            mine[j].item(), fit_generalized_pareto(tail.exp() - math.exp(cutoff))[0], abs_tol=1e-9
        )
    assert mine[3] > 0.7 > mine[1]  # the estimates follow the true shapes


def test_the_running_tail_over_passes_is_the_tail_of_all_draws():
    lw = torch.randn(1000, 4, dtype=torch.float64)
    largest = LargestLogWeights(10)
    for chunk in lw.split(99):
        largest.add(chunk)
    assert torch.equal(largest.value, lw.topk(10, 0).values)


def test_log_likelihood_diagnostics_reports_k_hat_of_its_own_draws():
    model, _, prior_guide, x, _ = linear_gaussian_programs(sigma=0.5, n=5, seed=2)
    pyro.set_rng_seed(3)
    r = log_likelihood_diagnostics(model, prior_guide, x, num_samples=400, chunk_size=70)
    pyro.set_rng_seed(3)  # the same draws again, after the one trace that checks the sites
    log_weights_of_programs(model, prior_guide, x, num_particles=1, max_plate_nesting=1)
    lw = torch.cat([
        log_weights_of_programs(model, prior_guide, x, num_particles=c, max_plate_nesting=1)
        for c in (70,) * 5 + (50,)
    ]).double()  # fmt: skip
    assert torch.allclose(r.pareto_k, pareto_k(lw), atol=1e-9, rtol=0)
    few = log_likelihood_diagnostics(model, prior_guide, x, num_samples=40)
    assert torch.isinf(few.pareto_k).all()  # 8 tail weights: too few, as Pyro says


def test_fewer_than_eleven_draws_give_an_infinite_k_hat_not_an_error():
    # Pyro's psis_diagnostic needs 10 tail weights: below 50 draws k̂ is infinite, down to K = 1
    for k in (1, 2, 5, 10, 40):
        lw = torch.randn(k, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        assert torch.isinf(pareto_k(lw)).all(), k
