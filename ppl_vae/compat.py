r"""Compatibility with what ppl_vae 0.1 wrote and took, in one place; kept through 0.2.x.

What it keeps working, and where it is used:

- **checkpoints of format 0** (before the format had a number: the training settings under
  ``"config"``, the data and VAE settings under ``"extra"``, every guide and network option
  stored, the random streams as tuples with a NumPy array):
  :func:`upgrade_format0` (:class:`ppl_vae.runs.RunDir` reads them) and
  :data:`NUMPY_GLOBALS` (what ``torch.load(weights_only=True)`` may rebuild for them);
- **stored configurations with the old field names** (``DataConfig.name``, now ``dataset``;
  ``NetworkConfig.kind``, now ``architecture``; their flags ``--dataset`` and ``--network``
  were already these): :func:`upgrade_config`;
- **run folders without** ``written.json``: the pictures and estimate 0.1 wrote beside the
  checkpoint count as the run's (:data:`LEGACY_RUN_OUTPUTS`), so replacing the run removes
  them, as it did;
- **the keys of** ``results.json`` **before the mixture's fields took scikit-learn's names**
  (``components``, ``covariance``; the data set under ``name``): :func:`old_em_settings`;
- **renamed Python names and keywords**, each with a ``DeprecationWarning``:
  ``ppl_vae.evaluate_elbo`` (now ``mean_elbo``), through :data:`RENAMED` and the package's
  ``__getattr__``; ``log_likelihood(..., diagnostics=True, iwae_ks=...)`` (now
  ``log_likelihood_diagnostics``), through :func:`legacy_diagnostics`;
  ``IWAELoss(data_plate=...)``, never read (the kept plates come from the trace), through
  :func:`ignored_keyword`.

Old flags stay as aliases where the configuration fields declare them (``--network`` for
``--architecture``, ``--components``, ``--covariance``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ppl_vae.guides import GUIDES
from ppl_vae.networks import NETWORKS

__all__ = [
    "LEGACY_RUN_OUTPUTS",
    "NUMPY_GLOBALS",
    "RENAMED",
    "ignored_keyword",
    "legacy_diagnostics",
    "old_em_settings",
    "upgrade_config",
    "upgrade_format0",
]

RENAMED = {"evaluate_elbo": "mean_elbo"}  # ppl_vae.<old> -> ppl_vae.<new>

# what a run folder of 0.1 held beside its checkpoint (before written.json listed them)
LEGACY_RUN_OUTPUTS = (
    "evaluate.json",
    *(f"{name}.png" for name in ("curves", "samples", "reconstructions", "interpolation")),
    *(f"{name}.png" for name in ("latent", "manifold", "density")),
)

# NumPy arrays (the random streams in checkpoints of format 0) rebuild from data alone
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

_RENAMED_FIELDS = {"data": {"name": "dataset"}, "network": {"kind": "architecture"}}


def _renamed(plain: dict, renames: dict[str, str]) -> dict:
    return {renames.get(k, k): v for k, v in plain.items()}


def upgrade_config(plain: dict) -> dict:
    """A stored ``{"data", "vae", "train"}`` configuration with today's field names."""
    out = dict(plain)
    if isinstance(out.get("data"), dict):
        out["data"] = _renamed(out["data"], _RENAMED_FIELDS["data"])
    vae = out.get("vae")
    if isinstance(vae, dict) and isinstance(vae.get("network"), dict):
        out["vae"] = {**vae, "network": _renamed(vae["network"], _RENAMED_FIELDS["network"])}
    return out


def _format0_vae(vae: dict) -> dict:
    """Format 0 stored every guide and network option; the unused ones were ignored."""
    vae = dict(vae)
    used = GUIDES.options(vae.get("guide", "gaussian"))
    for name in ("flow_length", "flow_hidden", "rank"):
        if name in vae and name not in used:
            vae[name] = None
    network = _renamed(vae.get("network", {}), _RENAMED_FIELDS["network"])
    if "hidden" in network and "hidden" not in NETWORKS.options(network.get("architecture", "mlp")):
        network["hidden"] = None
    vae["network"] = network
    if vae.get("likelihood") == "bernoulli":
        vae["sigma"] = None
    return vae


def _format0_rng(rng: dict) -> dict:
    """The random streams of format 0 (tuples, a NumPy array) in today's tensors and numbers."""
    rng = dict(rng)
    python = rng["python"]
    if not isinstance(python, dict):
        version, words, gauss = python
        rng["python"] = {"version": version, "state": torch.tensor(words), "gauss": gauss}
    numpy = rng["numpy"]
    if not isinstance(numpy, dict):
        name, keys, pos, has_gauss, cached = numpy
        rng["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return rng


def upgrade_format0(checkpoint: dict) -> tuple[dict, dict] | None:
    """``(configuration, random streams)`` of a format-0 checkpoint as today's format stores
    them, or ``None`` when it holds no VAE configuration (not written by ``ppl-vae train``)."""
    extra = checkpoint.get("extra")
    if not isinstance(extra, dict) or "vae" not in extra:
        return None
    plain = {
        "data": extra["data"],
        "vae": _format0_vae(extra["vae"]),
        "train": checkpoint["config"],
    }
    return upgrade_config(plain), _format0_rng(checkpoint["rng"])


def old_em_settings(settings: dict, data: dict) -> tuple[dict, dict]:
    """``results.json``'s mixture and data settings with the keys old scripts read added."""
    settings = {**settings, "components": settings["n_components"]}
    settings["covariance"] = settings["covariance_type"]
    return settings, {**data, "name": data["dataset"]}


def legacy_diagnostics(kwargs: dict) -> tuple[bool, tuple[int, ...]] | None:
    """Takes 0.1's ``diagnostics`` and ``iwae_ks`` out of a ``log_likelihood`` call's keywords:
    ``None`` when neither was given, else ``(diagnostics, iwae_ks)``, with a warning."""
    if not {"diagnostics", "iwae_ks"} & kwargs.keys():
        return None
    warnings.warn(
        "log_likelihood(..., diagnostics=..., iwae_ks=...) is deprecated: log_likelihood returns "
        "the tensor of log p(x); use log_likelihood_diagnostics(..., iwae_ks=...) for the rest",
        DeprecationWarning,
        stacklevel=3,
    )
    return bool(kwargs.pop("diagnostics", False)), tuple(kwargs.pop("iwae_ks", ()) or ())


def ignored_keyword(owner: str, name: str, why: str) -> None:
    """Warns that ``owner``'s keyword ``name``, kept from 0.1, does nothing."""
    warnings.warn(f"{owner}({name}=...) does nothing: {why}", DeprecationWarning, stacklevel=3)
