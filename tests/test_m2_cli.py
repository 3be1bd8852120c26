"""Semi-supervised M2 at the command line (issue 24): ``train --model m2 --labeled N`` through
the VAE's machinery (config.json, metrics.jsonl with test_accuracy, resume, evaluate's log p(x)
with the label summed out, the analogies picture) and what it refuses, on the 8x8 digits."""

import json
import shutil
import warnings
from dataclasses import replace

import matplotlib.image
import pytest
import torch
from helpers import needs_mnist, run_cli

from ppl_vae.cli import main
from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.m2 import M2Model, balanced_labelled, m2_accuracy, m2_log_likelihood, paper_alpha
from ppl_vae.networks import NetworkConfig
from ppl_vae.plots import analogies_figure
from ppl_vae.rng import forked_rng
from ppl_vae.runs import load_run
from ppl_vae.runs.evaluate import seeded_batch
from ppl_vae.runs.pictures import PICTURES
from ppl_vae.runs.train import _semi_supervised
from ppl_vae.semisupervised import SemiSupervised
from ppl_vae.svi import TrainConfig, train
from ppl_vae.vae import VAEConfig, build_vae

BASE = ["--dataset", "digits", "--model", "m2", "--device", "cpu", "--quiet"]
ARGS = [*BASE, "--labeled", "50", "--hidden", "16", "--latent-dim", "4", "--batch-size", "100"]


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(out, *flags, epochs=1):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the captured step: no fall-back
        assert main(["train", *ARGS, *flags, "--epochs", str(epochs), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("m2") / "run")


def _test_points(run):
    """The test digits binarized from the run's seed, as training's accuracy sees them."""
    g = torch.Generator().manual_seed(run.train_config.seed)
    return torch.bernoulli(run.data.test, generator=g)


def test_train_records_the_labelled_points_and_the_test_accuracy(trained):
    config = json.loads((trained / "config.json").read_text())
    assert (config["vae"]["model"], config["vae"]["labeled"], config["vae"]["alpha"]) == (
        "m2", 50, None)  # fmt: skip
    (line,) = _metrics(trained)
    run = load_run(trained, "cpu")
    # the labelled points, recorded: balanced_labelled of the training labels and --seed
    want = balanced_labelled(run.data.train_labels, 50, 10, seed=config["train"]["seed"])
    assert config["labelled"] == want.tolist() == list(run.config.labelled)
    assert torch.bincount(run.data.train_labels[want]).tolist() == [5] * 10
    assert isinstance(run.model, M2Model) and run.guide.num_classes == 10
    want = m2_accuracy(run.guide, _test_points(run), run.data.test_labels)
    assert line["test_accuracy"] == want
    assert want > 0.1  # one epoch on 5 digits of each class: better than chance
    # the unlabelled bound of an untrained model is about -64 log 2 per digit; one epoch beats it
    assert -64 * 0.75 < line["test_elbo"] < 0


def test_the_labelled_batches_cycle_the_balanced_labelled_points():
    data = load_data(DataConfig("digits", "static"))  # encode is the identity: rows can be found
    chosen = balanced_labelled(data.train_labels, 50, 10, seed=7)
    assert torch.bincount(data.train_labels[chosen]).tolist() == [5] * 10
    objective = SemiSupervised(data, chosen, alpha=1.0, batch_size=20, seed=7)
    rows = data.train.flatten(1)
    passes = []
    for first in (0, 3):  # 3 batches of 20, 20 and 10 per pass over the 50 points
        found = []
        for step in range(first, first + 3):
            x, y, n = objective.step_args(step, None)
            assert n == 50 and len(x) == len(y) == (10 if step % 3 == 2 else 20)
            for xi, yi in zip(x.flatten(1), y, strict=True):
                i = next(int(c) for c in chosen if torch.equal(rows[c], xi))  # a labelled point
                assert data.train_labels[i] == yi  # with its own label
                found.append(i)
        assert sorted(found) == chosen.tolist()  # every labelled point once per pass
        passes.append(found)
    assert passes[0] != passes[1]  # in a new order
    assert objective.step_args(4, None)[1].tolist() == objective.step_args(4, None)[1].tolist()


def test_balanced_weights_a_labelled_batch_by_the_unlabelled_set_size(tmp_path):
    """--balanced: a labelled batch's loss is scaled by the unlabelled points' number (1387 of
    the 1437 digits) instead of the labelled ones' (50), its batches unchanged; the run records
    it and the step's loss is the paper's with the labelled part times 1387 / 50."""
    data = load_data(DataConfig("digits", "static"))
    chosen = balanced_labelled(data.train_labels, 50, 10, seed=7)
    paper = SemiSupervised(data, chosen, alpha=3.0, batch_size=20, seed=7)
    balanced = SemiSupervised(data, chosen, alpha=3.0, batch_size=20, seed=7, balanced=True)
    (x, y, n), (xb, yb, nb) = paper.step_args(4, None), balanced.step_args(4, None)
    assert (n, nb) == (50, 1387) and torch.equal(x, xb) and torch.equal(y, yb)
    config = VAEConfig(model="m2", labeled=50, latent_dim=4, network=NetworkConfig(hidden=(16,)))
    model, guide = build_vae(config, data)
    unlabelled = data.train[:30]
    losses = []
    for objective, scale in ((paper, n), (balanced, nb)):
        parts = []
        for args in ((), (x, y, scale)):  # the unlabelled part, then both
            torch.manual_seed(0)
            parts.append(objective.differentiable_loss(model, guide, unlabelled, 1387, *args))
        losses.append(parts)
    (u, both), (ub, both_b) = losses
    torch.testing.assert_close(ub, u)
    torch.testing.assert_close(both_b - ub, (both - u) * 1387 / 50, rtol=1e-5, atol=0)
    run = _train(tmp_path / "run", "--balanced")
    assert json.loads((run / "config.json").read_text())["vae"]["balanced"] is True


def test_resume_takes_the_same_labelled_points_and_gives_the_uninterrupted_numbers(
    trained, tmp_path, capsys
):
    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    code, _, err = run_cli("train", "--resume", "--out", run, "--epochs", "2", "--quiet",
                           "--device", "cpu", capsys=capsys)  # fmt: skip
    assert code == 0, err
    whole = _train(tmp_path / "whole", epochs=2)
    eager = _train(tmp_path / "eager", "--no-capture", epochs=2)
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert [drop(m) for m in _metrics(run)] == [drop(m) for m in _metrics(whole)]
    for a, b in zip(_metrics(whole), _metrics(eager), strict=True):  # the captured step's
        for key in ("train_elbo", "test_elbo"):
            assert a[key] == pytest.approx(b[key], rel=1e-6)
        assert a["test_accuracy"] == b["test_accuracy"]
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]
    recorded = json.loads((trained / "config.json").read_text())["labelled"]
    assert json.loads((run / "config.json").read_text())["labelled"] == recorded
    assert list(load_run(run, "cpu").config.labelled) == recorded


def test_evaluate_sums_the_label_out(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    flags = ["--limit", "30", "--num-samples", "20", "--seed", "3", "--device", "cpu"]
    code, out, err = run_cli("evaluate", "--run", run_dir, *flags, "--quiet", capsys=capsys)
    assert code == 0, err
    record = json.loads((run_dir / "evaluate.json").read_text())
    assert record["label_summed_out"] is True and record["num_points"] == 30
    assert "the label summed out exactly" in out and len(out.splitlines()) == 1
    assert f"test NLL {record['nll']:.2f} ± " in out

    run = load_run(run_dir, "cpu")  # the same points and draws, through m2_log_likelihood
    with forked_rng(run.data.device, 3):
        x = seeded_batch(run.data, run.data.test[:30], 100, 3, 0)
        want = m2_log_likelihood(
            run.model, run.guide, x, num_samples=20, chunk_size=record["chunk_size"]
        )
    assert record["log_px"] == pytest.approx(want.tolist(), abs=1e-9)
    assert record["nll"] == pytest.approx(-want.mean().item(), abs=1e-9)
    assert record["test_accuracy"] == _metrics(run_dir)[-1]["test_accuracy"]
    assert record["nll"] <= -_metrics(run_dir)[-1]["test_elbo"] + 1.0  # near or below the bound


def test_plot_draws_the_analogies_picture(trained, tmp_path, capsys):
    out = tmp_path / "pictures"
    code, stdout, err = run_cli("plot", "--run", trained, "--out", out, "--device", "cpu",
                                capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["analogies.png", "curves.png"]
    assert matplotlib.image.imread(out / "analogies.png").shape[0] > 100

    run = load_run(trained, "cpu")
    grid = PICTURES["analogies"].factory(run).axes[0].images[0].get_array()
    assert grid.shape == (8 * 9 - 1, 11 * 9 - 1)  # 8 test digits: the digit, then 10 labels
    x, labels = _test_points(run)[:8], run.data.test_labels[:8]
    z = run.guide.distribution(x, labels).mean  # the style of each digit, held along its row
    for r in range(8):
        cell = [torch.as_tensor(grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8]) for c in range(11)]
        assert torch.equal(cell[0], x[r, 0])
        for y in range(10):
            want = torch.sigmoid(run.model.logits(torch.tensor([y]), z[r : r + 1]))[0, 0]
            assert torch.allclose(cell[1 + y], want, atol=1e-6)


def test_the_command_line_defaults_are_kingmas_sizes(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*BASE, "--labeled", "100", "--epochs", "2", "--out", out]
    code, _, err = run_cli("train", *flags, capsys=capsys)
    assert code == 0, err
    vae = json.loads((out / "config.json").read_text())["vae"]
    assert (vae["latent_dim"], vae["network"]["activation"]) == (50, "softplus")
    run = load_run(out, "cpu")
    widths = [m.out_features for m in run.model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [500, 64] and run.model.latent_dim == 50
    # the classifier learns from the 100 labels: 27% of the test digits after 2 epochs (10% by
    # chance), and every test ELBO line is the unlabelled bound, well above -64 log 2
    accuracy = [m["test_accuracy"] for m in _metrics(out)]
    assert accuracy[0] < accuracy[1] and accuracy[1] > 0.2
    assert all(-35 < m["test_elbo"] < -20 for m in _metrics(out))
    # alpha: the paper's 0.1 N / N_labelled by default (N the 1,437 training digits), or --alpha
    trained, objective = _semi_supervised(run.config, run.data, run.guide)
    assert objective.loss.alpha == pytest.approx(paper_alpha(1437, 100)) == 1.437
    assert len(trained.train) == 1437 - 100 and objective.num_labelled == 100
    given = replace(run.config, vae=replace(run.config.vae, alpha=3.0))
    assert _semi_supervised(given, run.data, run.guide)[1].loss.alpha == 3.0
    # the recorded points are the ones taken (a resumed run reads them from its checkpoint)
    given = replace(run.config, labelled=tuple(range(0, 200, 2)))
    trained, objective = _semi_supervised(given, run.data, run.guide)
    assert objective.labelled.tolist() == list(range(0, 200, 2))
    assert torch.equal(trained.train[:50], run.data.train[1:100:2])  # the others, in order
    with pytest.raises(InputError, match="records 99 labelled points, not 100 distinct"):
        _semi_supervised(replace(given, labelled=given.labelled[:99]), run.data, run.guide)


@pytest.mark.parametrize(
    "flags, wrong",
    [
        ([], "--model m2 needs --labeled N"),
        (["--labeled", "2000"], "--labeled 2000 on digits: n (2000) exceeds the 1437 points"),
        (["--labeled", "55"], "n (55) must be a multiple of num_classes (10)"),
        (["--labeled", "1400"], "class 8 has 135 points, fewer than the 140 per class"),
        (["--labeled", "50", "--dataset", "pinwheel"], "pinwheel does not have both"),
        (["--labeled", "50", "--guide", "planar"], "--model m2 takes no --guide"),
        (["--labeled", "50", "--prior", "mog"], "--model m2 takes no --prior"),
        (["--labeled", "50", "--architecture", "conv"], "--model m2 takes no --architecture"),
        (["--labeled", "50", "--binarize", "gray"], "digits (gray) is not binary"),
        (["--labeled", "50", "--likelihood", "gaussian"], "--model m2 takes no --likelihood"),
        (["--labeled", "50", "--loss", "elbo"], "--model m2 takes no --loss"),
        (["--labeled", "50", "--alpha", "-1"], "--alpha must be a finite number >= 0"),
        (["--model", "vae", "--labeled", "50"], "--labeled applies to --model m2 only"),
        (["--model", "vae", "--alpha", "1"], "--alpha applies to --model m2 only"),
        (["--model", "vae", "--balanced"], "--balanced applies to --model m2 only"),
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
        (["gaps", "--limit", "5"], "evaluate reports its log p(x)", "gaps.json"),
        (["evaluate", "--method", "ais"], "evaluate it with --method is", "evaluate.json"),
    ],
)
def test_gaps_and_ais_are_refused_in_one_line(trained, tmp_path, command, wrong, record, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("evaluate.json"))
    before = sorted(p.name for p in run.iterdir())
    code, stdout, err = run_cli(*command, "--run", run, "--device", "cpu", capsys=capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert wrong in err and sorted(p.name for p in run.iterdir()) == before


def test_digits_keep_the_labels_of_their_training_points():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    label = {row.tobytes(): int(k) for row, k in zip(bunch.data, bunch.target, strict=True)}
    labels_of = lambda d: [label[r.tobytes()] for r in d.train.flatten(1).double().mul(16).numpy()]  # noqa: E731
    data = load_data(DataConfig("digits", "gray"))
    assert data.train_labels.shape == (1437,) and data.train_labels.dtype == torch.long
    assert labels_of(data) == data.train_labels.tolist()
    held = data.hold_out(100, seed=1)  # the labels follow their points
    assert labels_of(held) == held.train_labels.tolist()


@pytest.mark.parametrize(
    "picture, wrong",
    [
        ("samples", "samples picture needs a model p(z) p(x|z), not M2's"),
        ("latent", "latent picture needs a model p(z) p(x|z), not M2's"),
        ("completions", "completions picture needs a conditional VAE"),
    ],
)
def test_a_picture_that_does_not_apply_to_m2_is_one_line(trained, tmp_path, picture, wrong, capsys):
    out = tmp_path / "pictures"
    code, stdout, err = run_cli("plot", "--run", trained, "--out", out, "--pictures", picture,
                                "--device", "cpu", capsys=capsys)  # fmt: skip
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert wrong in err and not list(out.glob("*.png"))


def test_the_analogies_picture_needs_an_m2_run(tmp_path, capsys):
    run = tmp_path / "vae"
    flags = ["--dataset", "digits", "--hidden", "8", "--latent-dim", "2", "--epochs", "1"]
    assert (
        run_cli("train", *flags, "--quiet", "--device", "cpu", "--out", run, capsys=capsys)[0] == 0
    )
    code, _, err = run_cli("plot", "--run", run, "--out", tmp_path / "p", "--pictures",
                           "analogies", "--device", "cpu", capsys=capsys)  # fmt: skip
    assert code == 2 and "analogies picture needs a semi-supervised M2 run" in err


@needs_mnist
def test_mnist_keeps_its_training_labels_and_trains_m2_through_the_generic_loop():
    """MNIST's 60,000 training labels (LeCun et al.'s published class counts), and 300 of its
    digits, 100 labelled, through the loop and the picture at 28x28."""
    data = load_data(DataConfig("mnist", "static"))
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(data.train_labels).tolist() == counts
    small = data.head(300, 100)
    chosen = balanced_labelled(small.train_labels, 20, 10, seed=0)
    objective = SemiSupervised(small, chosen, alpha=1.5, batch_size=50, seed=0)
    rest = small.subset(torch.tensor([i for i in range(300) if i not in set(chosen.tolist())]))
    vae = VAEConfig(model="m2", labeled=20, latent_dim=4, network=NetworkConfig(hidden=(32,)))
    model, guide = build_vae(vae, small)
    metrics = train(model, guide, rest, TrainConfig(epochs=2, batch_size=50), quiet=True,
                    objective=objective)  # fmt: skip
    assert -784 * 0.7 < metrics[0]["test_elbo"] < metrics[-1]["test_elbo"] < 0
    # static binarization: the test points are the tensor itself
    assert metrics[-1]["test_accuracy"] == m2_accuracy(guide, small.test, small.test_labels)
    grid = analogies_figure(model, guide, small, seed=0).axes[0].images[0].get_array()
    assert grid.shape == (8 * 29 - 1, 11 * 29 - 1)
