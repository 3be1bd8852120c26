"""AIS for flow guides in the flow's base space: the same log p(x) as in z space, a closed form
for flows that have no inverse, and the inference gaps of a flow guide."""

import warnings

import pyro
import pytest
import torch
from helpers import Flatten, MeanField

from ppl_vae.ais import annealed_log_likelihood, bdmc
from ppl_vae.basespace import in_base_space, is_flow_guide
from ppl_vae.errors import InputError
from ppl_vae.gaps import inference_gaps
from ppl_vae.guides import FlowGuide


def flow_guide(case: MeanField, flow: str, seed: int = 0) -> FlowGuide:
    torch.manual_seed(seed)
    guide = FlowGuide(Flatten(4), case.latent, flow=flow, flow_length=2).double()
    with torch.no_grad():  # the base is the best mean-field Gaussian: a good start for AIS
        guide.head.weight.copy_(case.guide.head.weight)
        guide.head.bias.copy_(case.guide.head.bias)
        for p in guide.steps.parameters():  # steps that bend q, but not out of recognition
            p.mul_(0.3)
    return guide


def test_one_step_equals_importance_sampling_in_z_space():
    """With one annealing step AIS is importance sampling; in base space its weights are
    p(x, T(eps)) |det| / b(eps) = p(x, z) / q(z|x) for the same draws, so an invertible flow
    (iaf) gives the z-space estimate to rounding."""
    case = MeanField()
    guide = flow_guide(case, "iaf")
    out = {}
    for base in (True, False):
        pyro.set_rng_seed(0)
        # in z space q(z|x) inverts the IAF, a loop over its permutation's entries that make_fx
        # cannot trace (Pyro's AffineAutoregressive._inverse indexes a list by them): the
        # annealing runs through Pyro and says so; in base space no inverse is needed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[base] = annealed_log_likelihood(
                case.model, guide, case.x, num_chains=64, num_steps=1, base_space=base
            )
        untraced = [w for w in caught if "could not be traced" in str(w.message)]
        assert len(untraced) == (0 if base else 1), [str(w.message) for w in caught]
    assert torch.allclose(out[True], out[False], atol=1e-9, rtol=0)
    assert not torch.allclose(out[True], case.log_px, atol=1e-3)  # IS with 64 draws: not exact


@pytest.mark.parametrize("flow", ["planar", "sylvester"])
def test_ais_of_a_flow_without_inverse_reaches_the_closed_form(flow):
    case = MeanField(seed=1)
    guide = flow_guide(case, flow, seed=1)
    assert is_flow_guide(guide, case.x) and not is_flow_guide(case.guide, case.x)
    pyro.set_rng_seed(1)
    r = annealed_log_likelihood(
        case.model, guide, case.x, num_chains=64, num_steps=200, diagnostics=True
    )
    error = r.log_px - case.log_px
    # 64 chains x 200 steps: about 0.03 nats of noise per point (512 chains: within 0.035 of
    # the closed form on every point, the mean log-weight below it, as a lower bound's is)
    assert abs(error.mean()) < 0.04 and error.abs().max() < 0.12, error
    assert (r.acceptance > 0.4).all()
    with pytest.raises(InputError, match="without an inverse|cannot be evaluated"):
        annealed_log_likelihood(case.model, guide, case.x, num_steps=2, base_space=False)


def test_the_gaps_of_a_flow_guide():
    """q* frees the base Gaussian and the steps' context per point: it starts at the encoder's
    q, so it can only gain, and it stays below log p(x)."""
    case = MeanField(seed=2)
    guide = flow_guide(case, "planar", seed=2)
    with torch.no_grad():  # a worse encoder than the mean-field optimum: a gap to close
        guide.head.weight[: case.latent] *= 0.8
    pyro.set_rng_seed(2)
    r = inference_gaps(case.model, guide, case.x, log_px=case.log_px, standard_error=0.02)
    se = (r["elbo_standard_error"] ** 2 + r["elbo_optimal_standard_error"] ** 2).sqrt()
    assert (r["amortization_gap"] > -3 * se).all() and r["amortization_gap"].mean() > 0.05
    assert (r["approximation_gap"] > -3 * r["elbo_optimal_standard_error"]).all()
    # the base alone can reach the best mean-field Gaussian, whose gap is known: q* is at
    # least about as good (the steps can only add, within the fit's noise)
    assert (r["approximation_gap"] < case.gap() + 0.05).all()


def test_refusals():
    case = MeanField()
    model, guide = in_base_space(case.model, case.guide)
    with pytest.raises(InputError, match="needs a flow guide"):
        annealed_log_likelihood(model, guide, case.x, num_steps=2, base_space=False)


def test_bdmc_of_an_invertible_flow_brackets_the_exact_value():
    """Reverse chains start at T^{-1}(z) of the simulated z; the two bounds bracket the
    closed form of the simulated points, and their gap is small on this easy posterior."""
    case = MeanField(seed=3)
    guide = flow_guide(case, "iaf", seed=3)
    pyro.set_rng_seed(3)
    r = bdmc(case.model, guide, 8, num_chains=16, num_steps=200)
    exact = case.marginal.log_prob(r.x)
    # as in test_ais: each bound on its side within 3 of its sampling errors, the gap small
    se_lower = (r.forward_log_weights.var(0) / 16).sqrt()
    se_upper = (r.reverse_log_weights.var(0) / 16).sqrt()
    assert (r.lower <= exact + 3 * se_lower).all(), (r.lower - exact, se_lower)
    assert (r.upper >= exact - 3 * se_upper).all(), (r.upper - exact, se_upper)
    assert r.gap.mean() < 0.3 and (r.upper - exact).abs().max() < 0.3, r.gap
    planar = flow_guide(case, "planar", seed=3)
    with pytest.raises(InputError, match="no inverse"):
        bdmc(case.model, planar, 4, num_chains=2, num_steps=4)
