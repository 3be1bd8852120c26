"""Flow steps: log|det J| against autograd Jacobians, shapes, and the Sylvester constraints."""

import pytest
import torch
from torch.autograd.functional import jacobian

from ppl_vae.errors import InputError
from ppl_vae.flows import FLOWS, MAX_FLOW_LENGTH, ConditionalSylvester, flow_steps, step_size

DIM, CONTEXT = 4, 3


def hidden(kind):
    """A width of 16 for the flows with autoregressive networks, none for the others."""
    return 16 if "hidden_dim" in FLOWS.options(kind) else None


@pytest.mark.parametrize("kind", list(FLOWS))
def test_log_abs_det_jacobian_matches_autograd_slogdet_in_float64(kind):
    torch.manual_seed(0)
    steps = flow_steps(kind, DIM, CONTEXT, length=2, hidden=hidden(kind)).double()
    h = torch.randn(5, CONTEXT, dtype=torch.float64)
    x = 1.5 * torch.randn(5, DIM, dtype=torch.float64)
    for step in steps:
        t = step.condition(h)
        y = t(x)
        ladj = t.log_abs_det_jacobian(x, y)
        assert ladj.shape == (5,)
        for i in range(5):  # each point has its own parameters: one Jacobian per point
            jac = jacobian(lambda xi, i=i, s=step: s.condition(h[i])(xi), x[i])
            sign, logdet = torch.linalg.slogdet(jac)
            assert sign != 0
            assert abs(ladj[i].item() - logdet.item()) < 1e-6, (kind, i, ladj[i], logdet)
        x = y


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_sylvester_bases_are_orthonormal_and_diagonals_keep_the_step_invertible(variant):
    torch.manual_seed(1)
    step = ConditionalSylvester(DIM, CONTEXT, variant, num_vectors=3, reverse=True).double()
    t = step.condition(10 * torch.randn(7, CONTEXT, dtype=torch.float64))
    width = 3 if variant == "orthogonal" else DIM
    eye = torch.eye(width, dtype=torch.float64)
    q = torch.stack([t.basis.embed(e) for e in eye], -1)  # Q's columns, (7, DIM, width)
    assert torch.allclose(q.transpose(-1, -2) @ q, eye.expand(7, -1, -1), atol=1e-12)
    x = torch.randn(7, DIM, dtype=torch.float64)
    assert torch.allclose(t.basis.project(x), (q.transpose(-1, -2) @ x[..., None])[..., 0])
    diag = t.r1.diagonal(dim1=-2, dim2=-1) * t.r2.diagonal(dim1=-2, dim2=-1)
    assert (diag.abs() < 1).all()
    assert torch.equal(t.r1, t.r1.triu()) and torch.equal(t.r2, t.r2.triu())


def test_steps_broadcast_over_leading_particle_dimensions():
    torch.manual_seed(2)
    h = torch.randn(5, CONTEXT)
    for kind in FLOWS:
        step = flow_steps(kind, DIM, CONTEXT, length=1, hidden=hidden(kind))[0]
        t = step.condition(h)
        x = torch.randn(6, 5, DIM)
        y = t(x)
        ladj = t.log_abs_det_jacobian(x, y)
        assert y.shape == (6, 5, DIM) and ladj.shape == (6, 5), kind
        one = step.condition(h)  # a fresh conditioned step: no cache shared with t
        assert torch.allclose(one(x[3]), y[3], atol=1e-6), kind
        assert torch.allclose(one.log_abs_det_jacobian(x[3], y[3]), ladj[3], atol=1e-5), kind


def test_bad_flow_arguments_name_the_fix():
    with pytest.raises(ValueError, match="unknown flow 'nope'; choose one of planar"):
        flow_steps("nope", DIM, CONTEXT, 2)
    with pytest.raises(ValueError, match="flow length must be a positive integer, got 0"):
        flow_steps("planar", DIM, CONTEXT, 0)
    with pytest.raises(ValueError, match="planar flow has no hidden layer; drop --flow-hidden"):
        flow_steps("planar", DIM, CONTEXT, 2, hidden=16)
    with pytest.raises(ValueError, match=r"num_vectors must lie in 1\.\.4, got 5"):
        ConditionalSylvester(DIM, CONTEXT, "orthogonal", num_vectors=5)
    with pytest.raises(ValueError, match="unknown Sylvester variant 'x'"):
        ConditionalSylvester(DIM, CONTEXT, "x")


@pytest.mark.parametrize("kind", list(FLOWS))
def test_step_size_counts_a_built_step_without_allocating_it(kind):
    hidden = 16 if "hidden_dim" in FLOWS.options(kind) else None
    for d, c, h in ((3, 5, None), (4, 7, hidden)):
        step = flow_steps(kind, d, c, 2, h)[1]  # a reversed step counts the same
        built = sum(t.numel() for t in (*step.parameters(), *step.buffers()))
        assert step_size(kind, d, c, h) == built


@pytest.mark.parametrize("length", [MAX_FLOW_LENGTH + 1, 100_000_000])
def test_an_absurd_flow_length_is_refused_at_once(length):
    with pytest.raises(InputError, match=f"flow_length {length} is far more steps.*--flow-length"):
        flow_steps("planar", 2, 4, length)
