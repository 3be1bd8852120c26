r"""Random streams: snapshots that make a run resumable, and forked streams for evaluations."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

CPU_STATE_BYTES = 5056  # torch.Generator("cpu").get_state().numel()

__all__ = [
    "derived_seed",
    "forked_rng",
    "rng_state",
    "saved_device",
    "seed_streams",
    "set_rng_state",
]


def derived_seed(seed: int, *keys) -> int:
    """A seed in [0, 2**32) for the stream ``keys`` of ``seed`` (a batch, a rank), the same in
    every process and every Python session; distinct keys give unrelated streams."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_streams(device: torch.device, seed: int) -> torch.Generator:
    """Seeds torch's global streams (all devices) with ``seed``; returns a generator on
    ``device`` seeded alike, for data-side draws."""
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict:
    """The global torch, Python and NumPy streams, CUDA's if present, and ``generator``'s.

    Everything is a tensor or a plain number, so that a checkpoint holding it loads with
    ``torch.load(weights_only=True)``.
    """
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(words), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "data": generator.get_state(),
        "data_device": generator.device.type,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def saved_device(state: dict) -> str:
    """The device type of the data generator whose state ``state`` holds ("cpu" or "cuda");
    from the size of the state in checkpoints that did not record it (a CPU generator's
    Mersenne Twister state is 5,056 bytes, a CUDA generator's Philox seed and offset 16)."""
    if "data_device" in state:
        return state["data_device"]
    return "cpu" if state["data"].numel() == CPU_STATE_BYTES else "cuda"


def set_rng_state(state: dict, generator: torch.Generator, reseed: int = 0) -> bool:
    """Restores what :func:`rng_state` took.

    A data generator saved on another device type (a CUDA run resumed on a CPU, or the
    reverse) cannot continue its stream there: ``generator`` is seeded with ``reseed`` instead
    and False is returned; the global streams are restored either way (CUDA's where it was
    saved and a GPU is visible). True when every stream continues exactly.
    """
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    exact = saved_device(state) == generator.device.type
    if exact:
        generator.set_state(state["data"])
    else:
        generator.manual_seed(reseed)
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    return exact


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[torch.Generator]:
    """Seeds the global streams (and CUDA's on a CUDA ``device``) inside, restores them after.

    Yields a generator on ``device`` seeded with ``seed``, for data-side draws (binarization).
    A figure computed inside is a deterministic function of the parameters, and the caller's
    streams are left where they were.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield seed_streams(device, seed)
