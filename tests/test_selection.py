"""Choosing epochs: the validation split, early stopping on a scripted validation curve,
``best.pt`` holding the best epoch, ``--checkpoint best|last``, and gradient clipping against
PyTorch's own ``clip_grad_norm_``."""

import json

import pytest
import torch
from helpers import run_cli

import ppl_vae.svi
from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import RunDir, load_run, train_run
from ppl_vae.selection import best_epoch, epochs_since_best, stops, watched
from ppl_vae.svi import GradientClip, TrainConfig, train
from ppl_vae.vae import VAEConfig, build_vae

DATA = DataConfig("pinwheel", num_train=600, num_test=200)
VAE = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,)))
CURVE = [-5.0, -4.0, -4.5, -3.0, -3.5, -3.2, -3.1, -2.0, -1.0, -0.5]  # best at 4 until 8


def numbers(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


@pytest.fixture
def scripted(monkeypatch):
    """The validation ELBO of epoch e is CURVE[e - 1]; everything else is computed."""
    real, calls = ppl_vae.svi.mean_elbo, []

    def mean_elbo(model, guide, data, split="test", *args, **kwargs):
        if split != "validation":
            return real(model, guide, data, split, *args, **kwargs)
        calls.append(1)
        return CURVE[len(calls) - 1]

    monkeypatch.setattr(ppl_vae.svi, "mean_elbo", mean_elbo)
    return calls


def test_the_selection_rules_on_a_written_out_curve():
    metrics = [{"epoch": e, "test_elbo": 0.0, "validation_elbo": v} for e, v in enumerate(CURVE, 1)]
    assert watched(metrics) == "validation_elbo" and watched([{"test_elbo": 1}]) == "test_elbo"
    assert [best_epoch(metrics[:n]) for n in range(1, 11)] == [1, 2, 2, 4, 4, 4, 4, 8, 9, 10]
    assert [epochs_since_best(metrics[:n]) for n in range(1, 11)] == [0, 0, 1, 0, 1, 2, 3, 0, 0, 0]
    assert [n for n in range(1, 11) if stops(metrics[:n], 3)] == [7]
    assert not any(stops(metrics[:n], None) for n in range(1, 11))
    ties = [{"epoch": e, "test_elbo": -1.0} for e in (1, 2, 3)]
    assert best_epoch(ties) == 1 and best_epoch([]) is None


def test_the_validation_split_holds_out_n_training_points_seeded_and_disjoint():
    data = load_data(DATA)
    a, b = data.hold_out(150, seed=3), data.hold_out(150, seed=3)
    assert a.train.shape[0] == 450 and a.validation.shape[0] == 150
    assert torch.equal(a.validation, b.validation) and torch.equal(a.train, b.train)
    together = torch.cat([a.train, a.validation])
    rows = {tuple(r.tolist()) for r in together}
    assert rows == {tuple(r.tolist()) for r in data.train} and len(rows) == 600
    assert not torch.equal(data.hold_out(150, seed=4).validation, a.validation)
    for bad in (0, 600, 601):
        with pytest.raises(InputError, match=f"--validation {bad} must leave training points"):
            data.hold_out(bad, seed=0)


def test_training_records_the_validation_elbo_and_trains_on_the_rest(monkeypatch):
    torch.manual_seed(0)
    data = load_data(DATA)
    model, guide = build_vae(VAE, data)
    sizes = []
    real = ppl_vae.svi._train_pass

    def counted(state, data, *args, **kwargs):
        sizes.append(data.train.shape[0])
        return real(state, data, *args, **kwargs)

    monkeypatch.setattr(ppl_vae.svi, "_train_pass", counted)
    metrics = train(model, guide, data, TrainConfig(epochs=2, validation=100), quiet=True)
    assert sizes == [500, 500]
    split = data.hold_out(100, ppl_vae.svi.derived_seed(0, "validation"))
    again = ppl_vae.svi.mean_elbo(model, guide, split, "validation", 1000, seed=0)
    assert metrics[-1]["validation_elbo"] == again  # the held-out points, at the last epoch


def test_early_stopping_stops_where_the_scripted_curve_says(scripted, capsys):
    torch.manual_seed(0)
    data = load_data(DATA)
    model, guide = build_vae(VAE, data)
    config = TrainConfig(epochs=10, validation=100, patience=3)
    metrics = train(model, guide, data, config)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6, 7]  # 5, 6, 7 below epoch 4
    assert [m["validation_elbo"] for m in metrics] == CURVE[:7]
    assert (
        "stopped early: by epoch 7 the validation ELBO had not improved for 3 epochs "
        "(--patience) since epoch 4" in capsys.readouterr().err
    )


def test_best_pt_holds_the_best_epoch_and_evaluate_and_plot_default_to_it(
    scripted, tmp_path, capsys
):
    config = TrainConfig(epochs=6, validation=100)
    run = train_run(DATA, VAE, config, tmp_path / "run", "cpu", pictures=False)
    best, _ = RunDir(tmp_path / "run").load("best")
    last, _ = RunDir(tmp_path / "run").load("last")
    assert best.epoch == 4 and last.epoch == 6 and best.metrics == last.metrics[:4]
    scripted.clear()  # the same run stopped at epoch 4 has best.pt's parameters
    train_run(DATA, VAE, TrainConfig(epochs=4, validation=100), tmp_path / "four", "cpu",
              pictures=False)  # fmt: skip
    four, _ = RunDir(tmp_path / "four").load()
    for name, value in four.params.items():
        assert torch.equal(best.params[name], value), name
    assert any(not torch.equal(last.params[k], v) for k, v in best.params.items())
    assert run.checkpoint["epoch"] == 4  # the run returned is the best epoch's
    assert load_run(tmp_path / "run", "cpu").checkpoint["epoch"] == 4
    assert load_run(tmp_path / "run", "cpu", checkpoint="last").checkpoint["epoch"] == 6
    assert len(load_run(tmp_path / "run", "cpu").metrics) == 6  # the curves show every epoch
    for which, epoch in ((None, 4), ("best", 4), ("last", 6)):
        flag = ["--checkpoint", which] if which else []
        code, out, err = run_cli("evaluate", "--run", str(tmp_path / "run"), "--num-samples",
                                 "4", "--limit", "10", "--quiet", "--device", "cpu", *flag,
                                 capsys=capsys)  # fmt: skip
        assert code == 0, err
        record = json.loads((tmp_path / "run" / "evaluate.json").read_text())
        assert record["epoch"] == record["checkpoint"]["epoch"] == epoch


def test_a_run_without_best_pt_loads_its_last_checkpoint_and_refuses_best(tmp_path, capsys):
    train_run(DATA, VAE, TrainConfig(epochs=1), tmp_path, "cpu", pictures=False)
    (tmp_path / "best.pt").unlink()  # as runs trained before best.pt existed
    capsys.readouterr()
    assert load_run(tmp_path, "cpu").checkpoint["epoch"] == 1
    code, _, err = run_cli("plot", "--run", str(tmp_path), "--checkpoint", "best", capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert "has no best.pt" in err and "pass --checkpoint last" in err


def test_a_best_pt_of_another_run_is_not_used(tmp_path):
    train_run(DATA, VAE, TrainConfig(epochs=1), tmp_path / "a", "cpu", pictures=False)
    train_run(DATA, VAE, TrainConfig(epochs=2, seed=1), tmp_path / "b", "cpu", pictures=False)
    (tmp_path / "a" / "best.pt").replace(tmp_path / "b" / "best.pt")  # a kill mid-replacement
    assert not RunDir(tmp_path / "b").best_usable()
    assert load_run(tmp_path / "b", "cpu").checkpoint["epoch"] == 2
    with pytest.raises(InputError, match="has a best.pt of another run"):
        RunDir(tmp_path / "b").load("best")


def test_resuming_a_run_that_stopped_early_needs_a_larger_patience(scripted, tmp_path, capsys):
    config = TrainConfig(epochs=10, validation=100, patience=2)
    run = train_run(DATA, VAE, config, tmp_path, "cpu", pictures=False)
    assert len(run.metrics) == 6  # epochs 5 and 6 below epoch 4
    capsys.readouterr()
    code, _, err = run_cli("train", "--resume", "--out", str(tmp_path), capsys=capsys)
    assert code == 2 and "stopped early: by epoch 6" in err and "a larger --patience" in err
    scripted[:] = [1] * 6  # the curve goes on from epoch 7
    code, _, err = run_cli("train", "--resume", "--out", str(tmp_path), "--patience", "3",
                           "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert len(RunDir(tmp_path).read_metrics()) == 7  # epoch 7 is the third without a gain


@pytest.mark.parametrize(
    "flags, message",
    [(["--patience", "0"], "patience must be a whole number of epochs >= 1"),
     (["--validation", "1000"], "--validation 1000 must leave training points"),
     (["--validation", "-1"], "validation must be >= 0 points"),
     (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
     (["--clip-grad", "0"], "clip_grad must be a finite number > 0"),
     (["--lr-schedule", "plateau"], "the plateau schedule watches the validation ELBO")],
)  # fmt: skip
def test_bad_values_get_one_line_and_status_2(flags, message, tmp_path, capsys):
    code, _, err = run_cli("train", "--dataset", "pinwheel", "--num-train", "1000", "--epochs",
                           "1", "--out", str(tmp_path / "r"), *flags, capsys=capsys)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_clipping_matches_torchs_clip_grad_norm_and_is_recorded():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * 40, torch.randn(7) * 40]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    mine = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, q, g in zip(params, mine, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm=2.0 * 10)  # per point: 10 points
    clip = GradientClip(mine, 2.0, num_data=10, device=torch.device("cpu"))
    clip()
    for p, q in zip(params, mine, strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
    assert clip.record(1) == pytest.approx({"grad_norm": float(total) / 10, "clipped": 1.0})
    clip()  # now within the bound: unchanged, not counted as clipped
    assert clip.record(2)["clipped"] == 0.5


def test_a_large_clip_changes_nothing_and_a_small_one_changes_the_run():
    def run(clip):
        torch.manual_seed(0)
        data = load_data(DATA)
        model, guide = build_vae(VAE, data)
        return train(model, guide, data, TrainConfig(epochs=2, clip_grad=clip), quiet=True)

    free, loose, tight = run(None), run(1e9), run(0.01)
    drop = ("seconds", "clipped")
    assert [{k: v for k, v in m.items() if k not in drop} for m in loose] == numbers(free)
    assert [m["clipped"] for m in loose] == [0.0, 0.0]
    assert [m["clipped"] for m in tight] == [1.0, 1.0]
    assert tight[-1]["train_elbo"] != free[-1]["train_elbo"]
    assert all(m["grad_norm"] > 0.01 for m in tight)


def test_a_run_from_before_best_pt_resumes_to_the_end_without_one(scripted, tmp_path, capsys):
    config = TrainConfig(epochs=4, validation=100)
    train_run(DATA, VAE, config, tmp_path, "cpu", pictures=False)  # best: epoch 4 of CURVE
    (tmp_path / "best.pt").unlink()  # as a run trained before best.pt existed
    capsys.readouterr()  # epochs 5 and 6 of CURVE fall below epoch 4's: no new best.pt
    code, _, err = run_cli("train", "--resume", "--out", str(tmp_path), "--epochs", "6",
                           "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "best.pt").exists()
    assert load_run(tmp_path, "cpu").checkpoint["epoch"] == 6  # the last, as before
