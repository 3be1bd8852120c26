"""Progress off a terminal: timed lines, the last one held back printed on close, quiet silent."""

import pytest

from ppl_vae import progress as progress_module
from ppl_vae.progress import Progress, time_left


def test_lines_are_spaced_in_time_and_the_last_always_comes(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])  # the start, then one reading per update
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    with Progress(5, "job", every=10.0) as p:
        p.update(1, "one")  # 1 s after the start: held
        p.update(2, "two")  # 2 s: held (replaces "one")
        p.update(3, "three")  # 12 s: due
        p.update(4, "four")  # 13 s: held, printed by close
    assert capsys.readouterr().err.splitlines() == ["three", "four"]


def test_the_final_unit_prints_at_once_and_quiet_prints_nothing(capsys):
    with Progress(2, "job", every=1e9) as p:
        p.update(1, "half")
        p.update(2, "done")
    assert capsys.readouterr().err.splitlines() == ["done"]
    with Progress(2, "job", quiet=True, every=0.0) as p:
        p.update(1, "half")
        p.update(2, "done")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "done, total, elapsed, bound, text",
    [
        (1, 4, 10.0, False, ", about 30 s to go"),
        (2, 10, 4.0, True, ", at most 16 s to go"),
        (0, 4, 1.0, False, ""),  # no rate yet
        (4, 4, 9.0, False, ""),  # finished
    ],
)
def test_time_left_is_the_rate_so_far(done, total, elapsed, bound, text):
    assert time_left(done, total, elapsed, bound) == text


def test_a_slow_start_is_not_silent_off_a_terminal(capsys):
    import time

    with Progress(10, "EM", every=0.05) as p, p.waiting("initialising (kmeans)"):
        time.sleep(0.23)  # k-means: no iteration yet
        beats = capsys.readouterr().err.splitlines()
        p.update(1, "EM: iteration 1")
        time.sleep(0.15)  # iterations report themselves; the beat has stopped
    assert len(beats) >= 3 and all(b.startswith("EM: initialising (kmeans), ") for b in beats)
    assert "initialising" not in capsys.readouterr().err
    with Progress(10, "EM", every=0.05, quiet=True) as p, p.waiting("initialising"):
        time.sleep(0.12)
    assert capsys.readouterr().err == ""
