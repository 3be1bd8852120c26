"""Per-data-set defaults of ppl-vae train: laid under the flags given, recorded, kept on resume."""

import json
from types import SimpleNamespace

import pytest
from helpers import run_cli

from ppl_vae import cli
from ppl_vae.data import DataConfig
from ppl_vae.model import LearnedGaussianLikelihood
from ppl_vae.presets import dataset_defaults, presets_help
from ppl_vae.runs import load_run, train_run
from ppl_vae.svi import TrainConfig
from ppl_vae.vae import VAEConfig


@pytest.fixture
def configs(monkeypatch):
    """The configurations ``ppl-vae train`` would start a run with (nothing is trained)."""
    seen = []

    def record(data, vae, train, *args, **kwargs):
        seen.append((data, vae, train))
        return SimpleNamespace(metrics=[])

    monkeypatch.setattr(cli, "train_run", record)
    return seen


@pytest.mark.parametrize("dataset", ["pinwheel", "moons", "ring8"])
def test_the_2d_sets_default_to_the_heteroscedastic_gaussian_with_a_kl_warm_up(
    dataset, configs, capsys
):
    assert run_cli("train", "--dataset", dataset, capsys=capsys)[0] == 0
    ((_, vae, train),) = configs
    assert vae.likelihood == "gaussian-hetero" and vae.latent_dim == 2
    assert vae.prior == "mog" and vae.prior_components == 20
    assert train.kl_warmup == 10 and train.epochs == 400 and train.lr_schedule == "cosine"


@pytest.mark.parametrize(
    "flags, prior, components",
    [(["--prior", "normal"], "normal", None), (["--prior", "vamp"], "vamp", None),
     (["--prior-components", "8"], "mog", 8), (["--model", "two-layer"], "normal", None)],
)  # fmt: skip
def test_the_preset_prior_gives_way_to_a_prior_given_or_a_model_with_its_own(
    flags, prior, components, configs, capsys
):
    """Another prior does not inherit the mixture's 20 components, nor does the two-layer model
    (which refuses any prior but its own upper layer) get the mixture at all."""
    code, _, err = run_cli("train", "--dataset", "pinwheel", *flags, capsys=capsys)
    assert code == 0, err
    ((_, vae, _),) = configs
    assert (vae.prior, vae.prior_components) == (prior, components)


@pytest.mark.parametrize(
    "flags, delay, warmup",
    [([], 2, 5), (["--kl-delay", "0"], 0, 5), (["--kl-warmup", "20"], 2, 20),
     (["--dataset", "pinwheel"], 2, 5), (["--loss", "iwae", "--num-particles", "5"], 0, 0)],
)  # fmt: skip
def test_the_vampprior_starts_with_two_epochs_at_kl_weight_zero(
    flags, delay, warmup, configs, capsys
):
    """--prior vamp lays its KL delay and warm-up under the flags given (over a data set's
    warm-up), and none under a loss without a KL term."""
    code, _, err = run_cli("train", "--dataset", "mnist", "--prior", "vamp", *flags, capsys=capsys)
    assert code == 0, err
    ((_, vae, train),) = configs
    assert vae.prior == "vamp" and (train.kl_delay, train.kl_warmup) == (delay, warmup)
    assert "For --prior vamp: --kl-delay 2 --kl-warmup 5" in presets_help()


def test_mnist_keeps_the_dataclass_defaults_bernoulli(configs, capsys):
    assert dataset_defaults("mnist") == {}
    assert run_cli("train", "--dataset", "mnist", capsys=capsys)[0] == 0
    ((_, vae, train),) = configs
    assert vae == VAEConfig() and train == TrainConfig()  # likelihood None: Bernoulli, binary


def test_flags_given_win_over_the_preset(configs, capsys):
    args = ["--likelihood", "gaussian", "--sigma", "0.5", "--latent-dim", "3", "--kl-warmup", "0"]
    assert run_cli("train", "--dataset", "ring8", *args, capsys=capsys)[0] == 0
    ((_, vae, train),) = configs
    assert (vae.likelihood, vae.sigma, vae.latent_dim, train.kl_warmup) == ("gaussian", 0.5, 3, 0)


def test_no_warm_up_is_laid_under_the_iwae_loss(configs, capsys):
    assert run_cli("train", "--dataset", "moons", "--loss", "iwae", capsys=capsys)[0] == 0
    ((_, vae, train),) = configs
    assert vae.likelihood == "gaussian-hetero" and train.kl_warmup == 0


def test_help_names_the_presets(capsys):
    assert "For pinwheel, moons, ring8: --likelihood gaussian-hetero" in presets_help()
    assert cli.main(["train", "--help"]) == 0
    assert "--kl-warmup 10" in " ".join(capsys.readouterr().out.split())


def test_resume_of_an_older_2d_run_keeps_its_recorded_likelihood(tmp_path, capsys):
    """A run recorded before the presets (likelihood None, no warm-up) goes on as it was."""
    out = tmp_path / "old"
    data = DataConfig("pinwheel", num_train=200, num_test=50)
    vae = VAEConfig(latent_dim=2)
    train_run(data, vae, TrainConfig(epochs=1), out, "cpu", quiet=True, pictures=False)
    code, _, err = run_cli("train", "--resume", "--out", out, "--epochs", "2", "--quiet",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["vae"]["likelihood"] is None and recorded["vae"]["latent_dim"] == 2
    assert recorded["train"]["kl_warmup"] == 0
    run = load_run(out, "cpu")
    assert len(run.metrics) == 2 and isinstance(run.model.likelihood, LearnedGaussianLikelihood)
