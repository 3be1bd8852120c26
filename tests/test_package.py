"""The package's front: the version written once, renamed names, the error types."""

import importlib.metadata

import pytest

import ppl_vae
from ppl_vae.errors import InputError, MissingInputError


def test_the_version_comes_from_the_package_metadata():
    assert ppl_vae.__version__ == importlib.metadata.version("ppl_vae")


def test_a_renamed_function_still_works_and_says_its_new_name():
    with pytest.warns(DeprecationWarning, match="ppl_vae.evaluate_elbo is now ppl_vae.mean_elbo"):
        assert ppl_vae.evaluate_elbo is ppl_vae.mean_elbo
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ppl_vae.nope  # noqa: B018


def test_input_errors_are_value_errors_and_missing_files_are_file_not_found_errors():
    assert issubclass(InputError, ValueError)
    assert issubclass(MissingInputError, InputError) and issubclass(MissingInputError, OSError)
    with pytest.raises(FileNotFoundError):
        raise MissingInputError("no such run")


def test_every_public_name_is_importable():
    for name in ppl_vae.__all__:
        assert getattr(ppl_vae, name) is not None, name
