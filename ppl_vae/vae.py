r"""A VAE assembled from configuration: networks, likelihood, guide; runs on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyro
import torch

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.evaluate import log_likelihood
from ppl_vae.guides import AmortizedGuide, make_guide
from ppl_vae.model import VAEModel, make_likelihood
from ppl_vae.networks import NetworkConfig, build_networks
from ppl_vae.train import (
    CHECKPOINT,
    TrainConfig,
    collect_params,
    load_checkpoint,
    make_output_dir,
    resolve_device,
    restore_params,
    train,
)

__all__ = [
    "Run",
    "VAEConfig",
    "build_vae",
    "default_likelihood",
    "evaluate_run",
    "load_run",
    "train_run",
]


@dataclass(frozen=True)
class VAEConfig:
    """The model p(z) p(x|z) and the guide q(z|x)."""

    latent_dim: int = 50  # dimension of z
    network: NetworkConfig = field(default_factory=NetworkConfig)  # encoder/decoder architecture
    likelihood: str | None = None  # p(x|z) family; None follows the data (see default_likelihood)
    sigma: float | None = None  # fixed sigma for "gaussian-fixed", initial sigma for "gaussian"
    guide: str = "gaussian"  # a name in ppl_vae.guides.GUIDES
    flow_length: int = 4  # steps of a flow guide
    flow_hidden: int | None = None  # width of iaf/spline networks; None: max(4 * latent_dim, 32)
    rank: int = 2  # columns of the lowrank guide's covariance factor


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
    guide = make_guide(
        config.guide,
        encoder,
        config.latent_dim,
        flow_length=config.flow_length,
        flow_hidden=config.flow_hidden,
        rank=config.rank,
    )
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
        make_output_dir(out)
    extra = {"data": asdict(data_config), "vae": asdict(vae_config)}
    metrics = train(model, guide, data, train_config, out, resume=resume, quiet=quiet, extra=extra)
    return Run(model, guide, data, data_config, vae_config, train_config, metrics)


def load_run(run_dir: str | os.PathLike, device: str = "auto", data_dir: str | None = None) -> Run:
    """Rebuilds a trained VAE from ``run_dir/checkpoint.pt`` on ``device``.

    ``data_dir`` overrides the MNIST folder recorded at training time.
    """
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT)
    if not isinstance(ckpt.get("extra"), dict) or "vae" not in ckpt["extra"]:
        raise ValueError(f"{run_dir} was not written by ppl-vae train; no VAE configuration in it")
    data_config, vae_config = _configs(ckpt["extra"])
    if data_dir is not None:
        data_config = replace(data_config, data_dir=data_dir)
    train_config = TrainConfig(**ckpt["config"])
    data = load_data(data_config, resolve_device(device))
    model, guide = build_vae(vae_config, data)
    pyro.clear_param_store()
    restore_params(collect_params(model, guide, data.encode(data.test[:2])), ckpt["params"])
    return Run(model, guide, data, data_config, vae_config, train_config, ckpt["metrics"])


def evaluate_run(
    run: Run,
    split: str = "test",
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int = 100,
    iwae_ks: tuple[int, ...] = (),
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Importance-sampled log p(x) of a trained run on ``split``, with diagnostics.

    Data points are taken ``batch_size`` at a time, each with exactly ``num_samples`` draws from
    the guide (see :func:`ppl_vae.evaluate.log_likelihood`). Dynamically binarized data are
    binarized once, from ``seed``. Returns the means over points (``nll`` is -log p(x), in nats)
    and the per-point figures.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use train or test")
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size}")
    data = run.data
    x_all = data.train if split == "train" else data.test
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit}")
        x_all = x_all[:limit]
    g = torch.Generator(device=data.device).manual_seed(seed)
    results = []
    done = 0
    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, x_all.shape[0], batch_size):
            x = data.encode(x_all[start : start + batch_size], generator=g)

            def advance(k, n=x.shape[0], base=done):
                if progress is not None:
                    progress(base + n * k)

            results.append(
                log_likelihood(
                    run.model,
                    run.guide,
                    x,
                    num_samples=num_samples,
                    chunk_size=chunk_size,
                    diagnostics=True,
                    iwae_ks=iwae_ks,
                    progress=advance,
                )  # fmt: skip
            )
            done += x.shape[0] * num_samples
    log_px = torch.cat([r.log_px for r in results])
    elbo = torch.cat([r.elbo for r in results])
    ess = torch.cat([r.ess for r in results])
    iwae = {k: torch.cat([r.iwae[k] for r in results]) for k in iwae_ks}
    return {
        "split": split,
        "num_points": int(log_px.shape[0]),
        "num_samples": num_samples,
        "nll": -log_px.mean().item(),
        "nll_standard_error": (log_px.std() / log_px.shape[0] ** 0.5).item(),
        "elbo": elbo.mean().item(),
        "ess": ess.mean().item(),
        "iwae": {str(k): v.mean().item() for k, v in iwae.items()},
        "log_px": log_px.tolist(),
    }
