"""Shared fixtures: MNIST location, a clean Pyro state for every test, bad input files."""

import os

import helpers  # noqa: F401  (sets PPL_VAE_DATA to ../shared/data when that holds MNIST)
import numpy as np
import pyro
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker and per
    os.environ["OMP_NUM_THREADS"] = "1"  # process it starts, so N workers share N cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def bad_files(tmp_path):
    """Data files with NaN and inf, a plain file, a corrupt checkpoint, an empty MNIST folder."""
    nan = np.random.default_rng(0).normal(size=(50, 2)).astype("float32")
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = nan.copy()
    inf[3, 1] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    (tmp_path / "a_file").write_text("not a directory")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "empty_mnist").mkdir()
    return tmp_path


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
