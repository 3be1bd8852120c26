"""The model-guide contract: the data plate, the site filter, the trace/replay helper."""

import pyro
import pyro.distributions as dist
import torch

from ppl_vae.sites import (
    PARTICLES,
    PLATE,
    data_plate,
    pad_to_rank,
    sample_sites,
    trace_guide_and_model,
    under_particle_plate,
)


def model(x, num_data=None):
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x, num_data=None):
    with data_plate(x, num_data):
        pyro.sample("z", dist.Normal(x / 2, 0.5))


def test_the_data_plate_scales_to_the_full_data_set_only_when_asked():
    x = torch.randn(4)
    trace = pyro.poutine.trace(model).get_trace(x, 40)
    assert trace.nodes["z"]["scale"] == trace.nodes["x"]["scale"] == 10.0
    (frame,) = trace.nodes["z"]["cond_indep_stack"]
    assert frame.name == PLATE and frame.size == 4 and frame.dim == -1
    for num_data in (None, 4):
        assert pyro.poutine.trace(model).get_trace(x, num_data).nodes["z"]["scale"] == 1.0


def test_the_model_is_replayed_against_the_guides_draws():
    x = torch.randn(5)
    model_trace, guide_trace = trace_guide_and_model(model, guide, (x,), {})
    assert torch.equal(model_trace.nodes["z"]["value"], guide_trace.nodes["z"]["value"])
    assert [s["name"] for s in sample_sites(model_trace)] == ["z", "x"]
    assert [s["name"] for s in sample_sites(guide_trace)] == ["z"]  # the plate's site is not one
    assert PLATE in guide_trace.nodes  # ... though the trace holds it


def test_the_particle_plate_draws_every_site_left_of_the_programs_plates():
    x = torch.randn(5)
    programs = under_particle_plate(model, 3, dim=-2), under_particle_plate(guide, 3, dim=-2)
    model_trace, guide_trace = trace_guide_and_model(*programs, (x,), {})
    assert guide_trace.nodes["z"]["value"].shape == (3, 5)
    frames = {f.name: f.dim for f in model_trace.nodes["x"]["cond_indep_stack"]}
    assert frames == {PARTICLES: -2, PLATE: -1}


def test_pad_to_rank_puts_size_one_dims_in_front_of_numbers_and_tensors():
    assert pad_to_rank(2.0, 2).shape == (1, 1)
    assert pad_to_rank(torch.zeros(4), 3).shape == (1, 1, 4)
    assert pad_to_rank(torch.zeros(2, 4), 1).shape == (2, 4)  # never fewer dims
