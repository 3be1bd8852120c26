r"""A run's pictures: the table of figures (:data:`PICTURES`), drawing them into a folder."""

from __future__ import annotations

import os
from pathlib import Path

from ppl_vae.errors import InputError
from ppl_vae.plots import (
    curves_figure,
    density_figure,
    interpolation_figure,
    latent_figure,
    manifold_figure,
    reconstructions_figure,
    samples_figure,
)
from ppl_vae.registry import Registry
from ppl_vae.rng import forked_rng
from ppl_vae.runs.checkpoint import RunDir
from ppl_vae.runs.files import make_output_dir, save_figure
from ppl_vae.runs.run import Run, load_run

__all__ = ["PICTURES", "default_pictures", "plot_run", "write_pictures"]


def _needs(run: Run, what: str, ok: bool, name: str) -> None:
    if not ok:
        raise InputError(f"the {name} picture needs {what}; this run's data are {run.data.name}")


def _images(run: Run, name: str) -> None:
    _needs(run, "images", run.data.is_image, name)


def _interpolation(run: Run):
    _images(run, "interpolation")
    return interpolation_figure(run.model, run.guide, run.data)


def _manifold(run: Run):
    _images(run, "manifold")
    dim = run.model.latent_dim
    _needs(run, f"a 2-D latent (this run's has {dim} dimensions)", dim == 2, "manifold")
    return manifold_figure(run.model)


def _density(run: Run):
    _needs(run, "2-D data", run.data.event_shape == (2,), "density")
    return density_figure(run.model, run.guide, run.data)


PICTURES: Registry = Registry("picture")
PICTURES.register("curves", lambda run: curves_figure(run.metrics), help="ELBO per epoch")
PICTURES.register(
    "samples", lambda run: samples_figure(run.model, run.data), help="decoded prior draws"
)
PICTURES.register(
    "reconstructions",
    lambda run: reconstructions_figure(run.model, run.guide, run.data),
    help="test inputs above their reconstructions",
)
PICTURES.register(
    "interpolation", _interpolation, help="decodings between posterior means of test images"
)
PICTURES.register(
    "latent", lambda run: latent_figure(run.guide, run.data), help="posterior means by label"
)
PICTURES.register("manifold", _manifold, help="decodings on a grid of prior quantiles (2-D z)")
PICTURES.register("density", _density, help="data and model log-density (2-D data)")


def default_pictures(run: Run) -> tuple[str, ...]:
    """The pictures that apply to ``run``: images or 2-D points, and the latent's size."""
    if run.data.is_image:
        names = ["curves", "samples", "reconstructions", "interpolation", "latent"]
        return (*names, "manifold") if run.model.latent_dim == 2 else tuple(names)
    if run.data.event_shape == (2,):
        return ("curves", "samples", "density", "latent")
    return ("curves", "samples", "reconstructions", "latent")


def write_pictures(
    run: Run, out_dir: str | os.PathLike | None = None, names: tuple[str, ...] | None = None
) -> list[Path]:
    """Draws ``names`` (default: every picture that applies) as ``NAME.png`` into ``out_dir``
    (default: the run's folder). Draws come from forked random streams, so drawing leaves a
    training run's streams, and so its numbers, unchanged."""
    names = default_pictures(run) if names is None else tuple(names)
    for name in names:
        PICTURES.check(name)
    out = Path(out_dir) if out_dir is not None else run.directory
    written = []
    with forked_rng(run.data.device, 0):
        for name in names:
            written.append(save_figure(PICTURES[name].factory(run), out / f"{name}.png"))
    return written


def plot_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    names: tuple[str, ...] | None = None,
    device: str = "auto",
    *,
    data_dir: str | None = None,
) -> list[Path]:
    """Draws the pictures of a finished or running run from its checkpoint and
    ``metrics.jsonl``, into ``out_dir`` (default: the run's folder); changes neither."""
    for name in names or ():
        PICTURES.check(name)
    run = load_run(run_dir, device, data_dir=data_dir)
    lines = RunDir(run_dir).read_metrics()
    if lines:
        run.metrics = lines
    out = make_output_dir(out_dir) if out_dir is not None else run.directory
    return write_pictures(run, out, names)
