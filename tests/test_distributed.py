"""Two processes under torchrun (gloo, CPU): the same numbers as one process, rank 0 writes.

Each case starts real ``torchrun`` jobs (``python -m torch.distributed.run --standalone``), one
thread per process, and compares with one process: the step on a global batch split across the
ranks is the one-process step on the whole batch (a deterministic program, so to float32
rounding), evaluation (importance sampling, AIS) and the gaps share batches out without
changing a figure, a 2-rank run killed with SIGKILL resumes to the uninterrupted run's
parameters exactly, and a rank killed alone is one line on rank 0 naming it.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, run_cli

from ppl_vae.distributed import RankStopped, World, _running, batch_shard
from ppl_vae.rng import derived_seed
from ppl_vae.runs import RunDir

WORKER = ROOT / "tests" / "ddp_worker.py"
RUN = ["--dataset", "pinwheel", "--latent-dim", "2", "--hidden", "16", "--quiet"]


def torchrun(*args, nproc=2, timeout=300, **kwargs):
    """``torchrun --standalone --nproc_per_node nproc ARGS``, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)  # fmt: skip


def ppl_vae(*args, **kwargs):
    return torchrun("-m", "ppl_vae", *args, **kwargs)


def descendants(pid):
    """The processes started by ``pid``, and theirs (torchrun puts its workers in sessions of
    their own, so a process group kill does not reach them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_of(pid):
    """The RANK torchrun gave process ``pid`` (None for a process that is not a rank)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def numbers(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in lines]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_batch_shards_are_contiguous_and_cover_the_batch(size):
    for n in (0, 1, 4, 16, 17):
        parts = [batch_shard(n, World(r, size)) for r in range(size)]
        assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_a_stopped_rank_is_named_and_told_by_the_first_rank_still_running():
    one, two, unknown = RankStopped([1], "x"), RankStopped([0, 2], "x"), RankStopped([], "why")
    assert str(one) == "rank 1 stopped (its process ended)"
    assert str(two) == "ranks 0, 2 stopped (their processes ended)"
    assert str(unknown) == "another rank stopped or lost its connection (why)"
    assert [r for r in range(3) if one.told_by(World(r, 3))] == [0]
    assert [r for r in range(4) if two.told_by(World(r, 4))] == [1]  # rank 0 is gone
    assert isinstance(one, RuntimeError)


def test_a_dead_process_is_not_running_before_its_parent_reaps_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _running(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _running(child.pid):  # a zombie until wait() below
            assert time.monotonic() < deadline, "a killed child still runs"
            time.sleep(0.01)
        assert Path(f"/proc/{child.pid}").exists()  # a zombie: dead, not reaped
        assert child.poll() is not None  # reaped only now
        assert not _running(child.pid)
    finally:
        child.kill()
        child.wait()


def test_derived_seeds_are_fixed_and_distinct():
    assert derived_seed(0, 1) == derived_seed(0, 1)  # in this process; sha256, so in any
    seeds = {derived_seed(s, b) for s in range(4) for b in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize(
    "flags",
    [["--capture"], ["--no-capture"], ["--m2", "--capture"], ["--m2", "--no-capture"]],
    ids=" ".join,
)
def test_two_ranks_take_the_one_process_step_on_the_combined_batch(tmp_path, flags):
    """65 points in batches of 16: four split 8/8 and a last of one row, which leaves rank 1
    an empty shard; the gradients are weighted by each rank's share of the batch. M2 (--m2)
    adds a labelled batch to each step (of 5 rows, split 3/2, or 2, split 1/1), so the two
    batches' shares differ, and the last step gives rank 1 a labelled part alone."""
    one = subprocess.run([sys.executable, WORKER, tmp_path / "one.pt", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = torchrun(WORKER, tmp_path / "two.pt", *flags)
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:  # float32 sums in another order: rounding only
        torch.testing.assert_close(b["params"][name], a["params"][name], rtol=0, atol=1e-6)
    for m1, m2 in zip(a["metrics"], b["metrics"], strict=True):
        assert m2["train_elbo"] == pytest.approx(m1["train_elbo"], abs=1e-5)
        assert m2["test_elbo"] == pytest.approx(m1["test_elbo"], abs=1e-5)  # sharded, reduced
        assert m2.get("test_accuracy") == m1.get("test_accuracy")  # M2's, on every rank


def test_shared_memory_sums_equal_gloos_to_the_bit_and_leave_no_file(tmp_path):
    """Two ranks sum weighted gradients five times (the two sets of slots alternate) through
    /dev/shm and through gloo's all-reduce: the same tensors to the bit, and the sum of every
    rank's values made in one process (rank 0 draws rank 1's from its seed) within rounding."""
    before = set(glob.glob("/dev/shm/ppl_vae-sum-*"))
    proc = torchrun(WORKER, tmp_path / "sums.pt", "--sums")
    assert proc.returncode == 0, proc.stderr
    record = torch.load(tmp_path / "sums.pt")
    assert record["summer"] == ["SharedSum"]  # shared memory was used, once made
    for shared, gloo, expected in zip(record["shared"], record["gloo"], record["expected"],
                                      strict=True):  # fmt: skip
        for a, b, c in zip(shared, gloo, expected, strict=True):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    assert len({float(s[2][0]) for s in record["shared"]}) == 5  # five different sums
    assert set(glob.glob("/dev/shm/ppl_vae-sum-*")) == before


def test_a_rank_waiting_in_the_shared_sum_names_rank_0_when_it_dies(tmp_path):
    """Rank 0 holds the group's store, so its death cannot be looked up there: the ranks
    exchanged their process ids when the shared memory was made, and rank 1 names rank 0
    within a second or two instead of waiting out the 30-minute timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, WORKER, tmp_path / "x", "--orphan"],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    try:
        assert ranks[0].stdout.readline().strip() == "ready", ranks[0].stderr.read()
        time.sleep(0.5)  # rank 1 is waiting in the second sum
        t0 = time.monotonic()
        os.kill(ranks[0].pid, signal.SIGKILL)
        out, err = ranks[1].communicate(timeout=60)
        assert (ranks[1].returncode, out) == (3, "rank 0 stopped (its process ended)\n"), err
        assert time.monotonic() - t0 < 20
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "straight"
    board = run.parent / "tb"  # TensorBoard, where only rank 0 may write
    proc = ppl_vae("train", *RUN, "--epochs", "6", "--out", run, "--tensorboard", board)
    assert proc.returncode == 0, proc.stderr
    return run


def test_only_rank_0_writes_and_the_metrics_are_one_runs(two_rank_run):
    names = sorted(p.name for p in two_rank_run.iterdir())
    assert names == [".lock", "best.pt", "checkpoint.pt", "config.json", "curves.png",
                     "density.png", "latent.png", "metrics.jsonl", "samples.png",
                     "written.json"]  # fmt: skip
    events = list((two_rank_run.parent / "tb").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")  # rank 0's
    assert [m["epoch"] for m in numbers(two_rank_run)] == [1, 2, 3, 4, 5, 6]
    state, _ = RunDir(two_rank_run).load()
    assert len(state.rng["ranks"]) == 2  # both ranks' streams, saved by rank 0
    assert not torch.equal(state.rng["ranks"][0]["torch"], state.rng["ranks"][1]["torch"])


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_one(two_rank_run, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ppl_vae", "train", *RUN, "--epochs", "6",
               "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not numbers(run):
        assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both ranks, without warning
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    finished = len(numbers(run))
    time.sleep(1.0)
    assert 1 <= finished < 6 and len(numbers(run)) == finished  # no rank left writing
    again = ppl_vae("train", "--out", run, "--epochs", "6", "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    assert numbers(run) == numbers(two_rank_run)
    (a, _), (b, _) = RunDir(run).load(), RunDir(two_rank_run).load()
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


def test_a_rank_killed_mid_training_is_one_line_on_rank_0_naming_it(tmp_path):
    """Rank 0's collective fails (gloo: connection reset by peer); it finds which rank's
    process is gone and says so in one line, and torchrun's SIGTERM does not cut that short."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--redirects=3", f"--log-dir={logs}", "-m", "ppl_vae",
               "train", *RUN, "--epochs", "1000", "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not numbers(run):
        assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    (rank1,) = [pid for pid in descendants(proc.pid) if rank_of(pid) == 1]
    os.kill(rank1, signal.SIGKILL)
    _, launcher = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (err,) = [p.read_text() for p in logs.glob("*/attempt_0/0/stderr.log")]  # rank 0's
    pattern = (
        r"ppl-vae: error: rank 1 stopped \(its process ended\); the checkpoint of epoch \d+ in "
    )
    assert re.fullmatch(pattern + r"\S+ is intact\n", err), err
    # torchrun's summary: rank 0 left with status 1 (not -9: killed after hanging 30 s)
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ", launcher), launcher


def test_resume_with_another_number_of_processes_says_how_many(two_rank_run, capsys):
    code, _, err = run_cli("train", "--out", two_rank_run, "--epochs", "7", "--resume",
                           capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "trained by 2 processes, this is 1; resume it with torchrun --nproc_per_node 2" in err


def test_two_rank_evaluation_equals_one_process(two_rank_run, capsys):
    flags = ["--num-samples", "40", "--batch-size", "300", "--seed", "3"]  # 7 batches: 4 and 3
    code, _, err = run_cli("evaluate", "--run", two_rank_run, *flags, "--quiet", capsys=capsys)
    assert code == 0, err
    one = json.loads((two_rank_run / "evaluate.json").read_text())
    proc = ppl_vae("evaluate", "--run-dir", two_rank_run, *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("NLL") == 1  # printed by rank 0 only
    two = json.loads((two_rank_run / "evaluate.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    assert len(two["log_px"]) == one["num_points"] == 2000
    torch.testing.assert_close(torch.tensor(two["log_px"]), torch.tensor(one["log_px"]),
                               rtol=0, atol=1e-9)  # fmt: skip
    for key in ("nll", "elbo", "ess"):
        assert two[key] == pytest.approx(one[key], abs=1e-9)
    for key in ("active_units", "latent_activity", "kl_per_dim", "mutual_information"):
        assert two[key] == pytest.approx(one[key], abs=1e-9)  # rank 0's, on the same points


SMALL = ["--dataset", "digits", "--hidden", "16", "--latent-dim", "4", "--quiet"]


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--model", "m2", "--labeled", "50"], "label_summed_out"),
        (["--model", "cvae", "--baseline-epochs", "1"], "conditional"),
    ],
    ids=["m2", "cvae"],
)
def test_m2_and_cvae_train_under_two_ranks_and_evaluate_as_one_process(
    flags, key, tmp_path, capsys
):
    """M2 and the CVAE (issue 24) through the command line: two ranks train them (M2: each
    step's unlabelled and labelled batches split, test_accuracy recorded once; the CVAE: the
    baseline fitted alike on every rank first) and their estimates (log p(x) with the label
    summed out; log p(y|x)) share batches out without changing a figure: 360 test digits, 4
    batches, 2 each."""
    run = tmp_path / "run"
    proc = ppl_vae("train", *SMALL, *flags, "--epochs", "2", "--out", run)
    assert proc.returncode == 0, proc.stderr
    metrics = numbers(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    if "m2" in flags:
        assert all(0.1 < m["test_accuracy"] <= 1 for m in metrics)  # above chance: 10 classes
    options = ["--num-samples", "20", "--batch-size", "100", "--seed", "3"]
    code, out, err = run_cli("evaluate", "--run", run, *options, "--quiet", capsys=capsys)
    assert code == 0, err
    one = json.loads((run / "evaluate.json").read_text())
    proc = ppl_vae("evaluate", "--run-dir", run, *options)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == out.count("\n") > 0  # printed by rank 0 only
    two = json.loads((run / "evaluate.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2 and two[key]
    assert len(two["log_px"]) == one["num_points"] == 360
    torch.testing.assert_close(torch.tensor(two["log_px"]), torch.tensor(one["log_px"]),
                               rtol=0, atol=1e-9)  # fmt: skip
    for extra in ("test_accuracy", "baseline"):
        assert two.get(extra) == one.get(extra)


def test_two_rank_ais_evaluation_and_gaps_equal_one_process(two_rank_run, capsys):
    """AIS and the gaps share batches out as importance sampling does: 3 batches, 2 and 1."""
    runs = {
        "evaluate.json": ["evaluate", "--method", "ais", "--num-chains", "4", "--num-steps",
                          "20", "--limit", "120", "--batch-size", "40", "--seed", "3"],
        "gaps.json": ["gaps", "--num-chains", "4", "--num-steps", "20", "--limit", "30",
                      "--batch-size", "10", "--standard-error", "0.05", "--seed", "3"],
    }  # fmt: skip
    for name, (command, *flags) in runs.items():
        code, _, err = run_cli(command, "--run", two_rank_run, *flags, "--quiet", capsys=capsys)
        assert code == 0, err
        one = json.loads((two_rank_run / name).read_text())
        proc = ppl_vae(command, "--run-dir", two_rank_run, *flags, "--quiet")
        assert proc.returncode == 0, proc.stderr
        two = json.loads((two_rank_run / name).read_text())
        assert one["processes"] == 1 and two["processes"] == 2
        if name == "evaluate.json":
            assert two["method"] == "ais" and len(two["log_px"]) == 120
            assert two["log_px"] == pytest.approx(one["log_px"], abs=1e-9, rel=0)
            assert two["ais"] == pytest.approx(one["ais"], abs=1e-9)
        else:
            assert len(two["per_point"]["log_px"]) == 30
            for key, values in one["per_point"].items():
                assert two["per_point"][key] == pytest.approx(values, abs=1e-9, rel=0), key


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory):
    """2,000 binary points of 20 values from three prototypes: a Bernoulli mixture's data."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(3, 20, generator=g)
    which = torch.randint(3, (2000,), generator=g)
    path = tmp_path_factory.mktemp("em") / "binary.npy"
    np.save(path, torch.bernoulli(prototypes[which], generator=g).numpy())
    return path


@pytest.mark.parametrize(
    "flags, tol",
    [
        (["--dataset", "pinwheel"], 1e-9),  # kmeans (k-means++ seeds, Lloyd), full, float64
        (["--dataset", "pinwheel", "--init", "random_from_data", "--covariance", "diag"], 1e-9),
        # float32 sums in another order: the first bound, of a degenerate start, is -22,326
        (["--dataset", "ring8", "--init", "k-means++", "--dtype", "float32"], 1e-4),
        (["--dataset", "{binary}", "--init", "random", "--n-components", "3"], 1e-9),
    ],
    ids=["kmeans", "random_from_data", "kmeans++-float32", "bernoulli-random"],
)
def test_two_rank_em_fits_the_one_process_mixture(flags, tol, binary_file, tmp_path, capsys):
    flags = [str(binary_file) if f == "{binary}" else f for f in flags]
    code, _, err = run_cli("em", *flags, "--out", tmp_path / "one", "--quiet", capsys=capsys)
    assert code == 0, err
    proc = ppl_vae("em", *flags, "--out", tmp_path / "two", "--quiet")
    assert proc.returncode == 0, proc.stderr
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["mixture"] == one["mixture"] and two["n_iter"] == one["n_iter"] > 1
    assert two["num_train"] == one["num_train"]
    for key in ("train_log_likelihood", "test_log_likelihood"):
        assert two[key] == pytest.approx(one[key], abs=tol)
    np.testing.assert_allclose(two["history"], one["history"], rtol=tol / 100, atol=tol)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
