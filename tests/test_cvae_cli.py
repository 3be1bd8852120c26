"""The conditional VAE at the command line (issue 24): ``train --model cvae --visible K`` through
the VAE's machinery (config.json, resume, evaluate's log p(y|x), the completions picture) and
what it refuses, on the 8x8 digits set (MNIST's 60,000 images are one epoch too many here)."""

import json
import shutil
import warnings
from functools import partial

import matplotlib.image
import pyro
import pytest
import torch
from helpers import needs_mnist, run_cli

from ppl_vae.cli import main
from ppl_vae.cvae import (
    HIDDEN,
    CVAEGuide,
    CVAEModel,
    baseline_log_likelihood,
    conditional_log_likelihood,
    quadrant_mask,
    split_quadrants,
)
from ppl_vae.cvae_images import ImageCVAEModel, fit_baseline, image_cvae_pair
from ppl_vae.data import DataConfig, load_data
from ppl_vae.networks import NetworkConfig
from ppl_vae.plots import completions_figure
from ppl_vae.rng import forked_rng
from ppl_vae.runs import load_run, train_run
from ppl_vae.runs.evaluate import seeded_batch
from ppl_vae.runs.pictures import PICTURES
from ppl_vae.svi import TrainConfig, train
from ppl_vae.vae import VAEConfig, build_vae

BASE = ["--dataset", "digits", "--model", "cvae", "--device", "cpu", "--quiet"]
ARGS = [*BASE, "--visible", "2", "--hidden", "16", "--latent-dim", "4", "--batch-size", "100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cvae") / "run"
    assert main(["train", *ARGS, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_writes_a_cvae_run_that_loads_as_one(trained):
    config = json.loads((trained / "config.json").read_text())
    vae = config["vae"]
    assert (vae["model"], vae["visible"], vae["latent_dim"]) == ("cvae", 2, 4)
    assert vae["network"] == {"architecture": "mlp", "hidden": [16], "activation": "relu"}
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    run = load_run(trained, "cpu")
    assert isinstance(run.model, ImageCVAEModel) and run.model.visible == run.guide.visible == 2
    # the programs observe the hidden pixels only: 32 of each 8x8 digit with the left half shown
    images = run.data.encode(run.data.test[:3])
    trace = pyro.poutine.trace(run.model).get_trace(images)
    assert [n for n, s in trace.nodes.items() if s.get("is_observed")] == ["y"]
    site, hidden = trace.nodes["y"], ~quadrant_mask((8, 8), 2)
    assert hidden.sum() == 32
    pixels = torch.distributions.Bernoulli(
        logits=run.model.logits(split_quadrants(images, 2)[0], trace.nodes["z"]["value"])
    ).log_prob(images)
    want = (pixels * hidden).sum((1, 2, 3))
    assert torch.allclose(site["fn"].log_prob(site["value"]), want, atol=1e-5)
    # an untrained model's conditional ELBO is about -32 log 2 per digit; one epoch beats it
    assert -32 * 0.7 < metrics[0]["test_elbo"] < 0


def test_the_command_line_defaults_are_pyros_sizes(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", *BASE, "--epochs", "1", "--out", out, capsys=capsys)
    assert code == 0, err
    vae = json.loads((out / "config.json").read_text())["vae"]
    assert (vae["visible"], vae["latent_dim"], vae["network"]["activation"]) == (1, 200, "relu")
    model = load_run(out, "cpu").model
    widths = [m.out_features for m in model.generation_net if isinstance(m, torch.nn.Linear)]
    assert widths == [500, 500, 64] and model.latent_dim == 200
    assert "epoch 1: train ELBO" in stdout and "(bounds on log p(y|x))" in stdout


def test_resume_continues_the_run(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, _, err = run_cli("train", "--resume", "--out", run, "--epochs", "2", "--quiet",
                           "--device", "cpu", capsys=capsys)  # fmt: skip
    assert code == 0, err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads(lines[0]) == first  # the first epoch kept as it was
    resumed = load_run(run, "cpu", checkpoint="last")
    assert resumed.checkpoint["epoch"] == 2 and resumed.vae_config.visible == 2


def test_evaluate_writes_the_conditional_log_likelihood_of_the_points(trained, capsys):
    flags = ["--limit", "50", "--num-samples", "200", "--seed", "3", "--device", "cpu"]
    code, out, err = run_cli("evaluate", "--run", trained, *flags, "--quiet", capsys=capsys)
    assert code == 0, err
    record = json.loads((trained / "evaluate.json").read_text())
    assert record["conditional"] is True and record["num_points"] == 50
    assert "active_units" not in record and "kl_per_dim" not in record
    assert f"test -log p(y|x) {record['nll']:.2f} ± " in out and "NLL" not in out
    assert len(out.splitlines()) == 1

    run = load_run(trained, "cpu")  # the same points and draws, through the library's CVAE
    with forked_rng(run.data.device, 3):
        images = seeded_batch(run.data, run.data.test[:50], 100, 3, 0)
        x, y = split_quadrants(images, 2)
        want = conditional_log_likelihood(
            partial(CVAEModel.forward, run.model), partial(CVAEGuide.forward, run.guide), x, y,
            num_samples=200, chunk_size=record["chunk_size"],
        )  # fmt: skip
    assert record["log_px"] == pytest.approx(want.tolist(), abs=1e-9)
    assert record["nll"] == pytest.approx(-want.mean().item(), abs=1e-9)
    assert record["elbo"] <= -record["nll"]  # the same draws' ELBO lies below their estimate


def test_plot_draws_the_completions_picture(trained, tmp_path, capsys):
    out = tmp_path / "pictures"
    code, stdout, err = run_cli("plot", "--run", trained, "--out", out, "--device", "cpu",
                                capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["completions.png", "curves.png"]
    height, width, _ = matplotlib.image.imread(out / "completions.png").shape
    assert 300 < height <= 696 and 300 < width <= 624  # figsize (5.2, 5.8) at 120 dpi, trimmed

    run = load_run(trained, "cpu")
    grid = PICTURES["completions"].factory(run).axes[0].images[0].get_array()
    assert grid.shape == (8 * 9 - 1, 7 * 9 - 1)  # 8 test digits: input, truth, 5 completions
    images = run.data.encode(run.data.test[:8], generator=torch.Generator().manual_seed(0))
    x, _ = split_quadrants(images, 2)
    for r in range(8):
        cell = [torch.as_tensor(grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8]) for c in range(7)]
        shown = x[r, 0]
        assert torch.equal(cell[0], torch.where(shown == HIDDEN, 0.5, shown).float())
        assert torch.equal(cell[1], images[r, 0].float())
        for completion in cell[2:]:  # the visible pixels kept, the hidden ones probabilities
            visible = shown != HIDDEN
            assert torch.equal(completion[visible], shown[visible].float())
            assert ((completion > 0) & (completion < 1))[~visible].all()


def test_a_vae_picture_on_a_cvae_run_is_one_line(trained, tmp_path, capsys):
    out = tmp_path / "pictures"
    code, stdout, err = run_cli("plot", "--run", trained, "--out", out, "--pictures",
                                "samples", capsys=capsys)  # fmt: skip
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "samples picture needs a model p(z) p(x|z)" in err and not list(out.glob("*.png"))


@pytest.mark.parametrize(
    "flags, wrong",
    [
        (["--guide", "iaf"], "--model cvae takes no --guide"),
        (["--prior", "mog"], "--model cvae takes no --prior"),
        (["--architecture", "conv"], "--model cvae takes no --architecture"),
        (["--likelihood", "gaussian"], "--model cvae takes no --likelihood"),
        (["--binarize", "gray"], "digits (gray) is not binary"),
        (["--dataset", "moons"], "moons has points of shape (2,), not images"),
        (["--model", "vae", "--visible", "2"], "--visible applies to --model cvae only"),
        (["--model", "vae", "--baseline-epochs", "2"], "--baseline-epochs applies to --model"),
    ],
)
def test_what_does_not_apply_is_refused_in_one_line(flags, wrong, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", *BASE, *flags, "--out", out, capsys=capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert wrong in err and not out.exists()


@pytest.mark.parametrize(
    "command, wrong, record",
    [
        (["gaps", "--limit", "5"], "evaluate reports its log p(y|x)", "gaps.json"),
        (["evaluate", "--method", "ais"], "estimated by --method is", "evaluate.json"),
    ],
)
def test_gaps_and_ais_are_refused_in_one_line(trained, tmp_path, command, wrong, record, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("evaluate.json"))
    before = sorted(p.name for p in run.iterdir())
    code, stdout, err = run_cli(*command, "--run", run, "--device", "cpu", capsys=capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert wrong in err and sorted(p.name for p in run.iterdir()) == before


@needs_mnist
def test_mnist_quadrants_train_and_complete_through_the_generic_loop():
    """300 MNIST digits, one quadrant shown: the generic loop trains the pair (the conditional
    ELBO of the 588 hidden pixels rises from about -588 log 2), and the picture's cells are
    28x28 with three quadrants gray."""
    data = load_data(DataConfig(dataset="mnist", binarize="static")).head(300, 50)
    net = NetworkConfig(hidden=(32,), activation="relu")
    model, guide = build_vae(VAEConfig(model="cvae", latent_dim=4, network=net), data)
    assert model.visible == 1
    metrics = train(model, guide, data, TrainConfig(epochs=2, batch_size=50), quiet=True)
    assert -588 * 0.7 < metrics[0]["test_elbo"] < metrics[-1]["test_elbo"] < 0
    grid = completions_figure(model, data).axes[0].images[0].get_array()
    assert grid.shape == (8 * 29 - 1, 7 * 29 - 1)
    assert (torch.as_tensor(grid[:28, :28]) == 0.5).sum() == 3 * 14 * 14


def test_the_captured_step_gives_the_programs_numbers_with_a_warm_up(tmp_path):
    data = DataConfig("digits")
    vae = VAEConfig(model="cvae", visible=3, latent_dim=4, network=NetworkConfig(hidden=(16,)))
    runs = {}
    for capture in (True, False):
        config = TrainConfig(epochs=2, batch_size=200, kl_warmup=2, capture=capture)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back to the program
            runs[capture] = train_run(data, vae, config, tmp_path / str(capture), "cpu",
                                      pictures=False, quiet=True)  # fmt: skip
    for a, b in zip(runs[True].metrics, runs[False].metrics, strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-6)


def test_fit_baseline_trains_it_and_starts_the_generation_network_from_it():
    data = load_data(DataConfig("digits"))
    model, _ = image_cvae_pair(2, data.event_shape, latent_dim=3, hidden=(16,), baseline=True)
    losses = fit_baseline(model, data, 3, batch_size=100, seed=1)
    assert losses[0] > losses[-1] and losses[0] < 32 * 0.7  # below an untrained -32 log 2
    x, _ = model.split(data.encode(data.test[:5]))
    z = torch.randn(4, 5, 3)  # p(y|x, z) is the baseline's p(y|x) for every z
    with torch.no_grad():
        assert torch.allclose(
            model.logits(x, z), model.baseline.logits(x).expand(4, -1, -1, -1, -1)
        )


def test_a_baseline_run_reports_its_exact_log_likelihood_beside_the_cvaes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = [*ARGS, "--epochs", "1", "--baseline-epochs", "2", "--out", run_dir]
    assert run_cli("train", *flags, capsys=capsys)[0] == 0
    assert json.loads((run_dir / "config.json").read_text())["vae"]["baseline_epochs"] == 2
    evaluate = ["--limit", "40", "--num-samples", "50", "--seed", "2", "--device", "cpu"]
    code, out, err = run_cli("evaluate", "--run", run_dir, *evaluate, "--quiet", capsys=capsys)
    assert code == 0, err
    record = json.loads((run_dir / "evaluate.json").read_text())
    run = load_run(run_dir, "cpu")
    with forked_rng(run.data.device, 2):
        images = seeded_batch(run.data, run.data.test[:40], 100, 2, 0)
    want = baseline_log_likelihood(run.model.baseline, *split_quadrants(images, 2))
    assert record["baseline"]["log_px"] == pytest.approx(want.tolist(), abs=1e-9)
    assert record["baseline"]["nll"] == pytest.approx(-want.mean().item(), abs=1e-9)
    assert f"baseline {record['baseline']['nll']:.2f} ± " in out.splitlines()[1]
