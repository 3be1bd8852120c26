"""The M2 model: its loss against Pyro's TraceEnum_ELBO and Trace_ELBO, the classification term
by hand, log p(x) against quadrature over z summed over the classes, the balanced labelled
set, and the refusals."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vae.errors import InputError
from ppl_vae.importance import log_likelihood_diagnostics
from ppl_vae.m2 import (
    M2Guide,
    M2Loss,
    M2Model,
    balanced_labelled,
    m2_accuracy,
    m2_log_likelihood,
    m2_loss,
    paper_alpha,
)

EVENT = (2, 3)  # six binary pixels
CLASSES = 3


def tiny_m2(latent_dim=2, classes=CLASSES):
    options = dict(num_classes=classes, latent_dim=latent_dim, hidden=(5,), activation="tanh")
    return M2Model(EVENT, **options).double(), M2Guide(EVENT, **options).double()


def binary_points(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *EVENT), 0.4, dtype=torch.float64), generator=g)


def labels_of(n=7):
    return torch.arange(n) % CLASSES


def value_and_gradients(loss_fn, params, seed=6):
    pyro.set_rng_seed(seed)
    value = loss_fn()
    grads = torch.autograd.grad(value, params, allow_unused=True)  # unused: zero
    return value, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def assert_same(ours, theirs):
    (value, grads), (their_value, their_grads) = ours, theirs
    assert torch.allclose(value, their_value, rtol=1e-12, atol=0), (value, their_value)
    for a, b in zip(grads, their_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


# -- (a) the loss against Pyro's estimators ------------------------------------------------------


@pytest.mark.parametrize("num_data", [None, 40])
def test_the_unlabelled_loss_gives_trace_enum_elbos_value_and_gradients(num_data):
    model, guide = tiny_m2()
    x = binary_points()
    params = list(model.parameters()) + list(guide.parameters())
    ours = value_and_gradients(
        lambda: m2_loss(model, guide, x, alpha=5.0, num_data=num_data), params
    )
    theirs = value_and_gradients(
        lambda: TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
            model, guide, x, num_data=num_data
        ),
        params,
    )
    assert_same(ours, theirs)
    classifier = [p for n, p in guide.named_parameters() if n.startswith("classifier")]
    grads = dict(zip(map(id, params), ours[1], strict=True))
    assert all(grads[id(p)].abs().sum() > 0 for p in classifier)  # q(y|x) is learned too


@pytest.mark.parametrize("num_data", [None, 40])
def test_the_labelled_loss_without_alpha_gives_trace_elbos_value_and_gradients(num_data):
    model, guide = tiny_m2()
    x, y = binary_points(), labels_of()
    params = list(model.parameters()) + list(guide.parameters())
    ours = value_and_gradients(
        lambda: M2Loss(alpha=0).differentiable_loss(model, guide, x, y, num_data), params
    )
    theirs = value_and_gradients(
        lambda: Trace_ELBO().differentiable_loss(model, guide, x, y, num_data=num_data), params
    )
    assert_same(ours, theirs)
    assert ours[1][len(list(model.parameters())) + 4].abs().sum() > 0  # the encoder's weight


def test_the_model_enumerates_y_only_when_it_is_latent():
    model, guide = tiny_m2()
    x, y = binary_points(), labels_of()
    for program in (model, guide):
        site = poutine.trace(program).get_trace(x).nodes["y"]
        assert not site["is_observed"] and site["infer"] == {"enumerate": "parallel"}
    assert poutine.trace(model).get_trace(x, y).nodes["y"]["is_observed"]
    assert "y" not in poutine.trace(guide).get_trace(x, y).nodes


# -- (c) the classification term by hand ---------------------------------------------------------


@pytest.mark.parametrize("num_data", [None, 70])
def test_the_classification_term_is_alpha_times_the_cross_entropy_written_out(num_data):
    model, guide = tiny_m2()
    x, y = binary_points(), labels_of()
    alpha = 2.5
    losses = []
    for a in (alpha, 0.0):
        pyro.set_rng_seed(3)  # the same draws of z: the ELBO parts cancel
        losses.append(m2_loss(model, guide, x, y, alpha=a, num_data=num_data))
    with torch.no_grad():
        logits = guide.classifier_net(x.flatten(1))  # (7, 3)
        chosen = logits[torch.arange(7), y]
        cross_entropy = (torch.log(torch.exp(logits).sum(-1)) - chosen).sum()
    scale = 1.0 if num_data is None else num_data / 7
    found = (losses[0] - losses[1]).item()
    assert abs(found - scale * alpha * cross_entropy.item()) < 1e-10 * abs(found), found


def test_paper_alpha_is_a_tenth_of_n_per_labelled_point():
    assert paper_alpha(50000, 100) == pytest.approx(50.0, rel=1e-15)  # 0.1 * 50000 / 100
    assert paper_alpha(60000, 3000, ratio=0.5) == pytest.approx(10.0, rel=1e-15)
    # summed over the labelled set, the term is 0.1 N times its mean cross-entropy
    assert paper_alpha(1234, 17) * 17 == pytest.approx(0.1 * 1234, rel=1e-14)


# -- (b) log p(x) against quadrature over z and a sum over the classes ---------------------------


def test_the_enumerated_log_likelihood_matches_quadrature_summed_over_classes():
    model, guide = tiny_m2(latent_dim=1)
    x = binary_points(n=4, seed=2)
    k = 20000
    torch.manual_seed(0)
    est = m2_log_likelihood(model, guide, x, num_samples=k)
    assert est.shape == (4,) and est.dtype == torch.float64
    # the same draws, per class: log p(x, y) with its effective sample size
    torch.manual_seed(0)
    repeated = x.repeat(CLASSES, 1, 1)
    labels = torch.arange(CLASSES).repeat_interleave(4)
    per_class = log_likelihood_diagnostics(model, guide, repeated, labels, num_samples=k)
    assert torch.equal(est, torch.logsumexp(per_class.log_px.reshape(CLASSES, 4), 0))
    with torch.no_grad():
        t = torch.linspace(-12, 12, 4001, dtype=torch.float64)  # a grid over z ~ N(0, 1)
        exact = []
        for c in range(CLASSES):
            one_hot = F.one_hot(torch.tensor(c), CLASSES).double().expand(len(t), -1)
            logits = model.decoder(torch.cat([one_hot, t[:, None]], -1))  # (G, 6)
            flat = x.flatten(1)  # (4, 6)
            log_lik = (flat[:, None] * logits - F.softplus(logits)).sum(-1)  # (4, G)
            log_prior = -0.5 * t.square() - 0.5 * math.log(2 * math.pi)
            log_px_given_y = torch.logsumexp(log_lik + log_prior, -1) + math.log(t[1] - t[0])
            exact.append(log_px_given_y - math.log(CLASSES))  # log p(x, y=c)
        exact = torch.logsumexp(torch.stack(exact), 0)
    # each class's relative error is at most sqrt((K / ESS - 1) / K) (delta method), and the
    # relative error of a sum of positive terms at most the largest of theirs
    se = ((k / per_class.ess - 1) / k).sqrt().reshape(CLASSES, 4).max(0).values
    assert (se > 1e-4).all()  # the guide is not the posterior: the check can fail
    assert ((est - exact).abs() < 4 * se + 1e-6).all(), ((est - exact), se)


def test_classes_the_programs_ignore_give_equal_terms_and_their_log_sum_exp():
    """With y ignored (zero weights on it), every log p(x, y) estimates log p(x) - log 3."""
    model, guide = tiny_m2(latent_dim=1)
    with torch.no_grad():
        model.decoder[0].weight[:, :CLASSES] = 0  # the decoder ignores y
        guide.encoder_net[0].weight[:, -CLASSES:] = 0  # and so does q(z|x, y)
    x = binary_points(n=3)
    torch.manual_seed(1)
    est = m2_log_likelihood(model, guide, x, num_samples=50)
    torch.manual_seed(1)
    per_class = log_likelihood_diagnostics(
        model, guide, x.repeat(CLASSES, 1, 1), torch.arange(CLASSES).repeat_interleave(3),
        num_samples=50,
    ).log_px.reshape(CLASSES, 3)  # fmt: skip
    # log p(x, y) = log p(x|y) - log 3, the three estimates differ only by their draws
    assert torch.allclose(est, torch.logsumexp(per_class, 0), rtol=1e-12, atol=0)
    assert (per_class.max(0).values - per_class.min(0).values < 0.5).all()


# -- classification: predict and accuracy --------------------------------------------------------


def test_predict_is_the_classifiers_argmax_and_accuracy_counts_matches():
    _, guide = tiny_m2()
    x = binary_points(n=9)
    predicted = guide.predict(x)
    assert torch.equal(predicted, guide.classifier_net(x.flatten(1)).argmax(-1))
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % CLASSES  # two wrong
    assert m2_accuracy(guide, x, labels) == pytest.approx(7 / 9, rel=1e-15)
    assert m2_accuracy(guide, x, predicted) == 1.0


# -- (d) the balanced labelled set ---------------------------------------------------------------


def test_balanced_selection_takes_as_many_of_each_class_and_depends_on_the_seed_only():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    chosen = balanced_labelled(labels, 100, 10, seed=3)
    assert chosen.shape == (100,) and chosen.dtype == torch.int64
    assert torch.equal(torch.bincount(labels[chosen], minlength=10), torch.full((10,), 10))
    assert len(torch.unique(chosen)) == 100 and torch.equal(chosen, chosen.sort().values)
    assert torch.equal(chosen, balanced_labelled(labels.clone(), 100, 10, seed=3))
    assert not torch.equal(chosen, balanced_labelled(labels, 100, 10, seed=4))
    torch.manual_seed(123)  # the global stream plays no part
    assert torch.equal(chosen, balanced_labelled(labels, 100, 10, seed=3))
    smallest = int(torch.bincount(labels).min())
    everything = balanced_labelled(labels, 10 * smallest, 10, seed=0)  # a whole class taken
    assert torch.equal(torch.bincount(labels[everything]), torch.full((10,), smallest))


# -- (e) refusals --------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_bad_input_is_refused_in_one_line():
    model, guide = tiny_m2()
    x, y = binary_points(), labels_of()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    other_model, _ = tiny_m2(classes=4)
    cases = [
        (lambda: balanced_labelled(labels, 4, 3, seed=0), "multiple of num_classes"),
        (lambda: balanced_labelled(labels, 12, 3, seed=0), "exceeds the 9 points"),
        (lambda: balanced_labelled(labels, 9, 3, seed=0), "class 0 has 2 points, fewer than"),
        (lambda: balanced_labelled(labels, 0, 3, seed=0), "n must be a positive integer"),
        (lambda: balanced_labelled(labels.double(), 3, 3, seed=0), "integer labels"),
        (lambda: balanced_labelled(labels, 3, 2, seed=0), r"must lie in \[0, 2\)"),
        (lambda: balanced_labelled(labels[None], 3, 3, seed=0), "1-D tensor"),
        (lambda: model(x, y.double()), "integer labels, one per point"),
        (lambda: guide(x, y[:3]), "integer labels, one per point"),
        (lambda: model(x[:, 0]), r"batch of shape \(N, 2, 3\)"),
        (lambda: M2Model(EVENT, num_classes=1), "num_classes must be at least 2"),
        (lambda: M2Guide(EVENT, latent_dim=0), "latent_dim must be a positive integer"),
        (lambda: M2Model(EVENT, hidden=()), "hidden sizes"),
        (lambda: m2_loss(model, guide, x, y, alpha=-1.0), "alpha must be a number >= 0"),
        (lambda: m2_loss(model, guide, x, y, alpha=math.inf), "alpha must be finite"),
        (lambda: m2_loss(model, guide, x, y, alpha=1.0, num_data=0), "num_data must be"),
        (lambda: m2_log_likelihood(other_model, guide, x), "the model has 4 classes"),
        (lambda: m2_log_likelihood(model, guide, x, num_samples=0), "num_samples"),
        (lambda: m2_accuracy(guide, x, y[:3]), "3 entries for 7 points"),
        (lambda: m2_accuracy(guide, x, y + 1), r"must lie in \[0, 3\)"),
        (lambda: paper_alpha(100, 200), "exceeds num_data"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match) as err:
            call()
        one_line(err)
