r"""A VAE assembled from configuration: networks, likelihood and guide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ppl_vae.config import check_memory, check_positive, option
from ppl_vae.cvae import check_visible
from ppl_vae.cvae_images import image_cvae_pair
from ppl_vae.data import Data
from ppl_vae.errors import InputError
from ppl_vae.flows import check_flow_length
from ppl_vae.guides import GUIDES, AmortizedGuide, guide_size
from ppl_vae.m2 import M2Guide, M2Model
from ppl_vae.model import LIKELIHOODS, VAEModel, check_sigma, check_sigma_floor
from ppl_vae.networks import NetworkConfig
from ppl_vae.priors import PRIORS, make_prior, prior_size
from ppl_vae.semisupervised import count_classes
from ppl_vae.twolayer import SIZES, two_layer_pair

__all__ = ["VAEConfig", "build_vae", "check_vae_memory", "default_likelihood", "vae_size"]

GUIDE_OPTIONS = ("flow_length", "flow_hidden", "rank")  # VAEConfig fields read by guides
MODELS = ("vae", "two-layer", "cvae", "m2")
M2_HIDDEN = (500,)  # M2's one hidden layer of 500 (Kingma et al.'s code) without --hidden


@dataclass(frozen=True)
class VAEConfig:
    """The model p(z) p(x|z) and the guide q(z|x) (``model="cvae"``: p(z|x) p(y|x,z) and
    q(z|x,y) of images split into ``visible`` quadrants x and the hidden pixels y).

    Options of one guide or likelihood (``rank``, ``flow_length``, ``flow_hidden``,
    ``sigma``, ``sigma_floor``) are ``None`` unless set; setting one that the chosen guide or
    likelihood does not take is an error that names it.
    """

    model: str = option(
        "vae", "the generative model: vae (p(z) p(x|z)) or two-layer (p(z2) p(z1|z2) p(x|z1), "
        "Burda et al.: z1 of --latent-dim, z2 of half that; the command line's default there "
        "is --latent-dim 100 --hidden 100,100 --loss elbo) or cvae (p(z|x) p(y|x,z), Sohn et "
        "al.: images split into --visible quadrants x and the hidden pixels y; the command "
        "line's default there is --latent-dim 200 --activation relu, and --hidden 500,500 "
        "is its own) or m2 (p(y) p(z) p(x|y,z), Kingma et al.'s semi-supervised model: "
        "--labeled N labelled training points, the rest unlabelled; each step adds the loss "
        "of one batch of the labelled points, cycled, to that of a batch of the unlabelled "
        "ones, and an epoch is one pass over the unlabelled points; the default there is "
        "--latent-dim 50 --activation softplus and one hidden layer of 500)",
        choices=MODELS,
    )  # fmt: skip
    latent_dim: int = option(50, "dimension of z (two-layer: of z1)")
    network: NetworkConfig = option(
        default_factory=NetworkConfig, help="encoder/decoder architecture"
    )
    likelihood: str | None = option(
        None, "p(x|z) (default: bernoulli for binary data, gaussian-hetero for the 2-D sets, "
        "gaussian otherwise)",
        choices=LIKELIHOODS,
    )  # fmt: skip
    sigma: float | None = option(
        None,
        "gaussian-fixed: fixed sigma (default 0.1); gaussian: initial sigma (default 1)",
    )
    sigma_floor: float | None = option(
        None, "gaussian-hetero: the least sigma(z), in the data's units (default 1e-3)"
    )
    guide: str = option("gaussian", "q(z|x)", choices=GUIDES)
    flow_length: int | None = option(None, "steps of a flow guide (default 4)")
    flow_hidden: int | None = option(
        None, "width of the iaf/spline autoregressive networks (default max(4 * latent-dim, 32))"
    )
    rank: int | None = option(None, "columns of the lowrank guide's covariance factor (default 2)")
    prior: str = option("normal", "p(z)", choices=PRIORS)
    prior_components: int | None = option(
        None, "mixture components of a mog (default 10) or vamp (default 500) prior"
    )
    visible: int | None = option(
        None, "cvae: quadrants shown, the rest predicted: 1 the bottom-left, 2 also the "
        "top-left, 3 also the top-right (default 1)",
        choices=(1, 2, 3),
    )  # fmt: skip
    baseline_epochs: int | None = option(
        None, "cvae: epochs of a deterministic baseline p(y|x) (an MLP of --hidden) trained "
        "before the CVAE, whose generation network starts from it; evaluate reports its log "
        "p(y|x) beside the CVAE's (default: no baseline)",
    )  # fmt: skip

    labeled: int | None = option(
        None, "m2: labelled training points, as many of each class, drawn from --seed (the "
        "rest are unlabelled)",
    )  # fmt: skip
    alpha: float | None = option(
        None, "m2: the weight of each labelled point's classification loss -log q(y|x) "
        "(default: the paper's 0.1 N / N_labelled, N the training points)",
    )  # fmt: skip
    balanced: bool = option(
        False, "m2: weight each step's labelled batch as much as its unlabelled one, as if the "
        "labelled set were repeated to the unlabelled set's size (a labelled point's ELBO and "
        "alpha-weighted classification loss then count N_unlabelled / N_labelled times; "
        "default: once each, the paper's objective)",
    )  # fmt: skip

    def __post_init__(self):
        check_positive(self, "latent_dim", "flow_length", "flow_hidden", "rank", "prior_components",
                       "baseline_epochs", "labeled")  # fmt: skip
        if self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.model == "two-layer":
            self._check_two_layer()
        if self.model == "cvae":
            self._check_cvae()
        else:
            for name in ("visible", "baseline_epochs"):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    raise InputError(f"{flag} applies to --model cvae only, not {self.model}")
        if self.model == "m2":
            self._check_m2()
        else:
            for name in ("labeled", "alpha", "balanced"):
                if getattr(self, name) not in (None, False):
                    raise InputError(f"--{name} applies to --model m2 only, not {self.model}")
        PRIORS.check_options(self.prior, self.prior_options(), prefix="--prior-")
        if self.flow_length is not None:
            check_flow_length(self.flow_length)
        if not isinstance(self.network, NetworkConfig):
            raise InputError(f"network must be a NetworkConfig, got {type(self.network).__name__}")
        GUIDES.check_options(self.guide, self.guide_options(), prefix="--")
        if self.likelihood is not None:
            LIKELIHOODS.check_options(self.likelihood, self.likelihood_options(), prefix="--")
        if self.sigma is not None:
            check_sigma(self.sigma)
        if self.sigma_floor is not None:
            check_sigma_floor(self.sigma_floor)

    def guide_options(self) -> dict:
        """The guide options that are set."""
        return {k: getattr(self, k) for k in GUIDE_OPTIONS if getattr(self, k) is not None}

    def _refuse(self, guide: str, prior: str, *, bernoulli: str | None = None, more=()) -> None:
        """An error naming the first flag that the model (``self.model``) does not take: a
        guide, prior or architecture other than the default (``guide`` and ``prior`` say
        why), a likelihood other than Bernoulli where ``bernoulli`` says why, and ``more``
        rows of (bad, flag, why)."""
        wrong = [
            (self.guide != "gaussian", "--guide", guide),
            (self.prior != "normal", "--prior", prior),
            (self.network.architecture != "mlp", "--architecture", "it is built of MLPs"),
        ]
        if bernoulli is not None:
            sigma = self.sigma is not None or self.sigma_floor is not None
            wrong += [
                (self.likelihood not in (None, "bernoulli"), "--likelihood", bernoulli),
                (sigma, "--sigma/--sigma-floor", bernoulli),
            ]
        for bad, flag, why in [*wrong, *more]:
            if bad:
                raise InputError(
                    f"--model {self.model} takes no {flag} other than the default: {why}"
                )

    def _check_two_layer(self) -> None:
        self._refuse(
            "its guide is q(z1|x) q(z2|z1), diagonal", "its prior is p(z2) p(z1|z2)",
            more=[(self.latent_dim < 2, "--latent-dim", "z2 has half the dimensions of z1")],
        )  # fmt: skip

    def _check_cvae(self) -> None:
        object.__setattr__(
            self, "visible", check_visible(1 if self.visible is None else self.visible)
        )
        self._refuse(
            "its guide is q(z|x,y), diagonal Gaussian",
            "its prior is the network p(z|x)",
            bernoulli="p(y|x,z) is a Bernoulli per hidden pixel",
        )

    def _check_m2(self) -> None:
        if self.labeled is None:
            raise InputError(
                "--model m2 needs --labeled N: how many training points keep their label (a "
                "multiple of the classes, e.g. 100 on MNIST)"
            )
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
            or not 0 <= self.alpha < float("inf")
        ):  # fmt: skip
            raise InputError(f"--alpha must be a finite number >= 0, got {self.alpha!r}")
        self._refuse(
            "its guide is q(y|x) q(z|x,y), diagonal",
            "its prior is p(y) p(z), uniform and N(0, I)",
            bernoulli="p(x|y,z) is a Bernoulli per pixel",
        )

    def prior_options(self) -> dict:
        """The prior options that are set."""
        return {} if self.prior_components is None else {"components": self.prior_components}

    def likelihood_options(self) -> dict:
        """The likelihood options that are set."""
        options = {"sigma": self.sigma, "sigma_floor": self.sigma_floor}
        return {k: v for k, v in options.items() if v is not None}


def default_likelihood(data: Data) -> str:
    """Bernoulli for binary data, a learned-sigma Gaussian otherwise.

    This is what ``likelihood=None`` means, also in the configurations of recorded runs; the
    command line's own defaults for some data sets (:mod:`ppl_vae.presets`) are written into
    the configuration of a new run instead, so that a recorded run keeps its likelihood.
    """
    return "bernoulli" if data.is_binary else "gaussian"


def vae_size(config: VAEConfig, event_shape: Sequence[int], likelihood: str) -> dict[str, int]:
    """Parameters and buffers (elements) of the VAE ``config`` describes for points of
    ``event_shape``, by part (``network``, ``guide``, ``likelihood``), counted without
    allocating them (on the ``meta`` device); a guide that cannot be counted is left out.

    Example:
        >>> vae_size(VAEConfig(latent_dim=2, guide="planar"), (4,), "gaussian")
        {'network': 82804, 'guide': 4824, 'likelihood': 4}
    """

    def count(*modules) -> int:
        return sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers()))

    with torch.device("meta"):
        lik = LIKELIHOODS.build(likelihood, torch.Size(event_shape), **config.likelihood_options())
        if config.model == "two-layer":
            model, guide = _two_layer(config, lik, torch.Size(event_shape))
            return {"network": count(model) - count(lik), "guide": count(guide),
                    "likelihood": count(lik)}  # fmt: skip
        if config.model == "cvae":
            model, guide = _cvae(config, event_shape)
            return {"network": count(model), "guide": count(guide)}
        if config.model == "m2":  # counted with 10 classes
            model, guide = _m2(config, event_shape, 10)
            return {"network": count(model), "guide": count(guide)}
        encoder, decoder = config.network.build(event_shape, config.latent_dim, lik.decoder_outputs)

    sizes = {"network": count(encoder, decoder)}
    guide = guide_size(
        config.guide, encoder.feature_dim, config.latent_dim, **config.guide_options()
    )
    if guide is not None:
        sizes["guide"] = guide
    sizes["likelihood"] = count(lik)
    if config.prior != "normal":
        sizes["prior"] = prior_size(
            config.prior, config.latent_dim, event_shape, **config.prior_options()
        )
    return sizes


TRAINING_COPIES = 4  # a parameter in training: its value, gradient and Adam's two moments


def check_vae_memory(
    config: VAEConfig, event_shape: Sequence[int], likelihood: str, device: torch.device | str
) -> None:
    """An error before anything is allocated when training the VAE's parameters (values,
    gradients, Adam's moments) needs more memory than ``device`` has; it names the settings
    of the largest part."""
    sizes = vae_size(config, event_shape, likelihood)
    itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    network = config.network
    flags = {
        "network": f"--architecture {network.architecture}"
        + (f", --hidden {','.join(map(str, network.hidden or (200, 200)))}"
           if network.architecture == "mlp" else "")
        + f", --latent-dim {config.latent_dim}",
        "guide": ", ".join(
            [f"--guide {config.guide}", f"--latent-dim {config.latent_dim}"]
            + [f"--{k.replace('_', '-')} {v}" for k, v in config.guide_options().items()]
        ),
        "likelihood": f"one value per data dimension, {tuple(event_shape)}",
        "prior": f"--prior {config.prior}, --prior-components",
    }  # fmt: skip
    check_memory(
        total * itemsize * TRAINING_COPIES,
        f"training this VAE's {total / 1e6:,.0f} million parameters (values, gradients, "
        f"Adam's moments)",
        device=device,
        fix=f"most are the {largest}'s ({flags[largest]}); choose smaller sizes",
    )


def _two_layer(config: VAEConfig, likelihood, event_shape):
    """The two-layer pair: z1 of ``latent_dim``, z2 of half that; ``hidden`` between x and z1
    (Burda et al.'s 100,100 by default), z2's own width twice between z1 and z2."""
    hidden = config.network.hidden or SIZES["hidden1"]
    dims = (config.latent_dim, config.latent_dim // 2)
    return two_layer_pair(likelihood, event_shape, dims, (hidden, dims[1:] * 2),
                          config.network.activation)  # fmt: skip


def _cvae(config: VAEConfig, event_shape):
    """The conditional VAE over whole images: its networks of ``hidden`` (Pyro's 500,500 by
    default), z of ``latent_dim``."""
    hidden = config.network.hidden or (500, 500)
    return image_cvae_pair(
        config.visible, event_shape, config.latent_dim, hidden, config.network.activation,
        baseline=config.baseline_epochs is not None,
    )  # fmt: skip


def _m2(config: VAEConfig, event_shape, num_classes: int) -> tuple[M2Model, M2Guide]:
    """M2's pair: z of ``latent_dim``, ``hidden`` (one layer of 500 by default) in the decoder,
    the classifier and the encoder."""
    sizes = dict(
        event_shape=tuple(event_shape), num_classes=num_classes, latent_dim=config.latent_dim,
        hidden=config.network.hidden or M2_HIDDEN, activation=config.network.activation,
    )  # fmt: skip
    return M2Model(**sizes), M2Guide(**sizes)


def _check_m2_data(data: Data) -> int:
    """M2 scores binary points with labels; the number of classes."""
    classes = count_classes(data)
    if not data.is_binary:
        raise InputError(
            f"--model m2 scores binary pixels (a Bernoulli each), but {data.name} "
            f"({data.encoding}) is not binary; use --binarize dynamic or static"
        )
    return classes


def _check_cvae_data(data: Data) -> None:
    """The conditional VAE splits images into quadrants and scores binary pixels."""
    if not data.is_image or len(data.event_shape) < 2 or min(data.event_shape[-2:]) < 2:
        raise InputError(
            f"--model cvae completes images from their quadrants; {data.name} has points of "
            f"shape {tuple(data.event_shape)}, not images: choose an image --dataset"
        )
    if not data.is_binary:
        raise InputError(
            f"--model cvae scores binary pixels (a Bernoulli each), but {data.name} "
            f"({data.encoding}) is not binary; use --binarize dynamic or static"
        )


def build_vae(config: VAEConfig, data: Data) -> tuple[VAEModel, AmortizedGuide]:
    """Builds the model and guide for ``data``, on ``data``'s device.

    The parameters are counted first (:func:`check_vae_memory`): a VAE that cannot be trained
    in the device's memory is an error before anything is allocated.
    """
    if config.model == "cvae":
        _check_cvae_data(data)
        check_vae_memory(config, data.event_shape, "bernoulli", data.device)
        model, guide = _cvae(config, data.event_shape)
        return model.to(data.device), guide.to(data.device)
    if config.model == "m2":
        num_classes = _check_m2_data(data)
        check_vae_memory(config, data.event_shape, "bernoulli", data.device)
        model, guide = _m2(config, data.event_shape, num_classes)
        return model.to(data.device), guide.to(data.device)
    likelihood = config.likelihood or default_likelihood(data)
    options = config.likelihood_options()
    LIKELIHOODS.check_options(likelihood, options, prefix="--")
    check_vae_memory(config, data.event_shape, likelihood, data.device)
    lik = LIKELIHOODS.build(likelihood, data.event_shape, **options)
    if lik.requires_binary and not data.is_binary:
        raise InputError(
            f"the {likelihood} likelihood needs binary data, but {data.name} ({data.encoding}) "
            f"is not binary; use --binarize dynamic/static or --likelihood gaussian"
        )
    if config.model == "two-layer":
        model, guide = _two_layer(config, lik, data.event_shape)
        return model.to(data.device), guide.to(data.device)
    encoder, decoder = config.network.build(
        data.event_shape, config.latent_dim, lik.decoder_outputs
    )
    guide = GUIDES.build(config.guide, encoder, config.latent_dim, **config.guide_options())
    prior = None
    if config.prior != "normal":
        prior = make_prior(
            config.prior, config.latent_dim, guide, data.event_shape, **config.prior_options()
        )
    model = VAEModel(decoder, lik, config.latent_dim, data.event_shape, prior)
    return model.to(data.device), guide.to(data.device)
