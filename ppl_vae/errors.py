r"""The project's own error for bad input: what the command line reports as a usage error."""

from __future__ import annotations

# NotFittedError is made on first use (module __getattr__ below)
__all__ = ["InputError", "MissingInputError", "NotFittedError", "WriteError"]  # noqa: F822


class InputError(ValueError):
    """Bad input from the user: an argument, a configuration, a data or run file.

    The message names the problem and the fix. ``ppl-vae`` prints it as one line and exits
    with status 2; any other exception is a bug and keeps its traceback. It is a
    ``ValueError``, so code that catches those keeps working.
    """


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (a data set, a run) is not there."""


class WriteError(InputError):
    """A file could not be written (a full or read-only disk, no permission); the message names
    it and says what is intact. The command line reports it as one line, exit status 2."""


def _not_fitted_error() -> type:
    """:class:`NotFittedError`, made on first use: it subclasses scikit-learn's, whose import
    (about a second) code that never fits a mixture (``import ppl_vae``, the training API,
    ``ppl-vae train``) need not pay."""
    import sklearn.exceptions

    class NotFittedError(InputError, sklearn.exceptions.NotFittedError):
        """An estimator was asked for something that needs a fit (a score, a prediction)
        before one.

        A subclass of scikit-learn's ``NotFittedError`` (so ``except`` clauses and
        ``check_is_fitted`` written for scikit-learn catch it), and so both a ``ValueError``
        and an ``AttributeError``.
        """

    NotFittedError.__qualname__ = NotFittedError.__name__
    return NotFittedError


def __getattr__(name: str):
    if name == "NotFittedError":
        globals()[name] = cls = _not_fitted_error()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
