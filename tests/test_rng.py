"""Random streams: a snapshot continues every stream exactly; forked streams leave them alone."""

import random

import numpy as np
import torch

from ppl_vae.rng import derived_seed, forked_rng, rng_state, saved_device, set_rng_state


def draws(generator):
    return (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))


def test_a_snapshot_restores_every_stream():
    g = torch.Generator().manual_seed(5)
    state = rng_state(g)
    first = draws(g)
    set_rng_state(state, g)
    second = draws(g)
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert torch.equal(first[3], second[3])


def test_a_forked_stream_is_seeded_and_leaves_the_callers_stream_where_it_was():
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    with forked_rng(torch.device("cpu"), seed=9) as g:
        inside = (torch.rand(2), torch.rand(2, generator=g))
    assert torch.equal(torch.rand(4), expected)
    with forked_rng(torch.device("cpu"), seed=9) as g:
        again = (torch.rand(2), torch.rand(2, generator=g))
    assert all(torch.equal(a, b) for a, b in zip(inside, again, strict=True))


def test_a_data_stream_of_another_device_is_reseeded_and_the_rest_restored():
    g = torch.Generator().manual_seed(5)
    state = rng_state(g)
    assert saved_device(state) == "cpu"
    first = draws(g)
    cuda_like = {**state, "data": torch.zeros(16, dtype=torch.uint8), "data_device": "cuda"}
    assert set_rng_state(cuda_like, g, reseed=derived_seed(0, "x")) is False
    second = draws(g)
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]  # global streams
    fresh = torch.Generator().manual_seed(derived_seed(0, "x"))
    assert torch.equal(second[3], torch.rand(2, generator=fresh))
    assert set_rng_state(state, g) is True


def test_the_device_of_an_old_state_is_read_from_its_size():
    state = rng_state(torch.Generator())
    del state["data_device"]
    assert saved_device(state) == "cpu"
    assert saved_device({**state, "data": torch.zeros(16, dtype=torch.uint8)}) == "cuda"
