"""Random streams: a snapshot continues every stream exactly; forked streams leave them alone."""

import random

import numpy as np
import torch

from ppl_vae.rng import forked_rng, rng_state, set_rng_state


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
