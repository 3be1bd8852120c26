r"""The project's own error for bad input: what the command line reports as a usage error."""

from __future__ import annotations

__all__ = ["InputError", "MissingInputError", "NotFittedError", "WriteError"]


class InputError(ValueError):
    """Bad input from the user: an argument, a configuration, a data or run file.

    The message names the problem and the fix. ``ppl-vae`` prints it as one line and exits
    with status 2; any other exception is a bug and keeps its traceback. It is a
    ``ValueError``, so code that catches those keeps working.
    """


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (a data set, a run) is not there."""


class NotFittedError(InputError, AttributeError):
    """An estimator was asked for something that needs a fit (a score, a prediction) before one.

    Both a ``ValueError`` and an ``AttributeError``, as scikit-learn's ``NotFittedError``, so
    code written for either (``except ValueError``, ``hasattr``-style ``except AttributeError``)
    keeps working.
    """


class WriteError(InputError):
    """A file could not be written (a full or read-only disk, no permission); the message names
    it and says what is intact. The command line reports it as one line, exit status 2."""
