r"""A run's pictures: the table of figures (:data:`PICTURES`), drawing them into a folder.

A list of pictures is checked whole before the first is drawn, all are drawn to temporary
files and renamed into place together (an interruption or a full disk leaves the folder as it
was), and ``written.json`` records which checkpoint each picture shows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from ppl_vae.cvae_images import ImageCVAEModel
from ppl_vae.errors import InputError
from ppl_vae.m2 import M2Model
from ppl_vae.plots import (
    analogies_figure,
    completions_figure,
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
from ppl_vae.runs.checkpoint import GAPS, RunDir, held_by
from ppl_vae.runs.files import (
    RECORD,
    folder_lock,
    make_output_dir,
    remove_stale_temporaries,
    staged,
)
from ppl_vae.runs.run import Run, load_run

__all__ = [
    "PICTURES",
    "StaleWarning",
    "check_pictures",
    "default_pictures",
    "plot_run",
    "stale_outputs",
    "write_pictures",
]


class StaleWarning(UserWarning):
    """A picture or estimate in a run's folder shows another checkpoint than the run's own."""


def _conditional(run: Run) -> bool:
    return isinstance(run.model, ImageCVAEModel)


def _semi_supervised(run: Run) -> bool:
    return isinstance(run.model, M2Model)


def _needs_vae(run: Run) -> str | None:
    if _conditional(run):
        return "a model p(z) p(x|z), not a conditional VAE"
    return "a model p(z) p(x|z), not M2's p(y) p(z) p(x|y,z)" if _semi_supervised(run) else None


def _needs_m2(run: Run) -> str | None:
    return None if _semi_supervised(run) else "a semi-supervised M2 run (--model m2)"


def _needs_cvae(run: Run) -> str | None:
    return None if _conditional(run) else "a conditional VAE (--model cvae)"


def _needs_images(run: Run) -> str | None:
    return _needs_vae(run) or (None if run.data.is_image else "images")


def _needs_2d_latent(run: Run) -> str | None:
    dim = run.model.latent_dim
    return _needs_images(run) or (None if dim == 2 else f"a 2-D latent (it has {dim} dimensions)")


def _needs_2d_data(run: Run) -> str | None:
    return _needs_vae(run) or (None if run.data.event_shape == (2,) else "2-D data")


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
    "interpolation",
    lambda run: interpolation_figure(run.model, run.guide, run.data),
    help="decodings between posterior means of test images",
)
PICTURES.register(
    "latent", lambda run: latent_figure(run.guide, run.data), help="posterior means by label"
)
PICTURES.register(
    "manifold",
    lambda run: manifold_figure(run.model),
    help="decodings on a grid of prior quantiles (2-D z)",
)
PICTURES.register(
    "density",
    lambda run: density_figure(run.model, run.guide, run.data),
    help="data and model log-density (2-D data)",
)
PICTURES.register(
    "completions",
    lambda run: completions_figure(run.model, run.data),
    help="conditional VAE: test inputs (hidden part gray), the truth, sampled completions",
)
PICTURES.register(
    "analogies",
    lambda run: analogies_figure(run.model, run.guide, run.data, seed=run.train_config.seed),
    help="m2: test images, each then decoded with every label at its z from q(z|x, y_true) "
    "(Kingma et al.'s Figure 1)",
)
NEEDS = {
    "samples": _needs_vae,
    "reconstructions": _needs_vae,
    "interpolation": _needs_images,
    "latent": _needs_vae,
    "manifold": _needs_2d_latent,
    "density": _needs_2d_data,
    "completions": _needs_cvae,
    "analogies": _needs_m2,
}


def check_pictures(run: Run, names: tuple[str, ...]) -> None:
    """An error naming the first of ``names`` that is unknown or does not apply to ``run``."""
    for name in names:
        PICTURES.check(name)
        what = NEEDS[name](run) if name in NEEDS else None
        if what is not None:
            raise InputError(
                f"the {name} picture needs {what}; this run is a {run.vae_config.model} on "
                f"{run.data.name}; "
                f"leave {name} out of --pictures"
            )


def default_pictures(run: Run) -> tuple[str, ...]:
    """The pictures that apply to ``run``: a conditional VAE's, images or 2-D points, and the
    latent's size."""
    if _conditional(run):
        return ("curves", "completions")
    if _semi_supervised(run):
        return ("curves", "analogies")
    if run.data.is_image:
        names = ["curves", "samples", "reconstructions", "interpolation", "latent"]
        return (*names, "manifold") if run.model.latent_dim == 2 else tuple(names)
    if run.data.event_shape == (2,):
        return ("curves", "samples", "density", "latent")
    return ("curves", "samples", "reconstructions", "latent")


def write_pictures(
    run: Run,
    out_dir: str | os.PathLike | None = None,
    names: tuple[str, ...] | None = None,
    *,
    on_figure: Callable[[str, Figure], None] | None = None,
) -> list[Path]:
    """Draws ``names`` (default: every picture that applies) as ``NAME.png`` into ``out_dir``
    (default: the run's folder), all or none: each is drawn to a temporary file and they are
    renamed into place together. A file of the same name that ppl_vae did not write is refused.
    Draws come from forked random streams, so drawing leaves a training run's streams, and so
    its numbers, unchanged. ``on_figure`` is called with each picture's name and figure before
    it is saved (the TensorBoard log's images)."""
    names = default_pictures(run) if names is None else tuple(names)
    check_pictures(run, names)
    out = Path(out_dir) if out_dir is not None else run.directory
    outputs = RunDir(out).outputs  # a run's folder: its legacy pictures count as written
    files = [f"{name}.png" for name in names]
    outputs.check_replaceable(files)
    shows = {"run": str(Path(run.directory).resolve()), **(run.checkpoint or {})}
    description = f"ppl_vae run {run.directory}, " + ", ".join(
        f"{k} {v}" for k, v in shows.items() if k != "run"
    )
    with staged() as written, forked_rng(run.data.device, 0):
        paths = []
        for name, file in zip(names, files, strict=True):
            fig = PICTURES[name].factory(run)
            if on_figure is not None:
                on_figure(name, fig)
            paths.append(written.save_figure(fig, out / file, description))
        outputs.stage(written, dict.fromkeys(files, shows))
    return paths


def stale_outputs(run_dir: RunDir, identity: dict | None) -> list[str]:
    """The pictures and estimate recorded in ``run_dir`` as showing another checkpoint than
    ``identity`` (``{"epoch", "sha256"}``)."""
    if identity is None:
        return []
    recorded = run_dir.outputs.read()
    return sorted(
        name
        for name, shows in recorded.items()
        if shows and shows.get("sha256") not in (None, identity["sha256"])
    )


def warn_stale(run_dir: RunDir, identity: dict | None) -> None:
    """A :class:`StaleWarning` naming the outputs of ``run_dir`` from another checkpoint."""
    names = stale_outputs(run_dir, identity)
    fixes = ["ppl-vae plot redraws the pictures"] * any(n.endswith(".png") for n in names)
    fixes += ["ppl-vae evaluate renews the estimate"] * any(
        n.endswith(".json") and n != GAPS for n in names
    )
    fixes += ["ppl-vae gaps renews the gaps"] * (GAPS in names)
    fix = " and ".join(fixes)
    if names:
        warnings.warn(
            f"{', '.join(names)} in {run_dir.path} show an earlier checkpoint than the run's "
            f"(epoch {identity['epoch']}); {fix}",
            StaleWarning,
            stacklevel=3,
        )


def _check_picture_folder(out: Path, run_dir: Path) -> None:
    """``plot --out`` writes into a folder of pictures, never into another command's folder."""
    owner = held_by(out, own_run=run_dir)
    if owner == "run":
        raise InputError(
            f"{out} holds another ppl_vae run, whose pictures plot --out would replace; "
            f"choose a folder of its own for the pictures"
        )
    if owner == "em":
        raise InputError(
            f"{out} holds the results of ppl-vae em; choose a folder of its own for the pictures"
        )


def plot_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    names: tuple[str, ...] | None = None,
    device: str = "auto",
    *,
    data_dir: str | None = None,
    checkpoint: str | None = None,
) -> list[Path]:
    """Draws the pictures of a finished run from a checkpoint (``checkpoint``: ``"best"`` or
    ``"last"``, by default the best where the run keeps one) and ``metrics.jsonl``, into
    ``out_dir`` (default: the run's folder); changes neither.

    Drawing into the run's own folder takes its lock for readers, so pictures never land in a
    run that another process is training or replacing; ``out_dir`` elsewhere needs no lock,
    and so also draws a run still in training. Every name is checked before the first
    picture is drawn, and either all pictures are written or none.
    """
    for name in names or ():
        PICTURES.check(name)
    rd = RunDir(run_dir)
    into_run = out_dir is None or Path(out_dir).resolve() == Path(run_dir).resolve()
    if not into_run:
        _check_picture_folder(Path(out_dir), rd.path)
    stamp = rd.stamp()
    run = load_run(run_dir, device, data_dir=data_dir, checkpoint=checkpoint)  # checks first
    rd.read_metrics()  # checked; the checkpoint's own records are drawn (the file never leads)

    names = tuple(names or default_pictures(run))
    check_pictures(run, names)
    if not into_run:
        RunDir(out_dir).outputs.check_replaceable([f"{name}.png" for name in names])
    if into_run:
        with rd.writing(shared=True):
            rd.check_unchanged(stamp)  # the pictures show the checkpoint in the folder
            paths = write_pictures(run, run.directory, names)
    else:
        out = make_output_dir(out_dir)
        with folder_lock(out):  # one writer of the folder; a killed one's leftovers go
            remove_stale_temporaries(out, [*(f"{n}.png" for n in PICTURES), RECORD])
            paths = write_pictures(run, out, names)
    if into_run:
        warn_stale(rd, run.checkpoint)
    return paths
