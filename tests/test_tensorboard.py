"""ppl-vae train --tensorboard: the event files read back with TensorBoard's own reader."""

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
from helpers import run_cli

from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import resume_run, train_run
from ppl_vae.runs.tensorboard import tag
from ppl_vae.svi import TrainConfig
from ppl_vae.vae import VAEConfig

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed (pip install -e '.[tensorboard]'; .[test] includes it)",
)

DATA = DataConfig("pinwheel", num_train=600, num_test=200)
VAE = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
TRAIN = TrainConfig(epochs=2, batch_size=100, validation=100, clip_grad=5.0)


def read_events(log_dir):
    """TensorBoard's reader of ``log_dir``, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def read_metrics(run_dir):
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_scalars_match(board, metrics, keys=None):
    """Every number of metrics.jsonl (of ``keys``, by default all of them, as with
    ``--validation`` and ``--clip-grad``) is the scalar of its tag at its epoch (float32)."""
    if keys is None:
        keys = {k for m in metrics for k in m if k != "epoch"}
        assert {"validation_elbo", "kl_weight", "lr", "grad_norm", "clipped", "seconds"} <= keys
    for key in keys:
        events = board.Scalars(tag(key))
        assert [e.step for e in events] == [m["epoch"] for m in metrics], key
        want = np.array([m[key] for m in metrics], dtype=np.float32)
        np.testing.assert_array_equal(np.array([e.value for e in events], np.float32), want)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2-epoch pinwheel run with its TensorBoard log, pictures drawn every epoch."""
    root = tmp_path_factory.mktemp("tb")
    train_run(
        DATA, VAE, TRAIN, root / "run", "cpu",
        quiet=True, plot_every=1, tensorboard=root / "board",
    )  # fmt: skip
    return root


@needs_tensorboard
def test_the_scalars_are_the_metrics_of_every_epoch(logged):
    board = read_events(logged / "board")
    assert_scalars_match(board, read_metrics(logged / "run"))
    assert tag("test_elbo") == "elbo/test"


@needs_tensorboard
def test_the_pictures_are_images_at_each_plot_and_at_the_end(logged):
    board = read_events(logged / "board")
    pictures = sorted(p.stem for p in (logged / "run").glob("*.png"))
    assert sorted(board.Tags()["images"]) == pictures == ["curves", "density", "latent", "samples"]
    for name in pictures:
        images = board.Images(name)
        assert [e.step for e in images] == [1, 2, 2]  # --plot-every 1, then the end
        assert min(e.width for e in images) > 100 and min(e.height for e in images) > 100


@needs_tensorboard
def test_the_configuration_is_logged_as_hparams_with_the_final_elbos(logged):
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = read_events(logged / "board")
    content = board.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["data.dataset"].string_value == "pinwheel"
    assert hparams["train.validation"].number_value == 100
    assert hparams["vae.network.hidden"].string_value == "[16]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    names = [m.name.tag for m in experiment.experiment.metric_infos]
    assert names == ["hparams/test_elbo", "hparams/best_validation_elbo"]
    metrics = read_metrics(logged / "run")
    (final,) = board.Scalars("hparams/test_elbo")
    assert (final.step, final.value) == (2, np.float32(metrics[-1]["test_elbo"]))
    (best,) = board.Scalars("hparams/best_validation_elbo")
    assert best.value == np.float32(max(m["validation_elbo"] for m in metrics))


@needs_tensorboard
def test_resume_logs_the_new_epochs_into_the_same_folder(logged, tmp_path):
    shutil.copytree(logged / "run", tmp_path / "run")
    shutil.copytree(logged / "board", tmp_path / "board")
    resume_run(
        tmp_path / "run", {"train": {"epochs": 3}}, "cpu",
        quiet=True, pictures=False, tensorboard=tmp_path / "board",
    )  # fmt: skip
    assert len(list((tmp_path / "board").glob("events.out.tfevents.*"))) == 2
    board = read_events(tmp_path / "board")
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert_scalars_match(board, metrics)
    assert [e.step for e in board.Scalars("hparams/test_elbo")] == [2, 3]


@needs_tensorboard
def test_a_new_run_into_the_folder_hides_what_it_showed(logged, tmp_path):
    shutil.copytree(logged / "board", tmp_path / "board")
    config = TrainConfig(epochs=1, batch_size=100, seed=1)
    train_run(
        DATA, VAE, config, tmp_path / "run", "cpu",
        quiet=True, pictures=False, tensorboard=tmp_path / "board",
    )  # fmt: skip
    board = read_events(tmp_path / "board")
    metrics = read_metrics(tmp_path / "run")
    assert_scalars_match(board, metrics, keys={"train_elbo", "test_elbo", "lr", "grad_norm"})
    assert [e.step for e in board.Scalars("hparams/test_elbo")] == [1]
    assert [len(board.Images(name)) for name in board.Tags()["images"]] == [0] * 4
    assert [e.step for e in board.Scalars("clipped")] == []  # the earlier run clipped


@needs_tensorboard
def test_an_interrupted_run_closes_its_log_with_the_epochs_done(tmp_path, monkeypatch):
    import ppl_vae.runs.tensorboard as tensorboard
    import ppl_vae.runs.train as vae_run

    train, closed = vae_run.train, []

    def interrupted(*args, **kwargs):
        def stop(metrics):
            if metrics["epoch"] == 2:
                raise KeyboardInterrupt

        return train(*args, on_epoch=stop, **kwargs)

    close = tensorboard.Board.close
    monkeypatch.setattr(vae_run, "train", interrupted)
    monkeypatch.setattr(tensorboard.Board, "close", lambda self: closed.append(close(self)))
    with pytest.raises(vae_run.Interrupted, match="checkpoint of epoch 2"):
        train_run(
            DATA, VAE, TrainConfig(epochs=3), tmp_path / "run", "cpu",
            quiet=True, tensorboard=tmp_path / "board",
        )  # fmt: skip
    assert len(closed) == 1
    board = read_events(tmp_path / "board")
    assert_scalars_match(board, read_metrics(tmp_path / "run"), keys={"test_elbo", "lr"})
    assert [e.step for e in board.Scalars("elbo/test")] == [1, 2]
    assert not board.Tags()["images"] and "hparams/test_elbo" not in board.Tags()["scalars"]


def test_nothing_is_logged_without_the_flag(tmp_path):
    train_run(DATA, VAE, TrainConfig(epochs=1), tmp_path / "run", "cpu", quiet=True, pictures=False)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@needs_tensorboard
@pytest.mark.parametrize("inside", [".", "tb", "tb/deeper"])
def test_a_folder_inside_the_run_is_refused_before_anything_is_written(tmp_path, inside):
    with pytest.raises(InputError, match="inside the run folder"):
        train_run(DATA, VAE, TRAIN, tmp_path / "run", "cpu", tensorboard=tmp_path / "run" / inside)
    assert not list(tmp_path.iterdir())


@needs_tensorboard
def test_a_folder_holding_another_run_is_refused(logged, tmp_path):
    with pytest.raises(InputError, match="holds a ppl_vae run"):
        train_run(DATA, VAE, TRAIN, tmp_path / "run", "cpu", tensorboard=logged / "run")
    assert not (tmp_path / "run").exists()


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # the import fails as if not installed
    out, board = tmp_path / "run", tmp_path / "board"
    args = ["train", "--dataset", "pinwheel", "--epochs", "1", "--quiet"]
    code, _, err = run_cli(*args, "--out", out, "--tensorboard", board, capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and "pip install 'ppl_vae[tensorboard]'" in err
    assert not out.exists() and not board.exists()  # refused before any training
