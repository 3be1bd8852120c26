"""The captured SVI step: a checked record of the Pyro program's tensor operations."""

import itertools
import warnings
from functools import partial

import pyro
import pytest
import torch
from helpers import (
    Flatten,
    assert_same_metrics,
    linear_gaussian_vae,
    strict_runs,
    trainable_linear_gaussian,
)
from torch import fx

from ppl_vae.capture import CapturedLoss
from ppl_vae.data import DataConfig, load_data
from ppl_vae.guides import GaussianGuide
from ppl_vae.losses import TraceELBO
from ppl_vae.networks import NetworkConfig
from ppl_vae.svi import TrainConfig, collect_params, make_loss, step_loss, train
from ppl_vae.vae import VAEConfig, build_vae


@pytest.mark.parametrize(
    "guide, loss",
    [
        ("gaussian", "elbo"),
        ("gaussian", "meanfield"),
        ("gaussian", "iwae"),
        ("planar", "elbo"),
        ("sylvester", "elbo"),
        ("spline", "elbo"),  # identity tails chosen by torch.where: fixed shapes
    ],
)
def test_captured_training_gives_the_numbers_of_the_program_run_each_step(tmp_path, guide, loss):
    data = DataConfig("pinwheel", num_train=700, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)), guide=guide)
    warmup = 2 if loss != "iwae" else 0  # the KL weight changes: one record per weight
    # batch 300: two full batches and a last one of 100, which gets its own record
    configs = {
        capture: TrainConfig(
            epochs=3, batch_size=300, loss=loss, kl_warmup=warmup, num_particles=2, capture=capture
        )  # fmt: skip
        for capture in (True, False)
    }
    runs = strict_runs(data, vae, configs, tmp_path, "cpu")  # no fall-back to the program
    assert_same_metrics(runs[True], runs[False], rel=1e-6)
    for p, q in zip(runs[True].guide.parameters(), runs[False].guide.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def linear_gaussian_loss():
    model, guide, x, params = trainable_linear_gaussian()
    loss = partial(TraceELBO(max_plate_nesting=1).differentiable_loss, model, guide)
    return loss, x, params


def test_a_record_is_made_per_shape_and_replays_the_programs_draws():
    loss, x, params = linear_gaussian_loss()
    captured = CapturedLoss(loss, params)
    for rows in (6, 4, 6):
        torch.manual_seed(rows)
        want = loss(x[:rows], 60)
        want_grads = torch.autograd.grad(want, params)
        torch.manual_seed(rows)
        got = captured(x[:rows], 60)
        got_grads = torch.autograd.grad(got, params)
        assert torch.allclose(got, want, rtol=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    assert len(captured.records) == 2
    assert all(isinstance(r, fx.GraphModule) for r in captured.records.values())


def test_capturing_leaves_the_rng_where_the_program_would():
    loss, x, params = linear_gaussian_loss()
    torch.manual_seed(0)
    loss(x, 60)
    after_program = torch.get_rng_state()
    torch.manual_seed(0)
    CapturedLoss(loss, params)(x, 60)  # captures, checks, then replays once
    assert torch.equal(torch.get_rng_state(), after_program)


def test_a_program_that_branches_on_a_tensor_value_runs_itself():
    w = torch.randn(3, requires_grad=True)

    def loss(x):
        return (w * x).sum() if w.sum() > 0 else (w * x).square().sum()

    captured = CapturedLoss(loss, [w])
    x = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="could not be traced"):
        value = captured(x)
    assert torch.equal(value, loss(x))
    with torch.no_grad():
        w.neg_()  # the other branch: only the program itself takes it
    assert torch.equal(captured(x), loss(x))


def test_a_record_that_disagrees_with_the_program_is_not_used():
    w = torch.randn(3, requires_grad=True)
    calls = itertools.count(1)

    def loss(x):  # Python state that changes between calls: a record would freeze it
        return (w * x).sum() * next(calls)

    captured = CapturedLoss(loss, [w])
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="different loss or gradient"):
        first = captured(x)
    second = captured(x)
    # call 1 is the program's own first run, 2 and 3 the capture and its check (the record
    # froze call 2's count), 4 the program again: the record was not used
    assert torch.allclose(second / first, torch.tensor(4.0))


def test_step_loss_without_capture_is_the_program():
    model, data, _ = linear_gaussian_vae(n=10)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    x = data.train[:4]
    params = collect_params(model, guide, x)
    loss = step_loss(TraceELBO(max_plate_nesting=1), model, guide, params, capture=False)
    assert not isinstance(loss, CapturedLoss)
    torch.manual_seed(1)
    a = loss(x)
    torch.manual_seed(1)
    assert torch.equal(a, TraceELBO(max_plate_nesting=1).differentiable_loss(model, guide, x))


def test_a_program_changed_between_epochs_is_recaptured_after_recheck():
    w = torch.randn(3, requires_grad=True)
    state = {"temperature": 1.0}

    def loss(x):
        return (w * x).sum() / state["temperature"]

    captured = CapturedLoss(loss, [w])
    x = torch.randn(3)
    assert torch.equal(captured(x), loss(x))
    state["temperature"] = 4.0  # a callback anneals between epochs
    stale = captured(x)  # until rechecked, the record keeps the old program
    assert torch.allclose(stale, 4 * loss(x))
    captured.recheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # re-made, not fallen back
        assert torch.allclose(captured(x), loss(x))
    assert isinstance(next(iter(captured.records.values())), fx.GraphModule)


def test_train_follows_a_program_changed_by_on_epoch():
    data = load_data(DataConfig("pinwheel", num_train=600, num_test=200))
    runs = {}
    for capture in (True, False):
        pyro.set_rng_seed(0)
        model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,))), data)

        def widen(metrics, model=model):  # changes the model's computation between epochs
            model.likelihood.min_sigma *= 10

        config = TrainConfig(epochs=3, batch_size=300, capture=capture)
        runs[capture] = train(model, guide, data, config, quiet=True, on_epoch=widen)
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-6)


def test_a_change_to_small_gradient_entries_is_seen_by_the_recheck():
    w = torch.tensor([30.0, 1.0], requires_grad=True)  # one large and one small gradient entry
    state = {"c": 1e-3}

    def loss(x):
        return (x * w[0]) ** 2 + state["c"] * w[1]

    captured = CapturedLoss(loss, [w])
    x = torch.tensor(30.0)
    captured(x)
    captured(x)
    state["c"] = 5e-3
    captured.recheck()
    got = torch.autograd.grad(captured(x), w)[0]
    assert got[1].item() == pytest.approx(5e-3)


def test_one_time_work_of_the_first_call_stays_out_of_the_record():
    """Pyro guesses max_plate_nesting on the first call, drawing from the RNG as it does."""
    import pyro.distributions as dist

    loc = torch.randn(6, 2, requires_grad=True)
    x = torch.randn(6, 2)

    def model(x):
        with pyro.plate("data", 6):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", 6):
            pyro.sample("z", dist.Normal(loc, 0.8).to_event(1))

    runs = []
    for capture in (True, False):
        elbo = TraceELBO(num_particles=3, vectorize_particles=True)  # nesting guessed
        loss = partial(elbo.differentiable_loss, model, guide)
        loss = CapturedLoss(loss, [loc]) if capture else loss
        torch.manual_seed(0)
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("error", RuntimeWarning)
            values = [loss(x).item() for _ in range(3)]
        runs.append((values, torch.get_rng_state()))
    (a, rng_a), (b, rng_b) = runs
    assert a == pytest.approx(b, rel=1e-6)
    assert torch.equal(rng_a, rng_b)


class SafeLog(torch.autograd.Function):
    """log with a finite gradient at 0: a backward that torch's formulas would not give."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x.clamp(min=torch.finfo(x.dtype).eps)


def test_a_custom_autograd_function_is_not_recorded():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)

    def loss(x):
        return SafeLog.apply(w * x).sum()

    captured = CapturedLoss(loss, [w])
    with pytest.warns(RuntimeWarning, match="custom autograd.Function SafeLog"):
        captured(torch.ones(3))
    x = torch.tensor([1.0, 0.0, 1.0])  # where the custom backward matters
    want = torch.autograd.grad(loss(x), w)[0]
    assert torch.equal(torch.autograd.grad(captured(x), w)[0], want)
    assert torch.isfinite(want).all()


def test_keywords_empty_parameters_and_strided_inputs():
    w = torch.randn(4, requires_grad=True)
    empty = torch.zeros(0, requires_grad=True)

    def loss(x, scale=1.0):
        return scale * ((w * x.reshape(-1)).sum() + empty.sum())

    captured = CapturedLoss(loss, [w, empty])
    x = torch.randn(2, 2)
    for _ in range(2):
        assert torch.allclose(captured(x, scale=3.0), loss(x, scale=3.0))
        assert torch.allclose(captured(x.t(), scale=3.0), loss(x.t(), scale=3.0))  # not contiguous
    assert all(isinstance(r, fx.GraphModule) for r in captured.records.values())
    assert len(captured.records) == 2
    with pytest.raises(TypeError, match="by position"):
        captured(scale=x)


@pytest.mark.parametrize(
    "select",
    [
        lambda w, x: (w[x > 0] ** 2).sum(),  # boolean indexing: as many elements as x > 0
        lambda w, x: (w**2).sum() * torch.nonzero(x > 0).shape[0],  # a size read as a number
    ],
)
def test_shapes_that_depend_on_values_are_not_recorded(select):
    w = torch.randn(5, requires_grad=True)
    captured = CapturedLoss(lambda x: select(w, x), [w])
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    with pytest.warns(RuntimeWarning, match="shapes depend on values"):
        captured(x)
    other = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])  # another count
    assert torch.equal(captured(other), select(w, other))


def test_views_that_change_nothing_are_left_out_of_the_record():
    w = torch.randn(3, requires_grad=True)

    def loss(x):
        return (w.expand(3).view(3) * x.expand(2, 3)).sum()

    captured = CapturedLoss(loss, [w])
    x = torch.randn(2, 3)
    captured(x)
    record = next(iter(captured.records.values()))
    targets = [n.target for n in record.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.view.default not in targets
    assert targets.count(torch.ops.aten.expand.default) == 0
    assert torch.equal(captured(x), loss(x))


def test_a_bernoulli_step_records_its_closed_form_derivative_and_gives_pyros_elbo():
    """The step evaluates its loss within first_order_gradients, so the Bernoulli likelihood's
    derivative is recorded in closed form (its graph cut by a view as integers, which a record
    keeps where it would lose a detach); loss and gradients equal Pyro's own
    TraceMeanField_ELBO's (the default loss) of the same program from the same RNG state,
    within float32 rounding."""
    torch.manual_seed(0)
    data = load_data(DataConfig("digits"))
    model, guide = build_vae(VAEConfig(latent_dim=4, network=NetworkConfig(hidden=(16,))), data)
    x = torch.bernoulli(data.train[:50].float())
    params = collect_params(model, guide, x, num_data=500)
    loss = step_loss(make_loss(TrainConfig()), model, guide, params)
    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("error", RuntimeWarning)  # no fall-back to the program
        loss(x, num_data=500)  # the program runs; the record is made and checked
    (record,) = loss.records.values()
    assert isinstance(record, fx.GraphModule)
    assert any(n.target == torch.ops.aten.view.dtype for n in record.graph.nodes)
    mean_field = pyro.infer.TraceMeanField_ELBO()  # the default loss, meanfield
    pyros = partial(mean_field.differentiable_loss, model, guide, x, num_data=500)
    pyros()  # Pyro's first call runs the program once more, to guess max_plate_nesting
    results = []
    for step in (partial(loss, x, num_data=500), pyros):  # the record, then Pyro's ELBO
        torch.manual_seed(3)
        value = step()
        results.append((value, torch.autograd.grad(value, list(params.values()))))
    (a, grads_a), (b, grads_b) = results
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        scale = gb.abs().max().clamp(min=1.0)
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6 * float(scale))
