r"""A VAE assembled from configuration: networks, likelihood and guide."""

from __future__ import annotations

from dataclasses import dataclass

from ppl_vae.config import check_positive, option
from ppl_vae.data import Data
from ppl_vae.errors import InputError
from ppl_vae.guides import GUIDES, AmortizedGuide
from ppl_vae.model import LIKELIHOODS, VAEModel, check_sigma
from ppl_vae.networks import NetworkConfig

__all__ = ["VAEConfig", "build_vae", "default_likelihood"]

GUIDE_OPTIONS = ("flow_length", "flow_hidden", "rank")  # VAEConfig fields read by guides


@dataclass(frozen=True)
class VAEConfig:
    """The model p(z) p(x|z) and the guide q(z|x).

    Options of one guide or likelihood (``rank``, ``flow_length``, ``flow_hidden``,
    ``sigma``) are ``None`` unless set; setting one that the chosen guide or likelihood does
    not take is an error that names it.
    """

    latent_dim: int = option(50, "dimension of z")
    network: NetworkConfig = option(
        default_factory=NetworkConfig, help="encoder/decoder architecture"
    )
    likelihood: str | None = option(
        None, "p(x|z) (default: bernoulli for binary data, gaussian otherwise)",
        choices=LIKELIHOODS,
    )  # fmt: skip
    sigma: float | None = option(
        None,
        "gaussian-fixed: fixed sigma (default 0.1); gaussian: initial sigma (default 1)",
    )
    guide: str = option("gaussian", "q(z|x)", choices=GUIDES)
    flow_length: int | None = option(None, "steps of a flow guide (default 4)")
    flow_hidden: int | None = option(
        None, "width of the iaf/spline autoregressive networks (default max(4 * latent-dim, 32))"
    )
    rank: int | None = option(None, "columns of the lowrank guide's covariance factor (default 2)")

    def __post_init__(self):
        check_positive(self, "latent_dim", "flow_length", "flow_hidden", "rank")
        if not isinstance(self.network, NetworkConfig):
            raise InputError(f"network must be a NetworkConfig, got {type(self.network).__name__}")
        GUIDES.check_options(self.guide, self.guide_options(), prefix="--")
        if self.likelihood is not None:
            LIKELIHOODS.check_options(self.likelihood, self.likelihood_options(), prefix="--")
        if self.sigma is not None:
            check_sigma(self.sigma)

    def guide_options(self) -> dict:
        """The guide options that are set."""
        return {k: getattr(self, k) for k in GUIDE_OPTIONS if getattr(self, k) is not None}

    def likelihood_options(self) -> dict:
        """The likelihood options that are set."""
        return {"sigma": self.sigma} if self.sigma is not None else {}


def default_likelihood(data: Data) -> str:
    """Bernoulli for binary data, a learned-sigma Gaussian otherwise."""
    return "bernoulli" if data.is_binary else "gaussian"


def build_vae(config: VAEConfig, data: Data) -> tuple[VAEModel, AmortizedGuide]:
    """Builds the model and guide for ``data``, on ``data``'s device."""
    likelihood = config.likelihood or default_likelihood(data)
    options = config.likelihood_options()
    LIKELIHOODS.check_options(likelihood, options, prefix="--")
    lik = LIKELIHOODS.build(likelihood, data.event_shape, **options)
    if lik.requires_binary and not data.is_binary:
        raise InputError(
            f"the {likelihood} likelihood needs binary data, but {data.name} ({data.encoding}) "
            f"is not binary; use --binarize dynamic/static or --likelihood gaussian"
        )
    encoder, decoder = config.network.build(data.event_shape, config.latent_dim)
    model = VAEModel(decoder, lik, config.latent_dim, data.event_shape)
    guide = GUIDES.build(config.guide, encoder, config.latent_dim, **config.guide_options())
    return model.to(data.device), guide.to(data.device)
