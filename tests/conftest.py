"""Shared fixtures: MNIST location, a clean Pyro state for every test."""

import os
from pathlib import Path

import pyro
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "PPL_VAE_DATA" not in os.environ and (SHARED_DATA / "MNIST" / "raw").is_dir():
    os.environ["PPL_VAE_DATA"] = str(SHARED_DATA)


def mnist_root() -> Path | None:
    root = os.environ.get("PPL_VAE_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        return Path(root)
    return None


needs_mnist = pytest.mark.skipif(
    mnist_root() is None, reason="MNIST not found (set PPL_VAE_DATA to a folder with MNIST/raw)"
)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    torch.set_default_dtype(torch.float32)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
