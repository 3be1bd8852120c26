r"""A VAE assembled from configuration: networks, likelihood, guide; runs on disk."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.guides import AmortizedGuide, make_guide
from ppl_vae.model import VAEModel, make_likelihood
from ppl_vae.networks import NetworkConfig, build_networks
from ppl_vae.train import (
    CHECKPOINT,
    TrainConfig,
    collect_params,
    load_checkpoint,
    resolve_device,
    restore_params,
    train,
)

__all__ = ["Run", "VAEConfig", "build_vae", "default_likelihood", "load_run", "train_run"]


@dataclass(frozen=True)
class VAEConfig:
    """The model p(z) p(x|z) and the guide q(z|x)."""

    latent_dim: int = 50  # dimension of z
    network: NetworkConfig = field(default_factory=NetworkConfig)  # encoder/decoder architecture
    likelihood: str | None = None  # p(x|z) family; None follows the data (see default_likelihood)
    sigma: float | None = None  # fixed sigma for "gaussian-fixed", initial sigma for "gaussian"
    guide: str = "gaussian"  # a name in ppl_vae.guides.GUIDES


def default_likelihood(data: Data) -> str:
    """Bernoulli for binary data, a learned-sigma Gaussian otherwise."""
    return "bernoulli" if data.is_binary else "gaussian"


def build_vae(config: VAEConfig, data: Data) -> tuple[VAEModel, AmortizedGuide]:
    """Builds the model and guide for ``data``, on ``data``'s device."""
    likelihood = config.likelihood or default_likelihood(data)
    lik = make_likelihood(likelihood, data.event_shape, config.sigma)
    if getattr(lik, "requires_binary", False) and not data.is_binary:
        raise ValueError(
            f"the {likelihood} likelihood needs binary data, but {data.name} ({data.encoding}) "
            f"is not binary; use --binarize dynamic/static or --likelihood gaussian"
        )
    encoder, decoder = build_networks(config.network, data.event_shape, config.latent_dim)
    model = VAEModel(decoder, lik, config.latent_dim, data.event_shape)
    guide = make_guide(config.guide, encoder, config.latent_dim)
    return model.to(data.device), guide.to(data.device)


@dataclass
class Run:
    """A trained VAE with its data and configuration."""

    model: VAEModel
    guide: AmortizedGuide
    data: Data
    data_config: DataConfig
    vae_config: VAEConfig
    train_config: TrainConfig
    metrics: list[dict]


def _configs(extra: dict) -> tuple[DataConfig, VAEConfig]:
    vae = dict(extra["vae"])
    vae["network"] = NetworkConfig(**{**vae["network"], "hidden": tuple(vae["network"]["hidden"])})
    return DataConfig(**extra["data"]), VAEConfig(**vae)


def train_run(
    data_config: DataConfig,
    vae_config: VAEConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    device: str = "auto",
    resume: bool = False,
    quiet: bool = False,
) -> Run:
    """Loads data, builds the VAE and trains it, with metrics and checkpoints in ``out_dir``.

    With ``resume``, the data and VAE configuration come from the checkpoint, so only the
    training settings (e.g. more epochs) can change.
    """
    out = Path(out_dir)
    if resume:
        data_config, vae_config = _configs(load_checkpoint(out)["extra"])
    dev = resolve_device(device)
    data = load_data(data_config, dev)
    pyro.set_rng_seed(train_config.seed)
    model, guide = build_vae(vae_config, data)
    if not resume:  # only once every input has been checked, so bad input leaves nothing behind
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create output directory {out}: {e.strerror}") from None
        if not os.access(out, os.W_OK):
            raise ValueError(f"output directory {out} is not writable; choose another --out")
    extra = {"data": asdict(data_config), "vae": asdict(vae_config)}
    metrics = train(model, guide, data, train_config, out, resume=resume, quiet=quiet, extra=extra)
    return Run(model, guide, data, data_config, vae_config, train_config, metrics)


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> Run:
    """Rebuilds a trained VAE from ``run_dir/checkpoint.pt`` on ``device``."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT)
    if not isinstance(ckpt.get("extra"), dict) or "vae" not in ckpt["extra"]:
        raise ValueError(f"{run_dir} was not written by ppl-vae train; no VAE configuration in it")
    data_config, vae_config = _configs(ckpt["extra"])
    train_config = TrainConfig(**ckpt["config"])
    data = load_data(data_config, resolve_device(device))
    model, guide = build_vae(vae_config, data)
    pyro.clear_param_store()
    x0 = data.test[:2]
    x0 = torch.bernoulli(x0) if data.encoding == "dynamic" else x0
    restore_params(collect_params(model, guide, x0), ckpt["params"])
    return Run(model, guide, data, data_config, vae_config, train_config, ckpt["metrics"])
