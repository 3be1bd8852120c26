"""The ``ppl-vae`` entry (ppl_vae/__main__.py): Ctrl-C or SIGTERM while torch and Pyro load.

Each case starts ``ppl-vae train --help`` (as the console script or ``python -m``), waits until
the entry has installed its SIGTERM handler (read from /proc: nothing in the program is made
slow or observable for the test), and signals it at once: the CLI's imports take a second or
more after that, so the signal lands while they load.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from ppl_vae.__main__ import STARTING

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def caught_signals(pid: int) -> int:
    """The mask of signals process ``pid`` has handlers for (Linux, /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


# what pip writes for [project.scripts], and python -m (as torchrun runs it)
SCRIPT = ["-c", "import sys; from ppl_vae.__main__ import main; sys.exit(main())"]
MODULE = ["-m", "ppl_vae"]


def start_and_signal(sig: signal.Signals, how: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, *how, "train", "--help"]
    pipe = subprocess.PIPE

    # SIGINT as a terminal gives it, even when this suite runs in the background (where the
    # shell starts it ignored, and Python then installs no KeyboardInterrupt for it)
    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True,
                            preexec_fn=default_sigint)  # fmt: skip
    deadline = time.monotonic() + 30
    while not caught_signals(proc.pid) >> (signal.SIGTERM - 1) & 1:  # the entry's handler
        assert proc.poll() is None and time.monotonic() < deadline, "no SIGTERM handler came"
        time.sleep(0.001)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    "sig, how",
    [(signal.SIGINT, SCRIPT), (signal.SIGINT, MODULE), (signal.SIGTERM, SCRIPT)],
    ids=["SIGINT-script", "SIGINT-python-m", "SIGTERM-script"],
)
def test_a_signal_while_the_command_starts_is_one_line_and_status_130(sig, how):
    done = start_and_signal(sig, how)
    assert (done.returncode, done.stderr, done.stdout) == (130, STARTING + "\n", "")


def test_python_m_ppl_vae_still_runs_the_command_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ppl_vae", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "train" in done.stdout
