r"""The project's own error for bad input: what the command line reports as a usage error."""

from __future__ import annotations

import sklearn.exceptions

__all__ = ["InputError", "MissingInputError", "NotFittedError", "WriteError"]


class InputError(ValueError):
    """Bad input from the user: an argument, a configuration, a data or run file.

    The message names the problem and the fix. ``ppl-vae`` prints it as one line and exits
    with status 2; any other exception is a bug and keeps its traceback. It is a
    ``ValueError``, so code that catches those keeps working.
    """


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (a data set, a run) is not there."""


class NotFittedError(InputError, sklearn.exceptions.NotFittedError):
    """An estimator was asked for something that needs a fit (a score, a prediction) before one.

    A subclass of scikit-learn's ``NotFittedError`` (so ``except`` clauses and
    ``check_is_fitted`` written for scikit-learn catch it), and so both a ``ValueError`` and an
    ``AttributeError``.
    """


class WriteError(InputError):
    """A file could not be written (a full or read-only disk, no permission); the message names
    it and says what is intact. The command line reports it as one line, exit status 2."""
