"""The EM baseline as a run: MixtureConfig, em_run's files, and the ``em`` command."""

import json

import numpy as np
import pytest
from helpers import needs_mnist, run_cli

from ppl_vae.cli import main
from ppl_vae.data import DataConfig, load_data
from ppl_vae.mixture import GaussianMixture

# -- command line ----------------------------------------------------------------------------------


def test_em_command_writes_results_and_a_density_picture(tmp_path, capsys):
    out = tmp_path / "em"
    code, stdout, err = run_cli(
        "em", "--dataset", "pinwheel", "--components", "8", "--covariance", "full",
        "--device", "cpu", "--out", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "mixture.png",
        "results.json",
        "written.json",
    ]
    r = json.loads((out / "results.json").read_text())
    data = load_data(DataConfig("pinwheel"))
    gm = GaussianMixture(8, seed=0).fit(data.train.double())
    assert r["test_log_likelihood"] == pytest.approx(gm.score(data.test.double()), rel=1e-12)
    assert r["train_log_likelihood"] == pytest.approx(gm.score(data.train.double()), rel=1e-12)
    assert r["n_iter"] == gm.n_iter_ and r["converged"] is True and r["seconds"] > 0
    assert r["settings"]["mixture"]["components"] == 8 and r["num_test"] == 2000
    assert r["settings"]["data"]["name"] == r["settings"]["data"]["dataset"] == "pinwheel"
    assert f"test {r['test_log_likelihood']:.4f}" in stdout
    assert (out / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_mnist
def test_em_command_on_mnist_fits_a_bernoulli_mixture(tmp_path, capsys):
    out = tmp_path / "mnist"
    code, _, err = run_cli(
        "em", "--dataset", "mnist", "--components", "3", "--max-iter", "3", "--init", "random",
        "--dtype", "float32", "--device", "cpu", "--out", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["mixture"] == "BernoulliMixture" and r["n_iter"] == 3
    # three components: far better than uniform pixels (784 log 2 = 543 nats), worse than a VAE
    assert -230 < r["test_log_likelihood"] < -150
    assert (out / "mixture.png").stat().st_size > 1000


def test_em_help_documents_every_flag(capsys):
    assert main(["em", "--help"]) == 0
    text = capsys.readouterr().out
    flags = ["--dataset", "--components", "--covariance", "--max-iter", "--tol", "--reg-covar",
             "--seed", "--data-dir", "--n-init", "--out"]  # fmt: skip
    assert not [f for f in flags if f not in text]


@pytest.fixture
def bad_em_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    nan = x.copy()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "few.npy", x[:9])  # 9 points: 8 for training, 1 for testing
    np.save(tmp_path / "constant.npy", np.full((50, 2), 3.0))
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path


BAD = [
    (["--components", "0"], "n_components must be a positive integer"),
    (["--covariance", "banded"], "invalid choice: 'banded'"),
    (["--max-iter", "-1"], "max_iter must be a non-negative integer"),
    (["--tol", "-1"], "tol must be a non-negative number"),
    (["--reg-covar", "-1"], "reg_covar must be a non-negative"),
    (["--n-init", "0"], "n_init must be a positive integer"),
    (["--components", "two"], "invalid int value"),
    (["--dataset", "cifar"], "unknown data set 'cifar'"),
    (["--dataset", "{tmp}/nan.npy"], "NaN or infinite"),
    (["--dataset", "{tmp}/few.npy", "--components", "9"], "8 points but n_components=9"),
    (["--dataset", "{tmp}/constant.npy", "--reg-covar", "0"], "increase reg_covar"),
    (["--out", "{tmp}/a_file/run"], "cannot create output directory"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_em_bad_input_is_one_line_exit_2_and_leaves_nothing(args, message, bad_em_files, capsys):
    before = sorted(bad_em_files.rglob("*"))
    args = [a.replace("{tmp}", str(bad_em_files)) for a in args]
    out = [] if "--out" in args else ["--out", str(bad_em_files / "run")]
    dataset = [] if "--dataset" in args else ["--dataset", "ring8"]
    code, _, err = run_cli("em", *dataset, *args, *out, capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("ppl-vae") and "error:" in err
    assert "Traceback" not in err
    assert sorted(bad_em_files.rglob("*")) == before  # no half-written files or folders
