"""Shared test helpers: closed-form models, MNIST discovery, the command line in-process.

Test files import from here, never from each other.
"""

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.data import Data
from ppl_vae.guides import GaussianGuide
from ppl_vae.model import FixedGaussianLikelihood, VAEModel

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if "PPL_VAE_DATA" not in os.environ and (SHARED_DATA / "MNIST" / "raw").is_dir():
    os.environ["PPL_VAE_DATA"] = str(SHARED_DATA)  # before anything reads it


def mnist_root() -> Path | None:
    """The MNIST folder from PPL_VAE_DATA (by default ../shared/data), if present."""
    root = os.environ.get("PPL_VAE_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        return Path(root)
    return None


needs_mnist = pytest.mark.skipif(
    mnist_root() is None, reason="MNIST not found (set PPL_VAE_DATA to a folder with MNIST/raw)"
)


def run_cli(*args, capsys):
    """Runs ``ppl-vae ARGS`` in-process; returns (exit status, stdout, stderr)."""
    from ppl_vae.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- a linear-Gaussian VAE: SVI can reach the exact log-likelihood -------------------------------


class Flatten(nn.Module):
    """An encoder that hands x itself to the guide's linear head."""

    def __init__(self, dim):
        super().__init__()
        self.feature_dim = dim

    def forward(self, x):
        return x


def linear_gaussian_vae(dim=5, latent=2, sigma=0.5, n=2000, seed=0):
    """z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I) with orthogonal columns of W.

    Orthogonal columns make the exact posterior covariance diagonal, so the diagonal Gaussian
    guide with a linear encoder contains the exact posterior and the ELBO can reach log p(x).
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    w = q[:, :latent] * torch.tensor([2.0, 1.0])
    b = torch.randn(dim, generator=g)
    decoder = nn.Linear(latent, dim)
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    decoder.requires_grad_(False)
    model = VAEModel(decoder, FixedGaussianLikelihood(torch.Size([dim]), sigma), latent, [dim])
    model.train(False)
    cov = w @ w.T + sigma**2 * torch.eye(dim)
    exact = torch.distributions.MultivariateNormal(b, cov)
    x = exact.sample((n + 500,))
    data = Data(x[:n], x[n:], "continuous", "linear-gaussian")
    return model, data, exact


def trainable_linear_gaussian():
    """The linear-Gaussian model with a trainable decoder, its guide, 6 points, all parameters."""
    model, data, _ = linear_gaussian_vae(n=10)
    model.decoder.requires_grad_(True)
    model.train(True)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    return model, guide, data.train[:6], list(model.parameters()) + list(guide.parameters())


# -- the linear-Gaussian model as plain Pyro functions, with its exact posterior -----------------


def linear_gaussian_programs(d=4, latent=2, sigma=0.7, n=6, seed=0):
    """The linear-Gaussian model as Pyro functions, its exact-posterior and prior guides, points
    and their exact log p(x) (float64); ``model.marginal`` is the distribution p(x)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, latent, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, sigma).to_event(1), obs=x)

    precision = torch.eye(latent, dtype=torch.float64) + w.T @ w / sigma**2
    post_cov = torch.linalg.inv(precision)

    def exact_guide(x):
        loc = (x - b) @ w @ post_cov / sigma**2  # posterior mean, one row per point
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=post_cov))

    def prior_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample(
                "z", dist.Normal(torch.zeros(len(x), latent, dtype=x.dtype), 1.0).to_event(1)
            )

    cov = w @ w.T + sigma**2 * torch.eye(d, dtype=torch.float64)
    model.marginal = dist.MultivariateNormal(b, covariance_matrix=cov)  # p(x), for simulated x
    return model, exact_guide, prior_guide, x, model.marginal.log_prob(x)


# -- a linear-Gaussian VAE with a general W: the best mean-field Gaussian in closed form ---------


class MeanField:
    """A float64 :class:`VAEModel` z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I) with a general W
    (its last ``unused`` columns zero), points drawn from it, and a :class:`GaussianGuide` whose
    linear encoder outputs the best mean-field Gaussian of each point: the posterior mean and
    the variances 1 / Lambda_ii of the posterior precision Lambda = I + W^T W / sigma^2."""

    def __init__(self, dim=4, latent=3, sigma=0.6, n=8, seed=0, unused=0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, latent, generator=g, dtype=torch.float64)
        w[:, latent - unused :] = 0
        b = torch.randn(dim, generator=g, dtype=torch.float64)
        decoder = nn.Linear(latent, dim).double().requires_grad_(False)
        with torch.no_grad():
            decoder.weight.copy_(w)
            decoder.bias.copy_(b)
        likelihood = FixedGaussianLikelihood(torch.Size([dim]), sigma)
        self.model = VAEModel(decoder, likelihood, latent, [dim]).double().train(False)
        self.w, self.b, self.sigma, self.latent = w, b, sigma, latent
        self.precision = torch.eye(latent, dtype=torch.float64) + w.T @ w / sigma**2
        self.gain = torch.linalg.solve(self.precision, w.T) / sigma**2  # mean = gain (x - b)
        self.scale = self.precision.diagonal().rsqrt()  # the mean-field optimum's scales
        cov = w @ w.T + sigma**2 * torch.eye(dim, dtype=torch.float64)
        self.marginal = dist.MultivariateNormal(b, covariance_matrix=cov)
        noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.x = b + noise @ torch.linalg.cholesky(cov).T
        self.log_px = self.marginal.log_prob(self.x)
        self.guide = GaussianGuide(Flatten(dim), latent).double()
        self.set_guide(self.gain, self.scale)

    def set_guide(self, gain, scale):
        """The guide's mean gain @ (x - b), its scales ``scale`` for every x."""
        head, d = self.guide.head, self.latent
        with torch.no_grad():
            head.weight.zero_()
            head.weight[:d] = gain
            head.bias[:d] = -gain @ self.b
            head.bias[d:] = torch.log(torch.expm1(scale - 1e-6))  # softplus^-1

    def gap(self) -> float:
        """log p(x) - ELBO of the best mean-field Gaussian: (sum log Lambda_ii - log det)/2."""
        lam = self.precision
        return 0.5 * (lam.diagonal().log().sum() - torch.logdet(lam)).item()

    def elbo(self, mean, scale):
        """The ELBO of q = N(mean, diag scale^2) per point (mean (N, d), scale (d,))."""
        dim, s2 = self.w.shape[0], self.sigma**2
        residual = self.x - mean @ self.w.T - self.b
        fit = residual.square().sum(-1) + (scale.square() * self.w.square().sum(0)).sum()
        log_lik = -0.5 * dim * math.log(2 * math.pi * s2) - fit / (2 * s2)
        log_prior = -0.5 * self.latent * math.log(2 * math.pi)
        log_prior = log_prior - 0.5 * (mean.square().sum(-1) + scale.square().sum())
        entropy = scale.log().sum() + 0.5 * self.latent * (1 + math.log(2 * math.pi))
        return log_lik + log_prior + entropy

    def guide_elbo(self, gain, scale):
        return self.elbo((self.x - self.b) @ gain.T, scale)


# -- a 2-D latent with a non-linear decoder, log p(x) by quadrature -------------------------------

SIGMA_X = 0.4


def decode(z):
    z1, z2 = z[..., 0], z[..., 1]
    return torch.stack([torch.tanh(z1 + 0.5 * z2**2), torch.sin(z2), 0.5 * z1 * z2], -1)


def nonlinear_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(decode(z), SIGMA_X).to_event(1), obs=x)


def quadrature(x, half_width=7.0, n=1401, decoder=decode, sigma=SIGMA_X):
    """log p(x) = log sum over a grid of p(z) p(x|z) dA, and the posterior moments, for
    z ~ N(0, I_2), x | z ~ N(decoder(z), sigma^2 I)."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    log_joint = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(decoder(z)[:, None], sigma).log_prob(x).sum(-1).T
    )
    log_da = 2 * math.log(t[1] - t[0])
    log_px = torch.logsumexp(log_joint, 1) + log_da
    post = torch.softmax(log_joint, 1)
    mean = post @ z
    centred = z[None] - mean[:, None]
    cov = torch.einsum("nk,nki,nkj->nij", post, centred, centred)
    return log_px, mean, cov


# -- mixtures: offset anisotropic clusters with shared initial parameters --------------------------


def blobs(n=600, d=3, k=4, seed=0):
    """Four anisotropic, offset clusters (float64), with shared initial parameters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    x += 5 * rng.normal(size=(k, d))[rng.integers(k, size=n)] + 10
    weights = np.full(k, 1 / k)
    means = x[rng.choice(n, k, replace=False)]
    a = rng.normal(size=(k, d, d))
    precisions = {
        "full": np.eye(d) + 0.1 * a @ a.transpose(0, 2, 1),
        "tied": np.eye(d) + 0.1 * a[0] @ a[0].T,
        "diag": 0.5 + rng.random((k, d)),
        "spherical": 0.5 + rng.random(k),
    }
    return x, weights, means, precisions


def record_sources(monkeypatch) -> list:
    """The ChunkedStatistics each later mixture fit makes (the sources of its passes), in order."""
    from ppl_vae.mixture import chunks

    made = []

    class Recorded(chunks.ChunkedStatistics):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr("ppl_vae.mixture.base.ChunkedStatistics", Recorded)
    return made


def sklearn_agreement(offset=0.0, seeds=range(10), iterations=25):
    """How far our float64 GaussianMixture and scikit-learn's are from each other and from a
    reference, over ``blobs(seed=s)`` shifted by ``offset``, all four covariance types,
    ``iterations`` EM steps with ``tol=0`` from blobs' shared start.

    The reference is scikit-learn on the data centred on their mean (and the start shifted
    alike), with its means shifted back: EM commutes exactly with a translation, and centred
    data keep the rounding of ordinary data, so it is what an exact computation gives, to about
    the agreement on ordinary data. Returns ``{(pair, quantity): largest value}`` for the pairs
    "ours-sklearn", "ours-reference", "sklearn-reference" and the quantities "score" (relative
    difference of the mean log-likelihood of the training data), "parameters" (largest
    entrywise relative difference of weights_, means_, covariances_, precisions_) and
    "history" (largest difference of the per-iteration lower bounds, nats).
    """
    import warnings

    from sklearn.mixture import GaussianMixture as SklearnMixture

    from ppl_vae.mixture import GaussianMixture

    names = ("weights_", "means_", "covariances_", "precisions_")

    def sklearn_fit(x, w, m, p, covariance_type):
        return SklearnMixture(
            4, covariance_type=covariance_type, tol=0, max_iter=iterations,
            weights_init=w, means_init=m, precisions_init=p,
        ).fit(x)  # fmt: skip

    def summary(fit, x, shift=0.0):
        if isinstance(fit, GaussianMixture):
            params = {n: getattr(fit, n).numpy() for n in names}
            return params, fit.score(torch.from_numpy(x)), np.array(fit.history_)
        params = {n: np.asarray(getattr(fit, n)) for n in names}
        params["means_"] = params["means_"] + shift
        return params, fit.score(x - shift), np.array(fit.lower_bounds_)

    from threadpoolctl import threadpool_limits

    worst, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: one thread each is fastest, and fair
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # tol=0 never converges: both warn
        for seed in seeds:
            x, w, m, precisions = blobs(seed=seed)
            x, m = x + offset, m + offset
            centre = x.mean(0)
            for covariance_type, p in precisions.items():
                t = torch.from_numpy
                ours = GaussianMixture(4, covariance_type, tol=0, max_iter=iterations)
                ours.fit(t(x), weights_init=t(w), means_init=t(m), precisions_init=t(p))
                fits = {
                    "ours": summary(ours, x),
                    "sklearn": summary(sklearn_fit(x, w, m, p, covariance_type), x),
                    "reference": summary(
                        sklearn_fit(x - centre, w, m - centre, p, covariance_type), x, centre
                    ),
                }
                for a, b in (("ours", "sklearn"), ("ours", "reference"), ("sklearn", "reference")):
                    (pa, sa, ha), (pb, sb, hb) = fits[a], fits[b]
                    found = {
                        "score": abs(sa - sb) / abs(sb),
                        "parameters": max(
                            float((np.abs(pa[n] - pb[n]) / np.abs(pb[n])).max()) for n in names
                        ),
                        "history": float(np.abs(ha - hb).max()),
                    }
                    for quantity, value in found.items():
                        key = (f"{a}-{b}", quantity)
                        worst[key] = max(worst.get(key, 0.0), value)
    torch.set_num_threads(threads)
    return worst


def strict_runs(data, vae, configs: dict, out: Path, device: str) -> dict:
    """``train_run`` of each named configuration into ``out/<name>`` on ``device``, with a
    RuntimeWarning an error: no step may fall back from its record or its CUDA graph."""
    from ppl_vae.runs import train_run

    runs = {}
    for name, config in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            runs[name] = train_run(data, vae, config, out / str(name), device)
    return runs


def assert_same_metrics(a, b, *, rel: float, keys=("train_elbo", "test_elbo")) -> None:
    """Two runs' per-epoch ``keys`` agree to ``rel`` (relative), epoch by epoch."""
    for x, y in zip(a.metrics, b.metrics, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=rel), (x["epoch"], key)
