r"""The ``ppl-vae`` command (and ``python -m ppl_vae``): Ctrl-C while it starts is one line.

Loading torch and Pyro takes a second or more. :func:`main` makes SIGTERM act as Ctrl-C does
(a ``KeyboardInterrupt``) before it imports :mod:`ppl_vae.cli`, which loads them, so that
either signal in that second ends the command with one line and exit status 130, as later.
"""

import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]

STARTING = "ppl-vae: interrupted while starting; nothing was written"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line (:func:`ppl_vae.cli.main`); returns the exit status."""
    try:
        # inside the try: the handler is live before signal.signal returns (it still converts
        # the old handler to an enum), so a signal may land in that call itself
        signal.signal(signal.SIGTERM, _interrupt)
        # here, not at the top: this module loads in milliseconds, the CLI in a second or more
        from ppl_vae.cli import main as run
    except KeyboardInterrupt:
        _say(STARTING)
        return 130
    try:
        return run(argv)
    except KeyboardInterrupt:  # before the CLI's own handling began (parsing) or after it ended
        _say("ppl-vae: interrupted")
        return 130


def _say(message: str) -> None:
    """A line on stderr; under torchrun from rank 0 only (every rank is stopped alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) is handled as Ctrl-C is


if __name__ == "__main__":
    sys.exit(main())
