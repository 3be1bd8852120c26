"""Fault injection, second round: the run layer owns only what it wrote, results are never
lost, interruptions say the truth, damaged files are one line. Each case is small and bounded
in time (a pinwheel run of a few seconds, shared by the module)."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from helpers import run_cli

from ppl_vae.runs.files import folder_lock

# a constant rate: the 2-D default, a cosine, would run the last of a few epochs at rate 0
ARGS = ["--dataset", "pinwheel", "--num-train", "600", "--num-test", "200", "--latent-dim", "2",
        "--hidden", "8", "--batch-size", "100", "--device", "cpu", "--quiet",
        "--lr-schedule", "constant"]  # fmt: skip
EVALUATE = ["evaluate", "--num-samples", "20", "--limit", "30", "--device", "cpu", "--quiet"]


def _files(folder):
    """Every file below ``folder`` with its content's hash (what a command must leave alone)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run with its pictures, made once; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    from ppl_vae.cli import main

    assert main(["train", *ARGS, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -- 1. the run layer owns only what it wrote ------------------------------------------------------


def test_train_refuses_a_folder_of_the_users_own_files(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"my picture")
    (mine / "evaluate.json").write_text("{}")
    before = _files(mine)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(
            "train", *ARGS, "--epochs", "1", "--out", mine, *extra, capsys=capsys
        )
        assert code == 2 and err.count("\n") == 1
        assert "holds files that are not a ppl_vae run (evaluate.json, holiday.png)" in err
        assert _files(mine) == before
    monkeypatch.chdir(mine)  # --out '' is the current folder
    code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", "", capsys=capsys)
    assert code == 2 and "not a ppl_vae run" in err and _files(mine) == before


def test_overwrite_removes_only_what_the_old_run_wrote(run, capsys):
    (run / "notes.txt").write_text("my notes")
    code, _, err = run_cli(*EVALUATE, "--run", run, capsys=capsys)
    assert code == 0, err
    recorded = json.loads((run / "written.json").read_text())
    assert {"curves.png", "samples.png", "density.png", "latent.png", "evaluate.json"} <= set(
        recorded
    )
    code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--overwrite",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "my notes"  # the user's file stays
    assert not (run / "evaluate.json").exists()  # the old model's estimate is gone
    names = sorted(p.name for p in run.iterdir())
    assert "notes.txt" in names and "checkpoint.pt" in names


def test_em_plot_and_evaluate_refuse_another_commands_folder(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = _files(other)
    code, _, err = run_cli("em", "--dataset", "pinwheel", "--out", other, capsys=capsys)
    assert code == 2 and "holds a VAE run of ppl-vae train" in err
    code, _, err = run_cli("plot", "--run", run, "--out", other, capsys=capsys)
    assert code == 2 and "holds another ppl_vae run" in err
    code, _, err = run_cli(*EVALUATE, "--run", run, "--out", other, capsys=capsys)
    assert code == 2 and "holds another ppl_vae run" in err
    assert _files(other) == before
    em = tmp_path / "em"
    assert run_cli("em", "--dataset", "pinwheel", "--max-iter", "5", "--out", em,
                   capsys=capsys)[0] == 0  # fmt: skip
    code, _, err = run_cli("plot", "--run", run, "--out", em, capsys=capsys)
    assert code == 2 and "holds the results of ppl-vae em" in err


def test_a_file_of_the_same_name_that_ppl_vae_did_not_write_is_never_replaced(
    run, tmp_path, capsys
):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "curves.png").write_bytes(b"the user's own curves")
    code, _, err = run_cli("plot", "--run", run, "--out", pictures, capsys=capsys)
    assert code == 2 and "curves.png was not written by ppl_vae" in err
    assert [p.name for p in pictures.iterdir()] == ["curves.png"]
    (tmp_path / "em").mkdir()
    (tmp_path / "em" / "mixture.png").write_bytes(b"mine")
    code, _, err = run_cli("em", "--dataset", "pinwheel", "--out", tmp_path / "em", capsys=capsys)
    assert code == 2 and "mixture.png was not written by ppl_vae" in err


def test_readers_and_writers_of_a_run_keep_out_of_each_others_way(run, tmp_path, capsys):
    with folder_lock(run, shared=True):  # an evaluate or plot reading the run
        code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--overwrite",
                               capsys=capsys)  # fmt: skip
        assert code == 2 and "(evaluate or plot) is reading" in err
    with folder_lock(run):  # a train writing the run
        code, _, err = run_cli(*EVALUATE, "--run", run, capsys=capsys)
        assert code == 2 and f"(pid {os.getpid()}) is writing to" in err
        assert "--out DIR to write elsewhere" in err
        assert not (run / "evaluate.json").exists()
        code, out, err = run_cli(*EVALUATE, "--run", run, "--no-write", capsys=capsys)
        assert code == 0 and "NLL" in out
        code, _, err = run_cli("plot", "--run", run, "--out", tmp_path / "p", capsys=capsys)
        assert code == 0, err


def test_the_estimate_and_pictures_record_the_checkpoint_and_say_when_stale(run, capsys):
    code, _, err = run_cli(*EVALUATE, "--run", run, capsys=capsys)
    assert code == 0, err
    digest = hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    record = json.loads((run / "evaluate.json").read_text())
    assert record["checkpoint"] == {"epoch": 2, "sha256": digest}
    assert json.loads((run / "written.json").read_text())["evaluate.json"]["sha256"] == digest
    code, _, err = run_cli("train", *ARGS, "--epochs", "3", "--out", run, "--resume",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("plot", "--run", run, "--pictures", "curves", capsys=capsys)
    assert code == 0
    (line,) = [s for s in err.splitlines() if "warning" in s]
    assert line.startswith("ppl-vae: warning: evaluate.json in ") and "(epoch 3)" in line


# -- 2. results are never lost -------------------------------------------------------------------


def test_a_read_only_run_is_evaluated_elsewhere_and_refused_before_the_work(
    run, tmp_path, capsys, monkeypatch
):
    real = os.access  # root may write anywhere: the folder is read-only as the OS reports it

    def access(path, mode, **kwargs):
        return False if os.fspath(path) == os.fspath(run) and mode & os.W_OK else real(path, mode)

    monkeypatch.setattr(os, "access", access)
    os.chmod(run, 0o555)
    try:
        code, out, err = run_cli(*EVALUATE, "--run", run, capsys=capsys)
        assert code == 2 and "is not writable" in err and "NLL" not in out
        code, out, err = run_cli(*EVALUATE, "--run", run, "--out", tmp_path / "e.json",
                                 capsys=capsys)  # fmt: skip
        assert code == 0 and json.loads((tmp_path / "e.json").read_text())["num_points"] == 30
    finally:
        os.chmod(run, 0o755)


def test_a_failed_write_prints_the_result_and_leaves_the_previous_files(run, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    import ppl_vae.runs.files as files

    assert run_cli(*EVALUATE, "--run", run, capsys=capsys)[0] == 0
    em = tmp_path / "em"
    assert run_cli("em", "--dataset", "pinwheel", "--max-iter", "5", "--out", em,
                   capsys=capsys)[0] == 0  # fmt: skip
    before_run, before_em = _files(run), _files(em)
    real = files._write_temporary

    def full_disk(path, write, mode):
        if path.name in ("evaluate.json", "results.json"):
            raise files._write_error(path, OSError(28, "No space left on device"))
        return real(path, write, mode)

    monkeypatch.setattr(files, "_write_temporary", full_disk)
    code, out, err = run_cli(*EVALUATE, "--run", run, "--seed", "5", capsys=capsys)
    assert code == 2 and "NLL" in out and "No space left on device" in err
    assert "the estimate is printed above" in err and err.count("\n") == 1
    code, out, err = run_cli("em", "--dataset", "pinwheel", "--max-iter", "6", "--out", em,
                             capsys=capsys)  # fmt: skip
    assert code == 2 and "test " in out and "the previous files in" in err
    assert _files(run) == before_run and _files(em) == before_em  # pictures included


# -- 3. every interruption says the truth ----------------------------------------------------------


def test_a_pictures_list_is_checked_whole_before_the_first_is_drawn(run, capsys):
    before = _files(run)
    code, _, err = run_cli("plot", "--run", run, "--pictures", "curves,manifold", capsys=capsys)
    assert code == 2 and "the manifold picture needs images" in err
    assert _files(run) == before


def test_an_interrupt_while_drawing_says_which_checkpoint_is_intact(tmp_path, capsys, monkeypatch):
    import dataclasses

    from ppl_vae.runs.pictures import PICTURES

    def interrupted(run):
        raise KeyboardInterrupt

    entry = dataclasses.replace(PICTURES["latent"], factory=interrupted)
    monkeypatch.setitem(PICTURES._entries, "latent", entry)
    out = tmp_path / "run"
    code, _, err = run_cli("train", *ARGS, "--epochs", "2", "--out", out, capsys=capsys)
    assert code == 130
    assert "the checkpoint of epoch 2 in" in err and "the pictures were not drawn" in err
    assert not list(out.glob("*.png"))  # all pictures or none
    code, _, err = run_cli("plot", "--run", out, capsys=capsys)
    assert code == 130 and "plot wrote nothing" in err and not list(out.glob("*.png"))


# -- 4. damaged files are one line ---------------------------------------------------------------


DAMAGE = {
    "no config": (lambda c: c.pop("config"), "holds the state of a model that no configuration"),
    "no rng": (lambda c: c.pop("rng"), "is damaged: it lacks rng"),
    "metrics None": (lambda c: c.update(metrics=None), "its metrics are a NoneType"),
    "params list": (lambda c: c.update(params=[1, 2]), "its parameters are a list"),
    "string epoch": (lambda c: c.update(epoch="2"), "its epoch is '2'"),
    "NaN parameters": (
        lambda c: next(iter(c["params"].values())).fill_(float("nan")),
        "holds non-finite values (NaN or infinity) in parameter",
    ),
    "rng garbage": (lambda c: c["rng"].update(python="garbage"), "Python random stream lacks"),
    "rng float": (lambda c: c["rng"].update(torch=torch.zeros(3)), "stream 'torch' is not a byte"),
    "optimizer": (lambda c: c["optimizer"].update(state=5), "is not an Adam state dict"),
    "infinite ELBO": (
        lambda c: c["metrics"][0].update(train_elbo=float("inf")),
        "metrics record 1 has train_elbo inf",
    ),
    "fingerprint": (lambda c: c.update(data_fingerprint=7), "its data_fingerprint is 7"),
    "wrong shape": (
        lambda c: c["params"].update({k: v[:1] for k, v in list(c["params"].items())[:1]}),
        "was it written for another architecture?",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(case, run, capsys):
    damage, message = DAMAGE[case]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    damage(ckpt)
    torch.save(ckpt, run / "checkpoint.pt")
    before = _files(run)
    for command in (["plot", "--run", run], [*EVALUATE, "--run", run],
                    ["train", *ARGS, "--epochs", "3", "--out", run, "--resume"]):  # fmt: skip
        code, _, err = run_cli(*command, capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (command, err)
        assert "Traceback" not in err and _files(run) == before


@pytest.mark.parametrize(
    "line, message",
    [('["epoch", 1]', "metrics record 1 is a list"),
     ('{"epoch": 1, "train_elbo": "high", "test_elbo": 1.0}', "has train_elbo 'high'"),
     ("{not json", "is not one JSON object per line")],
)  # fmt: skip
def test_metrics_lines_that_are_not_records_are_one_line(line, message, run, capsys):
    (run / "metrics.jsonl").write_text(line + "\n")
    code, _, err = run_cli("plot", "--run", run, "--pictures", "curves", capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1


# -- 7. no leftovers ------------------------------------------------------------------------------


def test_stale_temporaries_of_every_kind_are_removed_at_the_next_start(run, capsys):
    left = [".samples.png.x1y2z3ab.tmp", ".written.json.abcdefgh.tmp", ".evaluate.json.q.tmp",
            ".checkpoint.pt.zzzzzzzz.tmp"]  # fmt: skip
    for name in left:
        (run / name).write_bytes(b"half")
    (run / ".my-own.tmp").write_text("not ours")  # a user's file keeps its place
    code, _, err = run_cli("train", *ARGS, "--epochs", "3", "--out", run, "--resume",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert not any((run / name).exists() for name in left)
    assert (run / ".my-own.tmp").read_text() == "not ours"


# -- 4. the data a run was trained on ------------------------------------------------------------


def test_a_changed_data_file_is_refused_at_resume_and_flagged_at_evaluate(tmp_path, capsys):
    points = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    data = tmp_path / "points.pt"
    torch.save(points, data)
    out = tmp_path / "run"
    args = ["--dataset", data, "--latent-dim", "2", "--hidden", "8", "--quiet", "--out", out]
    assert run_cli("train", *args, "--epochs", "1", capsys=capsys)[0] == 0
    torch.save(points * 3, data)  # the file replaced after training
    code, _, err = run_cli("train", *args, "--epochs", "2", "--resume", capsys=capsys)
    assert code == 2 and "differ from those the run in" in err and "restore the data" in err
    code, out_text, err = run_cli(*EVALUATE, "--run", out, "--no-write", capsys=capsys)
    assert code == 0 and "NLL" in out_text
    (line,) = [s for s in err.splitlines() if "warning" in s]
    assert line.startswith("ppl-vae: warning: the data of ") and "describes other data" in line


def test_bad_input_found_after_the_data_load_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "never"
    code, _, err = run_cli("train", *ARGS, "--num-particles", "100000000", "--out", out,
                           capsys=capsys)  # fmt: skip
    assert code == 2 and "needs about" in err and not out.exists()


def test_an_em_or_picture_folder_loses_a_killed_writers_leftovers_too(run, tmp_path, capsys):
    em, pictures = tmp_path / "em", tmp_path / "pictures"
    for folder, name in (
        (em, ".results.json.k1ll3d00.tmp"),
        (pictures, ".curves.png.k1ll3d00.tmp"),
    ):
        folder.mkdir()
        (folder / name).write_bytes(b"half")
    assert run_cli("em", "--dataset", "pinwheel", "--max-iter", "5", "--out", em,
                   capsys=capsys)[0] == 0  # fmt: skip
    assert run_cli("plot", "--run", run, "--out", pictures, "--pictures", "curves",
                   capsys=capsys)[0] == 0  # fmt: skip
    assert not list(em.glob("*.tmp")) and not list(pictures.glob("*.tmp"))


# -- the reviewer's cases: other commands' records, reserved names, legacy pictures --------------


def test_train_refuses_a_folder_holding_another_commands_results(run, tmp_path, capsys):
    em, pictures = tmp_path / "em", tmp_path / "pictures"
    assert run_cli("em", "--dataset", "pinwheel", "--max-iter", "5", "--out", em,
                   capsys=capsys)[0] == 0  # fmt: skip
    assert run_cli("plot", "--run", run, "--out", pictures, capsys=capsys)[0] == 0
    for folder in (em, pictures):
        before = _files(folder)
        code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", folder, capsys=capsys)
        assert code == 2 and "holds files that are not a ppl_vae run" in err
        assert _files(folder) == before
    code, _, err = run_cli(*EVALUATE, "--run", run, "--out", em, capsys=capsys)
    assert code == 2 and "holds the results of ppl-vae em" in err
    code, _, err = run_cli("em", "--dataset", "pinwheel", "--out", pictures, capsys=capsys)
    assert code == 2 and "holds files of another ppl-vae command" in err


def test_a_record_never_lists_the_runs_own_files(run, tmp_path, capsys):
    for name in ("checkpoint.pt", "written.json", "curves.png"):
        code, _, err = run_cli(*EVALUATE, "--run", run, "--out", tmp_path / "c" / name,
                               capsys=capsys)  # fmt: skip
        assert code == 2 and "name a .json file other than" in err
    for bad in ({"checkpoint.pt": {}}, {"..": {}}, {"curves.png": {}, "x": [1]}):
        (run / "written.json").write_text(json.dumps(bad))
        before = _files(run)
        code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--overwrite",
                               capsys=capsys)  # fmt: skip
        assert (
            code == 2 and "written.json (the list of files ppl_vae wrote there) is damaged" in err
        )
        assert _files(run) == before  # refused before the run changed


def test_a_picture_in_the_way_is_refused_before_the_first_epoch(run, capsys):
    record = json.loads((run / "written.json").read_text())
    del record["samples.png"]  # as if the user had drawn samples.png there
    (run / "written.json").write_text(json.dumps(record))
    before = _files(run)
    code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--overwrite",
                           capsys=capsys)  # fmt: skip
    assert code == 2 and "samples.png was not written by ppl_vae" in err
    assert _files(run) == before


def test_a_run_of_0_1_with_its_pictures_is_plotted_evaluated_and_resumed(tmp_path, capsys):
    from pathlib import Path

    legacy = tmp_path / "v0"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-v0", legacy)
    for name in ("curves.png", "samples.png", "evaluate.json"):
        (legacy / name).write_bytes(b"drawn by 0.1")
    assert run_cli("plot", "--run", legacy, "--pictures", "curves", capsys=capsys)[0] == 0
    assert run_cli(*EVALUATE, "--run", legacy, capsys=capsys)[0] == 0
    code, _, err = run_cli("train", "--out", legacy, "--epochs", "3", "--resume", "--quiet",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert (legacy / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_out_creates_the_folder_it_names(run, tmp_path, capsys):
    code, _, err = run_cli(*EVALUATE, "--run", run, "--out", tmp_path / "new" / "sub" / "e.json",
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "sub" / "e.json").read_text())["num_points"] == 30
