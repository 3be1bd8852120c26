"""The Bernoulli mixture: known components, the MAP step in closed form, images, samples."""

import math
import warnings

import pytest
import torch

from ppl_vae.mixture import BernoulliMixture, ConvergenceWarning

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore::ppl_vae.mixture.ConvergenceWarning")


def binary_components(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((3, 24), 0.05, dtype=F64)
    for k in range(3):
        probs[k, 8 * k : 8 * k + 8] = 0.9
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    x = torch.bernoulli(probs[z], generator=g)
    x[:, -1] = 0  # a pixel that is never on
    return x, probs, weights


def test_bernoulli_mixture_recovers_known_components():
    x, probs, weights = binary_components()
    bm = BernoulliMixture(3, seed=0).fit(x)
    order = bm.means_[:, :24:8].argmax(0)  # component k is on over pixels 8k..8k+7
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(bm.weights_[order], weights, atol=0.03)
    assert torch.allclose(bm.means_[order, :-1], probs[:, :-1], atol=0.04)
    assert torch.equal(bm.predict(x[:3]), bm.predict_proba(x[:3]).argmax(1))


def test_bernoulli_map_step_keeps_probabilities_inside_zero_one_in_closed_form():
    x, _, _ = binary_components()
    alpha = 0.5
    bm = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=20, seed=0).fit(x)
    assert ((bm.means_ > 0) & (bm.means_ < 1)).all()
    # the pixel never on: MAP estimate alpha / (N_k + 2 alpha), with N_k from the last E-step
    n_k = bm.weights_ * len(x)
    assert torch.allclose(bm.means_[:, -1], alpha / (n_k + 2 * alpha), rtol=1e-6)
    # one component: one step gives the closed form (sum_n x + alpha) / (N + 2 alpha)
    one = BernoulliMixture(1, alpha=alpha, tol=0, max_iter=1).fit(x)
    p = (x.sum(0) + alpha) / (len(x) + 2 * alpha)
    assert torch.allclose(one.means_[0], p, rtol=1e-12)
    hand = (x * p.log() + (1 - x) * torch.log1p(-p)).sum(1).mean()
    assert one.score(x) == pytest.approx(hand.item(), rel=1e-12)


def test_bernoulli_history_is_the_map_objective_and_never_decreases():
    x, _, _ = binary_components(seed=1)
    alpha = 1.0
    bm = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=30, init="random", seed=0).fit(x)
    history = torch.tensor(bm.history_)
    assert (history.diff() >= -1e-9).all() and history[-1] > history[0] + 1
    # the objective at the parameters the last iteration started from, by hand
    start = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=29, init="random", seed=0).fit(x)
    mu, w = start.means_, start.weights_
    log_px = torch.logsumexp(w.log() + x @ mu.log().T + (1 - x) @ torch.log1p(-mu).T, 1)
    a = torch.tensor(1 + alpha, dtype=F64)
    prior = torch.distributions.Beta(a, a).log_prob(mu).sum()
    assert bm.history_[-1] == pytest.approx(((log_px.sum() + prior) / len(x)).item(), rel=1e-12)
    assert torch.allclose(start.score_samples(x), start.distribution().log_prob(x), atol=1e-10)


def test_bernoulli_mixture_on_images_flattens_and_samples():
    g = torch.Generator().manual_seed(0)
    images = torch.bernoulli(torch.full((200, 1, 4, 4), 0.3), generator=g)
    bm = BernoulliMixture(2, seed=0, init="random_from_data").fit(images)
    assert bm.means_.shape == (2, 16) and bm.event_shape_ == (1, 4, 4)
    assert bm.score_samples(images).shape == (200,)
    draws, labels = bm.sample(1000, generator=g)
    assert draws.shape == (1000, 16) and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.3, abs=0.03)


def test_bernoulli_bic_counts_k_d_plus_k_minus_1_parameters_and_picks_the_true_k():
    x, _, _ = binary_components()
    n, d = x.shape
    bics = []
    for k in range(1, 6):
        bm = BernoulliMixture(k, n_init=2, seed=0).fit(x)
        log_l = bm.score_samples(x).sum().item()
        p = k * d + k - 1  # pixel probabilities and weights; the prior adds no parameter
        assert bm._n_parameters() == p
        assert bm.bic(x) == pytest.approx(-2 * log_l + p * math.log(n), rel=1e-12)
        assert bm.aic(x) == pytest.approx(-2 * log_l + 2 * p, rel=1e-12)
        bics.append(bm.bic(x))
    assert min(range(5), key=bics.__getitem__) + 1 == 3


def test_bernoulli_fit_predict_warns_and_reports_like_the_gaussian_mixture(capsys):
    x, _, _ = binary_components()
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        labels = BernoulliMixture(3, init="random", max_iter=2, seed=0).fit_predict(x)
    fitted = BernoulliMixture(3, init="random", max_iter=2, seed=0).fit(x)
    assert torch.equal(labels, fitted.predict(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm = BernoulliMixture(3, seed=0, verbose=1, verbose_interval=1).fit(x)
    assert bm.converged_
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "initialisation 1 of 1" and len(lines) == bm.n_iter_ + 2
    assert lines[-1] == f"initialisation 1: converged after {bm.n_iter_} iterations"
