r"""The run layer: the only part of ppl_vae that reads and writes run directories.

``train_run``/``load_run``/``evaluate_run``/``gaps_run`` (VAE runs) and ``em_run`` (the EM
baseline) turn configurations into files: checkpoints, ``config.json``, ``metrics.jsonl``,
``evaluate.json``, ``gaps.json``, ``results.json`` and pictures.
"""

from ppl_vae.runs.checkpoint import RunConfig, RunDir
from ppl_vae.runs.em_run import MixtureConfig, em_run, make_mixture
from ppl_vae.runs.evaluate import EvaluateConfig, evaluate_run
from ppl_vae.runs.files import join_processes
from ppl_vae.runs.gaps import GapsConfig, gaps_run
from ppl_vae.runs.pictures import PICTURES, default_pictures, plot_run, write_pictures
from ppl_vae.runs.resume import ResumePoint
from ppl_vae.runs.run import Run, load_run
from ppl_vae.runs.train import Interrupted, resume_run, train_run

__all__ = [
    "PICTURES",
    "EvaluateConfig",
    "GapsConfig",
    "Interrupted",
    "MixtureConfig",
    "Run",
    "RunConfig",
    "RunDir",
    "em_run",
    "evaluate_run",
    "gaps_run",
    "join_processes",
    "load_run",
    "make_mixture",
    "plot_run",
    "ResumePoint",
    "default_pictures",
    "resume_run",
    "train_run",
    "write_pictures",
]
