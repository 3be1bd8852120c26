"""The registry idiom: names listed once, declared options enforced, one error wording."""

import pytest

from ppl_vae.data import SYNTHETIC
from ppl_vae.errors import InputError
from ppl_vae.flows import FLOWS
from ppl_vae.guides import GUIDES
from ppl_vae.losses import LOSSES
from ppl_vae.mixture import COVARIANCE_TYPES, INITS, MIXTURES
from ppl_vae.model import LIKELIHOODS
from ppl_vae.networks import ACTIVATIONS, NETWORKS
from ppl_vae.registry import Registry


def make():
    shapes = Registry("shape")
    shapes.register("square", lambda side=1.0: side * side, options=("side",), help="side^2")
    shapes.register("unit", lambda: 1.0)
    return shapes


def test_names_membership_and_build():
    shapes = make()
    assert shapes.names == ("square", "unit") and list(shapes) == ["square", "unit"]
    assert "square" in shapes and "circle" not in shapes and len(shapes) == 2
    assert shapes.build("square", side=3.0) == 9.0 and shapes.build("unit") == 1.0
    assert shapes.options("square") == ("side",) and shapes.help() == "square: side^2; unit"


def test_unknown_names_and_undeclared_options_are_input_errors():
    shapes = make()
    with pytest.raises(InputError, match="unknown shape 'circle'; choose one of square, unit"):
        shapes.build("circle")
    with pytest.raises(InputError, match="side does not apply to the shape 'unit', which takes no"):
        shapes.build("unit", side=2.0)
    with pytest.raises(InputError, match="--side does not apply to the shape 'unit'.*drop --side"):
        shapes.check_options("unit", {"side": 2.0}, prefix="--")
    with pytest.raises(KeyError, match="registered twice"):
        shapes.register("unit", lambda: 2.0)


TABLES = [GUIDES, FLOWS, LIKELIHOODS, NETWORKS, ACTIVATIONS, LOSSES, SYNTHETIC, MIXTURES,
          COVARIANCE_TYPES, INITS]  # fmt: skip


@pytest.mark.parametrize("table", TABLES, ids=[t.kind for t in TABLES])
def test_every_table_of_the_package_is_a_registry(table):
    """One idiom for every choice by name; no name listed twice."""
    assert isinstance(table, Registry) and len(table.names) == len(set(table.names)) > 0
    with pytest.raises(InputError, match=f"unknown {table.kind} 'nope'; choose one of"):
        table.check("nope")
