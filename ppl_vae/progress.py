r"""Progress of long jobs on stderr: a bar on a terminal, timed lines in a log.

On a terminal a tqdm bar counts the work (lines written with ``tqdm.write``, such as an
epoch's summary, stay above it). When stderr is a file or a pipe (``nohup``, CI, a scheduler)
there is no bar: :meth:`Progress.update` prints its line at most every ``every`` seconds, and
:meth:`Progress.close` the last one held back.
``quiet`` silences both; a command's result is printed by the command, not here.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["Progress", "time_left"]


def time_left(done: float, total: float, elapsed: float, bound: bool = False) -> str:
    """``", about 80 s to go"`` at the rate so far ("at most" when ``total`` is a bound)."""
    if done <= 0 or done >= total:
        return ""
    return f", {'at most' if bound else 'about'} {(total - done) * elapsed / done:.0f} s to go"


class Progress:
    """Reports a job of ``total`` units named ``desc`` (see the module's description)."""

    def __init__(
        self, total: float, desc: str, unit: str = "it", *, quiet: bool = False,
        every: float = 10.0, scale: bool = False,
    ):  # fmt: skip
        self.quiet, self.every, self.total = quiet, every, total
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, unit_scale=scale, dynamic_ncols=True,
            disable=quiet or not self.terminal, leave=False, file=sys.stderr,
        )  # fmt: skip
        self.began = self.last = time.perf_counter()
        self.held: str | None = None  # a line not printed yet, for close()
        self.desc, self.updated = desc, False

    @property
    def elapsed(self) -> float:
        """Seconds since the job began."""
        return time.perf_counter() - self.began

    def update(self, done: float, line: str | None = None) -> None:
        """Moves to ``done`` units; off a terminal prints ``line`` when one is due."""
        self.bar.update(done - self.bar.n)
        self.updated = True
        if self.quiet or self.terminal or line is None:
            return
        now = time.perf_counter()
        if now - self.last >= self.every or done >= self.total:
            self.last, self.held = now, None
            print(line, file=sys.stderr, flush=True)
        else:
            self.held = line

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Off a terminal, a line every ``every`` seconds saying that ``what`` is under way,
        until the first :meth:`update`: a slow start (k-means before EM) is not silent."""
        if self.quiet or self.terminal:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.every) and not self.updated:
                print(f"{self.desc}: {what}, {self.elapsed:.0f} s", file=sys.stderr, flush=True)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        """Closes the bar; off a terminal prints the last line if it was held back."""
        self.bar.close()
        if self.held is not None:
            print(self.held, file=sys.stderr, flush=True)
            self.held = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
