"""The package's front: the version written once, renamed names, the error types, and its
public names loaded on first use (``import ppl_vae`` loads neither torch nor Pyro)."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

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


def test_importing_the_package_loads_neither_torch_nor_pyro_until_a_name_is_used():
    code = (
        "import sys, ppl_vae\n"
        "print(sorted(m for m in ('torch', 'pyro') if m in sys.modules))\n"
        "from ppl_vae import VAEConfig\n"
        "print(sorted(m for m in ('torch', 'pyro') if m in sys.modules), VAEConfig.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['pyro', 'torch'] ppl_vae.vae"]


def test_dir_lists_every_public_name_and_submodules_are_attributes():
    assert set(ppl_vae.__all__) <= set(dir(ppl_vae))
    assert ppl_vae.runs.RunDir.__module__ == "ppl_vae.runs.checkpoint"  # as when all were loaded
    with pytest.raises(AttributeError, match="no attribute '__nope__'"):
        ppl_vae.__nope__  # noqa: B018


def test_the_names_for_type_checkers_are_the_names_loaded():
    """The ``if TYPE_CHECKING:`` imports in ppl_vae/__init__.py and its table of modules."""
    tree = ast.parse(Path(ppl_vae.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    declared = {a.name: n.module.removeprefix("ppl_vae.") for n in block.body for a in n.names}
    assert declared == ppl_vae._HOME
    assert sorted(declared) == sorted(ppl_vae.__all__)
