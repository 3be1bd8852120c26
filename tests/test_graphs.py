"""The recorded SVI step replayed as a CUDA graph (ppl_vae.graphs): the eager step's numbers,
recaptured when what it holds fixed changes, and a clean fall-back."""

import pyro
import pytest
import torch
from helpers import assert_same_metrics, strict_runs

from ppl_vae.capture import CapturedLoss
from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.graphs import WARMUP, GraphedSteps, graphs_off_reason
from ppl_vae.networks import NetworkConfig
from ppl_vae.optim import adam
from ppl_vae.runs import train_run
from ppl_vae.svi import GradientClip, TrainConfig, collect_params, make_loss, step_loss, svi_step
from ppl_vae.vae import VAEConfig, build_vae

cuda = pytest.mark.cuda
VAE = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))


def step_parts(device: str):
    """A small VAE's recorded step loss, its parameters, fused Adam and six batches of 100
    pinwheel points on ``device``, all from seed 0 (the param store cleared)."""
    data = load_data(DataConfig("pinwheel", num_train=600, num_test=100), torch.device(device))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build_vae(VAE, data)
    params = collect_params(model, guide, data.train[:100], 600)
    loss = step_loss(make_loss(TrainConfig()), model, guide, params)
    optimizer = adam(params.values(), lr=1e-2)
    return loss, list(params.values()), optimizer, data.train.split(100)


def run_steps(step, device: str, *, lr_from: int | None = None, sync_in_update: bool = False):
    """The losses, parameters and summed gradient norms of 12 steps taken by ``step`` (the
    learning rate halved from step ``lr_from``; ``sync_in_update`` reads a gradient on the
    host between gradient and update, which a CUDA graph cannot hold)."""
    loss, params, optimizer, batches = step_parts(device)
    clip = GradientClip(params, 1.0, num_data=600, device=torch.device(device))

    def update():
        clip()
        if sync_in_update:
            float(params[0].grad.sum())

    losses = []
    for i in range(12):
        if i == lr_from:
            for group in optimizer.param_groups:
                group["lr"] = 5e-3
        with pyro.validation_enabled(False):
            losses.append(step(loss, optimizer, batches[i % 6], 600, before_update=update))
    return torch.stack(losses), [p.detach().clone() for p in params], clip.norms


@cuda
@pytest.mark.parametrize("lr_from", [None, 7])
def test_graphed_steps_give_the_eager_steps_losses_and_parameters(lr_from):
    # The same RNG stream feeds both: a replay that drew its first capture's numbers again,
    # or missed the clip or a changed learning rate, would part from the eager steps.
    want, want_params, want_norms = run_steps(svi_step, "cuda", lr_from=lr_from)
    steps = GraphedSteps(svi_step)
    got, got_params, got_norms = run_steps(steps, "cuda", lr_from=lr_from)
    # eager: the program's first call (it makes the record), WARMUP steps; then replays
    assert steps.off is None and len(steps.graphs) == 1 and 1 + WARMUP < 12
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    for p, q in zip(got_params, want_params, strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_norms, want_norms, rtol=1e-6)


@cuda
def test_a_learning_rate_change_is_captured_again():
    loss, params, optimizer, batches = step_parts("cuda")
    steps = GraphedSteps(svi_step)
    seen = []
    for i in range(8):
        if i == 6:
            for group in optimizer.param_groups:
                group["lr"] = 5e-3
        with pyro.validation_enabled(False):
            steps(loss, optimizer, batches[i % 6], 600)
        seen += [g.graph for g in steps.graphs.values()]
    assert len({id(g) for g in seen}) == 2  # captured at step 1 + 1 + WARMUP, again at 6
    assert all(not group["capturable"] for group in optimizer.param_groups)  # reset after


@cuda
def test_a_failed_capture_warns_and_steps_eagerly_with_the_same_numbers():
    want, want_params, _ = run_steps(svi_step, "cuda", sync_in_update=True)
    steps = GraphedSteps(svi_step)
    with pytest.warns(RuntimeWarning, match="runs without CUDA graphs: its capture failed"):
        got, got_params, _ = run_steps(steps, "cuda", sync_in_update=True)
    assert steps.off and not steps.graphs
    assert torch.allclose(got, want, rtol=1e-5)
    for p, q in zip(got_params, want_params, strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


@cuda
def test_training_on_cuda_with_graphs_gives_the_numbers_without(tmp_path):
    data = DataConfig("pinwheel", num_train=700, num_test=200)
    configs = {
        graphs: TrainConfig(epochs=3, batch_size=300, kl_warmup=2, cuda_graphs=graphs)
        for graphs in (True, False)
    }
    runs = strict_runs(data, VAE, configs, tmp_path, "cuda")  # no fall-back of either kind
    assert_same_metrics(runs[True], runs[False], rel=1e-5)


def test_graphs_are_refused_off_cuda_with_the_reason():
    _, params, optimizer, _ = step_parts("cpu")
    assert "need a CUDA device" in graphs_off_reason(optimizer, torch.device("cpu"))
    unfused = torch.optim.Adam(params, lr=1e-3, foreach=True)
    if torch.cuda.is_available():
        assert "fused Adam" in graphs_off_reason(unfused, torch.device("cuda"))


def test_asking_for_graphs_on_a_cpu_warns_and_trains_as_without(tmp_path):
    data = DataConfig("pinwheel", num_train=300, num_test=100)
    plain = train_run(data, VAE, TrainConfig(epochs=1), tmp_path / "plain", "cpu")
    with pytest.warns(RuntimeWarning, match="without CUDA graphs: they need a CUDA device"):
        asked = train_run(data, VAE, TrainConfig(epochs=1, cuda_graphs=True), tmp_path / "a", "cpu")
    assert asked.metrics[0]["test_elbo"] == plain.metrics[0]["test_elbo"]
    with pytest.raises(InputError, match="drop --no-capture"):
        TrainConfig(cuda_graphs=True, capture=False)


def test_graphed_steps_run_the_eager_step_until_a_record_is_ready():
    # on a CPU nothing is captured: no record is ready before the second call, and no graph
    # is made while steps stay eager; ready() follows the record's check and fall-back
    loss, params, optimizer, batches = step_parts("cpu")
    assert isinstance(loss, CapturedLoss) and loss.ready(batches[0], 600) is None
    calls = []

    def eager(*args, **kwargs):
        calls.append(args[2].shape)
        return svi_step(*args, **kwargs)

    steps = GraphedSteps(eager)
    with pyro.validation_enabled(False):
        steps(loss, optimizer, batches[0], 600)
    key, record = loss.ready(batches[1], 600)
    assert isinstance(record, torch.fx.GraphModule) and key in loss.records
    assert loss.ready(batches[1][:50], 600) is None  # another shape: no record yet
    assert loss.ready(batches[1], 599) is None  # another constant: no record yet
    loss.recheck()
    assert loss.ready(batches[1], 600) is None  # a check is due: the call runs the program
    assert calls == [batches[0].shape] and not steps.graphs
