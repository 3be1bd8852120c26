"""The checkpoint format: round trip, config.json, and runs written before the redesign."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import EvaluateConfig, RunConfig, RunDir, evaluate_run, load_run, train_run
from ppl_vae.svi import TrainConfig
from ppl_vae.vae import VAEConfig

LEGACY = Path(__file__).parent / "fixtures" / "run-v0"


def small_run(tmp_path, **vae):
    data = DataConfig("pinwheel", num_train=300, num_test=100)
    config = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,)), **vae)
    return train_run(
        data, config, TrainConfig(epochs=2), tmp_path, "cpu", quiet=True, pictures=False
    )


def test_the_checkpoint_holds_the_state_and_the_configuration_as_plain_data(tmp_path):
    run = small_run(tmp_path, guide="iaf", flow_length=2)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["format"] == 2 and ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    assert json.loads(json.dumps(ckpt["config"])) == ckpt["config"]  # JSON-able
    assert json.loads((tmp_path / "config.json").read_text()) == ckpt["config"]
    assert RunConfig.from_dict(ckpt["config"]) == run.config
    state, config = RunDir(tmp_path).load()
    assert config == run.config and state.epoch == 2
    assert state.metrics == run.metrics


def test_unknown_formats_and_foreign_files_are_refused(tmp_path):
    small_run(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.save({**ckpt, "format": 7}, tmp_path / "checkpoint.pt")
    with pytest.raises(InputError, match="checkpoint format 7, newer than this ppl_vae reads"):
        RunDir(tmp_path).load()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(InputError, match="is not a ppl_vae checkpoint"):
        RunDir(tmp_path).load()


@pytest.mark.parametrize("guide", ["iaf", "fullrank", "lowrank"])
def test_a_guide_whose_parameters_changed_meaning_is_refused_from_format_1(tmp_path, guide):
    """Format 1 wrote iaf's gated step, fullrank's one-head L and lowrank's factor in the data's
    units (iaf under the names and shapes it has now): read as today's guide they would be
    another distribution, or fail on a shape with a message that does not say why."""
    small_run(tmp_path / "new", guide=guide)
    small_run(tmp_path / "gaussian")
    for run in ("new", "gaussian"):
        path = tmp_path / run / "checkpoint.pt"
        torch.save({**torch.load(path, weights_only=False), "format": 1}, path)
    with pytest.raises(InputError, match=f"holds a {guide} guide of an earlier ppl_vae .*train"):
        RunDir(tmp_path / "new").load()
    assert RunDir(tmp_path / "gaussian").load()[0].epoch == 2  # other guides read as before


def test_configurations_stored_with_the_old_field_names_load(tmp_path):
    """ppl_vae.compat: DataConfig.name and NetworkConfig.kind were renamed after their flags."""
    run = small_run(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    old = json.loads(json.dumps(ckpt["config"]))
    old["data"]["name"] = old["data"].pop("dataset")
    old["vae"]["network"]["kind"] = old["vae"]["network"].pop("architecture")
    torch.save({**ckpt, "config": old}, tmp_path / "checkpoint.pt")
    state, config = RunDir(tmp_path).load()
    assert config == run.config and config.data.dataset == "pinwheel" and state.epoch == 2


# -- a run written by ppl_vae before the redesign (tests/fixtures/run-v0) ------------------------


def expected():
    return json.loads((LEGACY / "expected.json").read_text())


def test_a_pre_redesign_run_loads_with_its_configuration():
    run = load_run(LEGACY, "cpu")
    assert run.vae_config == VAEConfig(
        latent_dim=2, network=NetworkConfig(hidden=(16,)), guide="planar", flow_length=2
    )
    assert run.data_config == DataConfig("pinwheel", num_train=600, num_test=200, seed=3)
    assert run.train_config == TrainConfig(epochs=2, batch_size=100, seed=3, loss="elbo")
    assert [m["epoch"] for m in run.metrics] == [1, 2]


def test_a_pre_redesign_run_evaluates_to_the_old_codes_estimate_within_monte_carlo_error():
    """The old code drew every batch from one stream; batches now draw from seeds derived from
    the seed and the batch index (so that sharding changes nothing), so the figures agree to
    Monte Carlo error: over 12 seeds this NLL has a spread of 0.029 nats and the test ELBO of
    the epoch-2 parameters 0.051; the tolerances are four times those."""
    want = expected()["evaluate"]
    config = EvaluateConfig(
        split=want["split"], num_samples=want["num_samples"], batch_size=want["batch_size"],
        iwae_k=tuple(want["iwae_ks"]), seed=want["seed"], limit=want["limit"],
    )  # fmt: skip
    got = evaluate_run(LEGACY, config, device="cpu", write=False, quiet=True)
    assert got["nll"] == pytest.approx(want["nll"], abs=0.12)
    assert got["iwae"]["10"] == pytest.approx(want["iwae"]["10"], abs=0.12)
    assert got["elbo"] == pytest.approx(want["elbo"], abs=0.2)
    assert got["nll"] != want["nll"]  # the draws did change: the tolerance is what is tested
    again = evaluate_run(LEGACY, config, device="cpu", write=False, quiet=True)
    assert again["log_px"] == got["log_px"]  # deterministic for the seed


def test_a_pre_redesign_run_resumes_to_the_epoch_the_old_code_gave(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "run")
    old = load_run(tmp_path / "run", "cpu")
    config = replace(old.train_config, epochs=3)
    run = train_run(
        old.data_config, old.vae_config, config, tmp_path / "run", "cpu", resume=True, quiet=True
    )
    want = expected()["resume_to_epoch_3"]
    got = run.metrics[-1]
    for key in ("epoch", "train_elbo", "kl_weight"):  # training itself is unchanged
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # the test ELBO's draws are seeded per batch now (see the test above): Monte Carlo error
    assert got["test_elbo"] == pytest.approx(want["test_elbo"], abs=0.2)
    # the resumed run is written in the new format, its first epochs kept
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["format"] == 2 and [m["epoch"] for m in ckpt["metrics"]] == [1, 2, 3]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_a_run_of_your_own_model_keeps_its_state_but_no_configuration(tmp_path):
    from helpers import Flatten, linear_gaussian_vae

    from ppl_vae.guides import GaussianGuide
    from ppl_vae.svi import train

    model, data, _ = linear_gaussian_vae(n=200)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    run = RunDir(tmp_path / "own")
    run.start(None, [])
    metrics = train(model, guide, data, TrainConfig(epochs=2), checkpoint=run.save, quiet=True)
    assert run.state().epoch == 2 and run.state().metrics == metrics
    assert not (tmp_path / "own" / "config.json").exists()
    with pytest.raises(InputError, match="no configuration builds; load it with RunDir"):
        run.load()


class _Touch:
    """Unpickling this calls Path.touch(marker): a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused_and_never_run(tmp_path, capsys):
    from helpers import run_cli

    run = tmp_path / "downloaded"
    run.mkdir()
    marker = tmp_path / "code-ran"
    torch.save(
        {"epoch": 1, "params": {}, "optimizer": {}, "x": _Touch(marker)}, run / "checkpoint.pt"
    )
    with pytest.raises(InputError, match="would execute; it was not loaded"):
        RunDir(run).load()
    for command in (
        ["evaluate", "--run", run],
        ["plot", "--run", run],
        ["train", "--resume", "--out", run],
    ):
        code, _, err = run_cli(*command, capsys=capsys)
        assert code == 2 and "it was not loaded" in err and err.count("\n") == 1
    assert not marker.exists()


def test_new_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    small_run(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no allow-listed globals
    assert ckpt["format"] == 2 and isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor)
