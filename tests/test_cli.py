"""The ppl-vae command line: a short real run, --help, resume, and every bad-input case."""

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import needs_mnist, run_cli

from ppl_vae.cli import main
from ppl_vae.data import DataConfig
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import EvaluateConfig, MixtureConfig
from ppl_vae.svi import TrainConfig
from ppl_vae.vae import VAEConfig

TRAIN_FLAGS = [
    "--dataset", "--binarize", "--data-dir", "--latent-dim", "--architecture", "--network",
    "--hidden", "--activation", "--likelihood", "--sigma", "--guide", "--flow-length",
    "--flow-hidden", "--rank", "--epochs", "--batch-size", "--lr",
    "--loss", "--num-particles", "--beta", "--kl-warmup", "--seed", "--device", "--out",
    "--resume", "--quiet",
]  # fmt: skip


@needs_mnist
def test_one_short_mnist_epoch_writes_metrics_checkpoint_and_pictures(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "train", "--epochs", "1", "--batch-size", "200", "--out", str(out), capsys=capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "best.pt", "checkpoint.pt", "config.json", "curves.png", "interpolation.png",
        "latent.png",
        "metrics.jsonl", "reconstructions.png", "samples.png", "written.json",
    ]  # fmt: skip
    (metrics,) = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # One epoch of the 784-200-200-50 VAE lands near -180 nats; an untrained one is below -540.
    assert -230 < metrics["test_elbo"] < -130
    assert "test ELBO" in stdout


def test_pinwheel_with_defaults_and_resume(tmp_path, capsys):
    out = tmp_path / "pw"
    args = ["train", "--dataset", "pinwheel", "--latent-dim", "2", "--out", str(out), "--quiet"]
    assert run_cli(*args, "--epochs", "2", capsys=capsys)[0] == 0
    assert run_cli(*args, "--epochs", "3", "--resume", capsys=capsys)[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]
    assert (out / "samples.png").stat().st_size > 1000


def test_a_flow_guide_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "flow"
    args = ["train", "--dataset", "moons", "--latent-dim", "2", "--guide", "sylvester"]
    code, _, err = run_cli(*args, "--flow-length", "2", "--epochs", "1", "--out", str(out),
                           "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("evaluate", "--run", str(out), "--num-samples", "50", "--quiet",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "evaluate.json").read_text())
    assert result["elbo"] < -result["nll"] < 0  # ELBO <= log p(x), and moons are not degenerate
    assert result["mutual_information"] is None and len(result["kl_per_dim"]) == 2  # a flow


def test_help_documents_every_flag(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    missing = [flag for flag in TRAIN_FLAGS if flag not in text]
    assert not missing
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command, configs",
    [
        ("train", [DataConfig, VAEConfig, NetworkConfig, TrainConfig]),
        ("evaluate", [EvaluateConfig]),
        ("em", [MixtureConfig]),
    ],
)
def test_flags_and_defaults_come_from_the_configuration_dataclasses(command, configs):
    """Every field has a flag whose help is the field's, with the dataclass default."""
    import ppl_vae.cli as cli

    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    actions = {flag: a for a in sub.choices[command]._actions for flag in a.option_strings}
    for cls in configs:
        for f in dataclasses.fields(cls):
            if f.name in ("seed", "data_dir") or f.name == "network":
                continue
            if command == "em" and cls is DataConfig and f.name != "dataset":
                continue
            flag = (f.metadata.get("flags") or [f"--{f.name.replace('_', '-')}"])[0]
            action = actions[flag]
            assert action.help.startswith(f.metadata["help"].replace("%", "%%")), flag
            default = cli.EM_DATA.get(f.name, f.default) if command == "em" else f.default
            if default not in (None, dataclasses.MISSING) and not isinstance(default, bool):
                shown = default if not isinstance(default, tuple) else ",".join(default)
                assert action.help.endswith(f"(default: {shown})"), flag


BAD = [
    (["--dataset", "cifar"], "unknown data set 'cifar'"),
    (["--dataset", "pinwheel", "--guide", "flowy"], "invalid choice: 'flowy'"),
    (["--dataset", "pinwheel", "--likelihood", "poisson"], "invalid choice: 'poisson'"),
    (["--dataset", "pinwheel", "--activation", "swishy"], "invalid choice: 'swishy'"),
    (["--dataset", "pinwheel", "--guide", "planar", "--rank", "5"], "--rank does not apply"),
    (["--dataset", "pinwheel", "--flow-length", "3"], "--flow-length does not apply to the guide"),
    (["--dataset", "pinwheel", "--guide", "radial", "--flow-hidden", "8"], "--flow-hidden does"),
    (["--dataset", "pinwheel", "--likelihood", "bernoulli", "--sigma", "1"], "--sigma does not"),
    (["--dataset", "pinwheel", "--network", "conv", "--hidden", "8"], "--hidden does not apply"),
    (["--dataset", "pinwheel", "--likelihood", "bernoulli"], "needs binary data"),
    (["--dataset", "{tmp}/nan.npy"], "NaN or infinite"),
    (["--dataset", "{tmp}/inf.npy"], "NaN or infinite"),
    (["--dataset", "pinwheel", "--architecture", "conv"], "conv network needs 1x28x28"),
    (["--dataset", "pinwheel", "--out", "{tmp}/a_file/run"], "cannot create output directory"),
    (["--dataset", "pinwheel", "--epochs", "0"], "epochs must be a positive"),
    (["--dataset", "pinwheel", "--batch-size", "-5"], "batch_size must be a positive"),
    (["--dataset", "pinwheel", "--lr", "0"], "learning rate must be positive"),
    (["--dataset", "pinwheel", "--lr=-1e-3"], "learning rate must be positive"),
    (["--dataset", "pinwheel", "--hidden", "200,x"], "comma-separated integers"),
    (["--dataset", "{tmp}/missing.npy"], "does not exist"),
    (["--dataset", "pinwheel", "--device", "tpu"], "unknown device 'tpu'"),
    (["--dataset", "pinwheel", "--guide", "planar", "--flow-length", "0"], "flow_length must be"),
    (
        ["--dataset", "pinwheel", "--latent-dim", "2", "--guide", "lowrank", "--rank", "3"],
        "rank must lie in 1..2",
    ),
]


@pytest.mark.parametrize("args, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args, message, bad_files, capsys):
    before = sorted(bad_files.rglob("*"))
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    out = [] if "--out" in args else ["--out", str(bad_files / "run")]
    epochs = [] if "--epochs" in args else ["--epochs", "1"]
    code, _, err = run_cli("train", *args, *out, *epochs, capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("ppl-vae") and "error:" in err
    assert "Traceback" not in err
    assert sorted(bad_files.rglob("*")) == before  # no half-written files or folders


def test_missing_mnist_while_offline(bad_files, capsys, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    code, _, err = run_cli(
        "train", "--data-dir", str(bad_files / "empty_mnist"), "--out", str(bad_files / "run"),
        capsys=capsys,
    )  # fmt: skip
    assert code == 2
    assert "MNIST not found in" in err and "PPL_VAE_DATA" in err and err.count("\n") == 1
    assert not (bad_files / "run").exists()


def test_corrupt_or_missing_checkpoint_on_resume(bad_files, capsys):
    code, _, err = run_cli("train", "--resume", "--out", str(bad_files / "corrupt"), capsys=capsys)
    assert code == 2 and "unreadable or corrupt" in err and err.count("\n") == 1
    assert (bad_files / "corrupt" / "checkpoint.pt").read_bytes() == b"this is not a checkpoint"
    code, _, err = run_cli("train", "--resume", "--out", str(bad_files / "nowhere"), capsys=capsys)
    assert code == 2 and "no checkpoint at" in err


def test_a_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "train", "--dataset", "pinwheel", "--lr", "-1",
         "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_file_data_sets_train(tmp_path, capsys):
    x = torch.randn(300, 3)
    torch.save(x, tmp_path / "points.pt")
    code, _, err = run_cli(
        "train", "--dataset", str(tmp_path / "points.pt"), "--latent-dim", "1", "--epochs", "1",
        "--out", str(tmp_path / "r"), "--quiet", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err


@pytest.fixture(scope="module")
def pinwheel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pw"
    code = main(["train", "--dataset", "pinwheel", "--latent-dim", "2", "--hidden", "32",
                 "--epochs", "2", "--loss", "iwae", "--num-particles", "3", "--out", str(out),
                 "--lr-schedule", "constant", "--quiet"])  # fmt: skip
    assert code == 0
    return out


def test_evaluate_writes_nll_elbo_ess_and_settings(pinwheel_run, capsys):
    code, out, err = run_cli("evaluate", "--run", str(pinwheel_run), "--num-samples", "200",
                             "--chunk-size", "64", "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err
    record = json.loads((pinwheel_run / "evaluate.json").read_text())
    assert record["num_samples"] == 200 and record["num_points"] == 2000
    assert record["chunk_size"] == 64 and record["seconds"] > 0 and record["epoch"] == 2
    assert len(record["log_px"]) == 2000
    # log p(x) >= IWAE_100 >= IWAE_10 >= ELBO on average, and NLL is minus the mean log p(x)
    iwae = record["iwae"]
    assert -record["nll"] >= iwae["100"] >= iwae["10"] >= record["elbo"]
    assert record["nll"] == pytest.approx(-np.mean(record["log_px"]))
    assert 1 <= record["ess"] <= 200
    assert f"NLL {record['nll']:.2f}" in out
    k = record["pareto_k"]  # per-point k-hat of the same draws: share above 0.7, worst points
    assert 0 <= k["above_0.7"] <= 1 and len(k["worst_points"]) == 10
    assert all(0 <= i < 2000 for i in k["worst_points"])
    assert k["worst_k"] == sorted(k["worst_k"], key=lambda v: -float("inf") if v is None else -v)
    assert f"active units {record['active_units']}/" in out
    assert f"KL to N(0, I) {sum(record['kl_per_dim']):.2f}" in out  # whatever the prior


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "{tmp}/nowhere"], "no checkpoint at"),
        (["--run", "{run}", "--num-samples", "0"], "num_samples must be a positive"),
        (["--run", "{run}", "--chunk-size", "0"], "chunk_size must be a positive"),
        (["--run", "{run}", "--batch-size", "0"], "batch_size must be a positive"),
        (["--run", "{run}", "--iwae-k", "1,100"], "every --iwae-k must lie in 1..10"),
        (["--run", "{run}", "--iwae-k", "1,x"], "comma-separated integers"),
        (["--run", "{tmp}/corrupt"], "unreadable or corrupt"),
    ],
)
def test_evaluate_bad_input(args, message, pinwheel_run, bad_files, capsys):
    args = [a.replace("{tmp}", str(bad_files)).replace("{run}", str(pinwheel_run)) for a in args]
    before = sorted(pinwheel_run.iterdir())
    code, _, err = run_cli("evaluate", "--num-samples", "10", *args, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(pinwheel_run.iterdir()) == before


def test_an_internal_error_is_not_reported_as_bad_input(monkeypatch, tmp_path):
    """Only the project's own input errors exit 2; a bug keeps its traceback."""
    import ppl_vae.cli as cli

    def broken(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr(cli, "train_run", broken)
    with pytest.raises(TypeError, match="an internal bug"):
        main(["train", "--dataset", "pinwheel", "--out", str(tmp_path / "r")])


def test_python_dash_m_ppl_vae_is_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "train" in proc.stdout and "evaluate" in proc.stdout


def test_em_without_a_data_set_fits_the_pinwheel(tmp_path, capsys):
    code, out, err = run_cli("em", "--max-iter", "2", "--out", tmp_path / "em", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "em" / "results.json").read_text())["dataset"] == "pinwheel"


def _digest(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_plot_draws_every_picture_of_a_2d_run_and_changes_nothing(pinwheel_run, tmp_path, capsys):
    before = _digest(pinwheel_run)
    code, out, err = run_cli(
        "plot", "--run", pinwheel_run, "--out", tmp_path / "pics", capsys=capsys
    )
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert names == [
        ".lock",
        "curves.png",
        "density.png",
        "latent.png",
        "samples.png",
        "written.json",
    ]
    pictures = (tmp_path / "pics").glob("*.png")
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    assert _digest(pinwheel_run) == before  # the run is read, never changed
    code, _, err = run_cli("plot", "--run", pinwheel_run, "--out", tmp_path / "one",
                           "--pictures", "curves", capsys=capsys)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert code == 0 and names == [".lock", "curves.png", "written.json"]


@needs_mnist
def test_plot_draws_every_picture_of_an_mnist_run_with_a_2d_latent(tmp_path, capsys):
    run = tmp_path / "mnist"
    code, _, err = run_cli("train", "--latent-dim", "2", "--epochs", "1", "--batch-size", "500",
                           "--out", run, "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err
    for p in run.glob("*.png"):
        p.unlink()
    code, _, err = run_cli("plot", "--run", run, capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.glob("*.png")) == [
        "curves.png", "interpolation.png", "latent.png", "manifold.png", "reconstructions.png",
        "samples.png",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "{tmp}/nowhere"], "no checkpoint at"),
        (["--run", "{tmp}/empty_mnist"], "no checkpoint at"),
        (["--run", "{tmp}/corrupt"], "unreadable or corrupt"),
        (["--run", "{run}", "--pictures", "curves,heatmap"], "unknown picture 'heatmap'"),
        (["--run", "{run}", "--pictures", "manifold"], "the manifold picture needs images"),
        (["--run", "{run}", "--out", "{tmp}/a_file/pics"], "cannot create output directory"),
    ],
)
def test_plot_bad_input_is_one_line_exit_2_and_leaves_nothing(
    args, message, pinwheel_run, bad_files, capsys
):
    args = [a.replace("{tmp}", str(bad_files)).replace("{run}", str(pinwheel_run)) for a in args]
    before, files = _digest(pinwheel_run), sorted(bad_files.rglob("*"))
    code, _, err = run_cli("plot", *args, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _digest(pinwheel_run) == before and sorted(bad_files.rglob("*")) == files


def test_a_failed_picture_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import matplotlib.figure

    from ppl_vae.errors import WriteError
    from ppl_vae.plots import curves_figure
    from ppl_vae.runs.files import save_figure

    metrics = [{"epoch": 1, "train_elbo": -3.0, "test_elbo": -3.1, "kl_weight": 1.0}]
    path = save_figure(curves_figure(metrics), tmp_path / "curves.png")
    old = path.read_bytes()

    def half_then_fail(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(WriteError, match="cannot write .*curves.png: No space left on device; "
                       "the previous curves.png is intact"):  # fmt: skip
        save_figure(curves_figure(metrics), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_train_prints_a_line_per_epoch_off_a_terminal_and_quiet_only_the_result(tmp_path, capsys):
    args = ["train", "--dataset", "pinwheel", "--hidden", "16", "--epochs", "2"]
    code, out, err = run_cli(*args, "--out", tmp_path / "a", capsys=capsys)
    assert code == 0, err
    metrics = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines = err.splitlines()
    assert [s.split(":")[0] for s in lines] == ["epoch 1/2", "epoch 2/2"]
    # the figures recorded, and an ETA; pinwheel's KL warm-up over 10 epochs: the training
    # objective is taken at weights 0.1 and 0.2, which the lines say
    for line, m, weight in zip(lines, metrics, (0.1, 0.2), strict=True):
        assert m["kl_weight"] == pytest.approx(weight)
        assert (
            f"train {m['train_elbo']:.3f} (KL weight {weight:g}), "
            f"test ELBO {m['test_elbo']:.3f} nats" in line
        )
    assert "s to go" in lines[0] and "to go" not in lines[1]
    assert f"train ELBO {metrics[-1]['train_elbo']:.2f} (KL weight 0.2), test ELBO" in out
    assert f"test ELBO {metrics[-1]['test_elbo']:.2f}" in out
    code, out, err = run_cli(*args, "--out", tmp_path / "b", "--quiet", capsys=capsys)
    assert code == 0 and err == "" and f"test ELBO {metrics[-1]['test_elbo']:.2f}" in out


def test_evaluate_reports_the_running_nll_off_a_terminal(pinwheel_run, capsys):
    code, out, err = run_cli("evaluate", "--run", pinwheel_run, "--num-samples", "100",
                             "--batch-size", "500", capsys=capsys)  # fmt: skip
    assert code == 0, err
    record = json.loads((pinwheel_run / "evaluate.json").read_text())
    last = err.splitlines()[-1]  # the whole split done: its NLL is the result's
    assert last.startswith("log p(x), test: 2,000/2,000 points, ")
    assert f"NLL so far {record['nll']:.2f} nats" in last and "draws/s" in last
    assert f"NLL {record['nll']:.2f}" in out
    code, out, err = run_cli("evaluate", "--run", pinwheel_run, "--num-samples", "100",
                             "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0 and err == "" and "NLL" in out


def test_em_reports_its_iterations_off_a_terminal(tmp_path, capsys):
    code, out, err = run_cli("em", "--out", tmp_path / "em", capsys=capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "em" / "results.json").read_text())
    assert record["converged"]
    last = err.splitlines()[-1]  # the final iteration, whatever the spacing of the lines
    assert last.startswith("EM GaussianMixture K=8 on pinwheel: initialisation 1/1, ")
    assert f"iteration {record['n_iter']}: log-likelihood {record['history'][-1]:.4f}" in last
    assert last.endswith("converged")
    code, out, err = run_cli("em", "--out", tmp_path / "em", "--quiet", capsys=capsys)
    assert code == 0 and err == "" and "nats per point" in out


def test_a_warning_is_one_line_naming_ppl_vae(tmp_path, capsys):
    out = tmp_path / "pw"
    args = ["train", "--dataset", "pinwheel", "--latent-dim", "2", "--out", str(out), "--quiet"]
    assert run_cli(*args, "--epochs", "1", "--no-capture", capsys=capsys)[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["rng"]["data_device"] = "cuda"  # as if saved on a GPU: the stream cannot continue here
    torch.save(ckpt, out / "checkpoint.pt")
    code, _, err = run_cli(*args, "--epochs", "2", "--resume", capsys=capsys)
    assert code == 0
    (line,) = [s for s in err.splitlines() if "warning" in s.lower()]
    assert line.startswith("ppl-vae: warning: this run's data stream was saved on cuda and cannot")


NUMBERS = [  # issue 20: numbers that passed the checks, then failed late or ran for minutes
    (["--seed", "-1"], "seed must be an integer in [0, 2**63), got -1"),
    (["--seed", str(2**64 + 1)], "seed must be an integer in [0, 2**63)"),
    (["--beta", "inf"], "beta must be a finite number >= 0, got inf"),
    (["--lr", "inf"], "learning rate must be positive and finite, got inf"),
    (["--likelihood", "gaussian", "--sigma", "inf"], "sigma must be finite, got inf"),
    (["--hidden", "100000,100000"], "(--architecture mlp, --hidden 100000,100000, --latent-dim"),
    (["--latent-dim", "1000000000"], "GB of memory, more than the"),
    (["--guide", "planar", "--flow-length", "100000000"], "flow_length 100000000 is far more"),
    (["--num-particles", "10000000"], "a training step (10000000 particles of a batch of 100)"),
    (["--dataset", "{tmp}/no_features.npy"], "data have no features: shape (45, 0)"),
]


@pytest.mark.parametrize("args, message", NUMBERS, ids=[f"n{i}" for i in range(len(NUMBERS))])
def test_absurd_numbers_are_one_line_exit_2(args, message, bad_files, capsys):
    np.save(bad_files / "no_features.npy", np.zeros((50, 0), dtype=np.float32))
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    dataset = [] if "--dataset" in args else ["--dataset", "pinwheel"]
    out = ["--out", str(bad_files / "run"), "--epochs", "1"]
    code, _, err = run_cli("train", *dataset, *args, *out, capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("ppl-vae") and "Traceback" not in err
    assert not (bad_files / "run" / "checkpoint.pt").exists()


def test_a_data_file_saved_with_requires_grad_trains(tmp_path, capsys):
    torch.save(torch.nn.Parameter(torch.randn(60, 2)), tmp_path / "param.pt")
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train", "--dataset", tmp_path / "param.pt", "--epochs", "1", "--out", out,
        "--hidden", "8", "--latent-dim", "2", "--quiet", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("flag", ["--over", "--res", "--epo"])
def test_flags_are_never_abbreviated(flag, tmp_path, capsys):
    code, _, err = run_cli("train", "--dataset", "pinwheel", flag, "--out", tmp_path / "r",
                           capsys=capsys)  # fmt: skip
    assert code == 2 and f"unrecognized arguments: {flag}" in err and not (tmp_path / "r").exists()
