"""Fault injection: kill -9 inside the checkpoint write, SIGTERM, two writers, conflicting resumes,
divergence, a full disk. Each case is bounded in time."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import ROOT, run_cli

from ppl_vae.runs import RunDir

ARGS = ["--dataset", "pinwheel", "--num-train", "3000", "--num-test", "300", "--latent-dim", "2",
        "--hidden", "16", "--batch-size", "50", "--device", "cpu", "--no-capture"]  # fmt: skip

# the command line, with os.replace slowed down and announced, so that a test can kill the
# process while a checkpoint is written (the temporary file complete, the rename not yet done)
SLOW_REPLACE = textwrap.dedent("""
    import os, sys, time
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            print("REPLACING", flush=True)
            time.sleep(float(os.environ.get("SLOW_REPLACE", "0")))
        real(src, dst)
    os.replace = replace
    from ppl_vae.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def cli(*args, env=None, **kwargs):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_REPLACE, *map(str, args)], cwd=ROOT, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def numbers(path):
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in lines]


def wait_for(proc, text, timeout=120):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"the process ended before {text!r}: {proc.stderr.read()}")
    raise AssertionError(f"no {text!r} within {timeout} s")


def test_kill_9_inside_the_checkpoint_write_then_resume_equals_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert run_cli("train", *ARGS, "--epochs", "4", "--out", straight, "--quiet",
                   capsys=_Capture())[0] == 0  # fmt: skip
    run = tmp_path / "killed"
    kills = 0
    for _ in range(6):  # each round: killed while writing the checkpoint of its second epoch
        resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
        proc = cli("train", *ARGS, "--epochs", "4", "--out", run, "--quiet", *resume,
                   env={"SLOW_REPLACE": "2"})  # fmt: skip
        try:
            wait_for(proc, "REPLACING")  # the first checkpoint of this round: let it finish
            wait_for(proc, "REPLACING")  # the second: kill it half-written
            proc.kill()
            kills += 1
        except AssertionError:
            pass  # the round finished the run before a second checkpoint
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
    assert kills >= 1
    proc = cli("train", *ARGS, "--epochs", "4", "--out", run, "--quiet", "--resume")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 2), err  # 2: the killed rounds had finished every epoch
    assert numbers(run) == numbers(straight)
    assert not list(run.glob(".*.tmp"))


class _Capture:
    """A stand-in for pytest's capsys, for run_cli outside a test's fixtures."""

    def readouterr(self):
        return "", ""


def test_sigterm_is_ctrl_c_one_line_and_the_checkpoint_intact(tmp_path):
    run = tmp_path / "run"
    proc = cli("train", *ARGS, "--epochs", "50", "--out", run, "--quiet", env={"SLOW_REPLACE": "0"})
    wait_for(proc, "REPLACING")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().count("\n") == 0 and "interrupted; the checkpoint of epoch" in err, err
    assert "is intact" in err and not list(run.glob(".*.tmp"))
    # the kill may land between the checkpoint and metrics.jsonl (or best.pt): the checkpoint
    # says how far the run got, and metrics.jsonl is at most one line short of it
    epochs = RunDir(run).state().epoch
    assert epochs >= 1 and len(numbers(run)) in (epochs - 1, epochs)
    code, _, err = run_cli("train", "--resume", "--epochs", epochs + 1, "--out", run, "--quiet",
                           capsys=_Capture())  # fmt: skip
    assert code == 0, err
    assert len(numbers(run)) == epochs + 1


def test_a_second_writer_is_kept_out_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    proc = cli("train", *ARGS, "--epochs", "50", "--out", run, "--quiet", env={"SLOW_REPLACE": "0"})
    try:
        wait_for(proc, "REPLACING")
        code, _, err = run_cli("train", *ARGS, "--epochs", "2", "--out", run, "--overwrite",
                               capsys=capsys)  # fmt: skip
        assert code == 2 and f"another ppl-vae process (pid {proc.pid}) is writing to" in err
    finally:
        proc.kill()
        proc.wait(timeout=60)
    # the holder died: its lock went with it
    code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--overwrite",
                           "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    code, _, err = run_cli("train", *ARGS, "--epochs", "1", "--out", run, "--quiet",
                           capsys=_Capture())  # fmt: skip
    assert code == 0, err
    return run


@pytest.mark.parametrize(
    "flag, value, recorded",
    [
        ("--latent-dim", "3", "latent_dim=2"),
        ("--hidden", "8", "network.hidden=(16,)"),
        ("--dataset", "moons", "dataset=pinwheel"),
        ("--guide", "planar", "guide=gaussian"),
        ("--likelihood", "gaussian-fixed", "likelihood=gaussian-hetero"),  # the 2-D default
        ("--lr", "0.01", "lr=0.001"),
        ("--batch-size", "100", "batch_size=50"),
        ("--loss", "elbo", "loss=meanfield"),
        ("--beta", "0.5", "beta=1.0"),
        ("--kl-warmup", "3", "kl_warmup=10"),  # the 2-D default, recorded
        ("--seed", "1", "seed=0"),
        ("--num-particles", "2", "num_particles=1"),
    ],
)
def test_resume_refuses_a_setting_that_contradicts_the_run(flag, value, recorded, finished_run,
                                                           capsys):  # fmt: skip
    before = (finished_run / "checkpoint.pt").read_bytes()
    code, _, err = run_cli("train", "--resume", "--epochs", "3", flag, value, "--out",
                           finished_run, capsys=capsys)  # fmt: skip
    assert code == 2 and f"{flag} {value} contradicts the run's recorded {recorded}" in err, err
    assert err.count("\n") == 1
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_a_run_is_not_replaced_without_overwrite(finished_run, capsys):
    before = numbers(finished_run)
    code, _, err = run_cli("train", *ARGS, "--epochs", "2", "--out", finished_run, capsys=capsys)
    assert code == 2 and "holds a run already; pass --resume" in err
    assert numbers(finished_run) == before


def test_divergence_is_exit_1_with_the_epoch_and_what_is_kept(tmp_path, capsys):
    code, _, err = run_cli("train", *ARGS, "--epochs", "3", "--lr", "1000", "--out",
                           tmp_path / "r", "--quiet", capsys=capsys)  # fmt: skip
    assert code == 1 and "training diverged in epoch 1" in err and "lower --lr" in err
    assert "no checkpoint was written" in err and err.count("\n") == 1


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(tmp_path, capsys):
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        args = [*ARGS, "--hidden", "64", "--epochs", "2", "--out", disk / "run", "--quiet"]
        code, _, err = run_cli("train", *args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
        assert "cannot write" in err and ("is intact" in err or "nothing was written" in err)
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_test_elbo_below_the_untrained_one_during_the_kl_warm_up_is_not_a_divergence():
    """Trained on a down-weighted KL, q(z|x) first leaves the prior (moons fell from -6.51 to
    -9.07 in epoch 1 of a warm-up): the margin is then half the untrained ELBO plus one nat.
    At full weight the same fall is a divergence, and a non-finite ELBO is one at any weight."""
    from ppl_vae.svi import _check_divergence

    _check_divergence(-9.07, 1, history=[], untrained=-6.51, warming=True)
    with pytest.raises(FloatingPointError, match="diverged in epoch 1: the test ELBO fell to"):
        _check_divergence(-9.07, 1, history=[], untrained=-6.51)
    with pytest.raises(FloatingPointError, match="diverged in epoch 1"):  # beyond half and 1
        _check_divergence(-10.8, 1, history=[], untrained=-6.51, warming=True)
    with pytest.raises(FloatingPointError, match="fell to nan"):
        _check_divergence(float("nan"), 1, history=[], untrained=-6.51, warming=True)


def test_at_kl_weight_zero_only_a_non_finite_test_elbo_is_a_divergence():
    """During --kl-delay the KL term is not trained and may grow by orders of magnitude (the
    VampPrior on MNIST: -857,000 nats after 1,500 steps); NaN still stops the run."""
    from ppl_vae.svi import _check_divergence

    history = [{"test_elbo": -206.0}]
    _check_divergence(-8.6e5, 2, history=history, untrained=-545.0, warming=True, unweighted=True)
    with pytest.raises(FloatingPointError, match="diverged in epoch 2"):
        _check_divergence(-8.6e5, 2, history=history, untrained=-545.0, warming=True)
    with pytest.raises(FloatingPointError, match="the test ELBO is nan"):
        _check_divergence(float("nan"), 2, history=history, untrained=-545.0, unweighted=True)
