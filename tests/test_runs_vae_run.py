"""VAE runs on disk: resume, files per epoch, divergence, loading and evaluation."""

import json
import math
import os

import pytest
import torch

from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import RunDir, load_run, train_run
from ppl_vae.svi import TrainConfig, mean_elbo
from ppl_vae.vae import VAEConfig


def small_run_configs():
    data = DataConfig("pinwheel", num_train=1000, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
    return data, vae


def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(tmp_path):
    data, vae = small_run_configs()
    config = TrainConfig(epochs=4, kl_warmup=3)
    straight = train_run(data, vae, config, tmp_path / "a", "cpu", pictures=False)
    train_run(data, vae, TrainConfig(epochs=2, kl_warmup=3), tmp_path / "b", "cpu", pictures=False)
    resumed = train_run(data, vae, config, tmp_path / "b", "cpu", resume=True, pictures=False)

    def numbers(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert numbers(resumed.metrics) == numbers(straight.metrics)
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert numbers(lines) == numbers(straight.metrics)
    (a, _), (b, _) = RunDir(tmp_path / "a").load(), RunDir(tmp_path / "b").load()
    assert a.epoch == b.epoch == 4
    for name, value in a.params.items():
        assert torch.equal(value, b.params[name]), name


def test_metrics_and_checkpoint_are_written_each_epoch(tmp_path):
    data, vae = small_run_configs()
    run = train_run(data, vae, TrainConfig(epochs=2), tmp_path, "cpu")
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {"epoch", "train_elbo", "test_elbo", "seconds"} <= lines[0].keys()
    pictures = ["curves.png", "density.png", "latent.png", "samples.png"]  # for 2-D data
    names = [".lock", "best.pt", "checkpoint.pt", "config.json", "metrics.jsonl", *pictures]
    names = sorted([*names, "written.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    umask = os.umask(0)
    os.umask(umask)
    for name in names:  # atomic writes keep the usual permissions
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # a loaded run reproduces the recorded test ELBO exactly
    loaded = load_run(tmp_path, "cpu")
    again = mean_elbo(loaded.model, loaded.guide, loaded.data, "test", 1000, seed=0)
    assert again == pytest.approx(run.metrics[-1]["test_elbo"], abs=1e-6)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import ppl_vae.runs.train as vae_run

    data, vae = small_run_configs()
    train = vae_run.train

    def poisoned(model, guide, data, config, **kwargs):
        def poison(metrics):  # after epoch 1, corrupt a decoder weight
            if metrics["epoch"] == 1:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

        return train(model, guide, data, config, on_epoch=poison, **kwargs)

    monkeypatch.setattr(vae_run, "train", poisoned)
    kept = "epoch 2.*the checkpoint of epoch 1 in .* is intact"
    with pytest.raises(FloatingPointError, match=kept):
        train_run(data, vae, TrainConfig(epochs=3), tmp_path, "cpu", quiet=True)
    state, _ = RunDir(tmp_path).load()
    assert state.epoch == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert all(math.isfinite(v) for v in state.params["model$$$decoder.net.0.weight"].flatten())


def test_a_nan_in_the_first_epoch_says_nothing_was_kept(tmp_path, monkeypatch):
    import ppl_vae.runs.train as vae_run

    data, vae = small_run_configs()
    train = vae_run.train

    def poisoned(model, guide, data, config, **kwargs):
        calls = []  # the first call (collecting parameters, validated) stays finite

        def nan_after_first(module, inputs, output):
            if not torch.is_grad_enabled():  # the test ELBO (no gradient) stays finite
                return output
            calls.append(1)
            return output * float("nan") if len(calls) > 1 else output

        model.decoder.register_forward_hook(nan_after_first)
        return train(model, guide, data, config, **kwargs)

    monkeypatch.setattr(vae_run, "train", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 1; .*no epoch finished"):
        config = TrainConfig(epochs=2, capture=False)
        train_run(data, vae, config, tmp_path, "cpu", quiet=True)
    assert not (tmp_path / "checkpoint.pt").exists()


EVALUATE_KEYS = {
    "method", "split", "num_points", "num_samples", "nll", "nll_standard_error", "elbo", "ess",
    "iwae", "seconds", "epoch", "checkpoint", "chunk_size", "batch_size", "seed", "limit", "device",
    "processes", "log_px", "pareto_k", "active_units", "latent_activity", "kl_per_dim",
    "mutual_information",
}  # fmt: skip


def test_evaluate_run_writes_evaluate_json_with_the_keys_scripts_read(tmp_path):
    from ppl_vae.runs import EvaluateConfig, evaluate_run

    data, vae = small_run_configs()
    run = train_run(data, vae, TrainConfig(epochs=1), tmp_path, "cpu", quiet=True, pictures=False)
    config = EvaluateConfig(num_samples=30, limit=40, batch_size=16, seed=2)
    record = evaluate_run(run, config)
    assert set(record) == EVALUATE_KEYS
    assert record == json.loads((tmp_path / "evaluate.json").read_text())
    assert record["num_points"] == len(record["log_px"]) == 40 and record["iwae"].keys() == {
        "1",
        "10",
    }
    # from the folder, without writing: the same estimate
    again = evaluate_run(tmp_path, config, device="cpu", write=False)
    assert again["log_px"] == record["log_px"]
    # the mean log p(x) lies above the mean ELBO from the same draws
    assert -record["nll"] > record["elbo"]
    # collapse diagnostics on the same 40 points; no k-hat from K = 30 (too few tail weights)
    latent = len(record["kl_per_dim"])
    assert record["pareto_k"] is None and len(record["latent_activity"]) == latent
    assert 0 <= record["active_units"] <= latent and min(record["kl_per_dim"]) >= 0
    assert 0 <= record["mutual_information"] <= math.log(40) + 1e-9


def test_drawing_pictures_every_epoch_leaves_the_training_numbers_unchanged(tmp_path):
    data, vae = small_run_configs()
    config = TrainConfig(epochs=2)
    plain = train_run(data, vae, config, tmp_path / "a", "cpu", quiet=True, pictures=False)
    drawn = train_run(data, vae, config, tmp_path / "b", "cpu", quiet=True, plot_every=1)

    def numbers(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert numbers(drawn.metrics) == numbers(plain.metrics)
    assert (tmp_path / "b" / "density.png").is_file() and not (
        tmp_path / "a" / "curves.png"
    ).exists()
    with pytest.raises(ValueError, match="plot_every must be a positive number"):
        train_run(data, vae, config, tmp_path / "c", "cpu", plot_every=0)


def test_resume_reads_the_checkpoint_once_and_refuses_one_replaced_meanwhile(tmp_path, monkeypatch):
    from ppl_vae.runs import ResumePoint, resume_run

    data, vae = small_run_configs()
    train_run(data, vae, TrainConfig(epochs=1), tmp_path, "cpu", quiet=True, pictures=False)
    reads = []
    load = RunDir.load
    monkeypatch.setattr(RunDir, "load", lambda self: reads.append(1) or load(self))
    run = resume_run(tmp_path, {"train": {"epochs": 2}}, "cpu", quiet=True, pictures=False)
    assert len(reads) == 1 and [m["epoch"] for m in run.metrics] == [1, 2]
    # the settings given are laid over the record and checked there, once
    point = ResumePoint.read(RunDir(tmp_path), {"train": {"epochs": 5, "capture": False}})
    assert (point.config.train.epochs, point.config.train.capture) == (5, False)
    assert point.config.vae == vae and point.state.epoch == 2
    with pytest.raises(InputError, match="--lr 0.5 contradicts the run's recorded lr=0.001"):
        ResumePoint.read(RunDir(tmp_path), {"train": {"epochs": 5, "lr": 0.5}})
    # a checkpoint replaced between the read and the lock is not continued from a stale state
    run_dir = RunDir(tmp_path)
    point = ResumePoint.read(run_dir, {"train": {"epochs": 3}})
    point.check_unchanged(run_dir)
    state, config = load(run_dir)
    run_dir.save(state, config)
    with pytest.raises(InputError, match="changed while this command read it"):
        point.check_unchanged(run_dir)
