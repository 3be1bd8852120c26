"""ppl_vae's losses against Pyro's on a zoo of model/guide pairs: values, gradients, errors.

Every pair runs through ``TraceELBO`` / ``Trace_ELBO``, ``TraceMeanFieldELBO`` /
``TraceMeanField_ELBO`` and ``IWAELoss`` / ``RenyiELBO(alpha=0)`` from the same seed and an
empty parameter store, in float64. Where ppl_vae differs on purpose, the test says so and checks
ppl_vae's documented value instead:

- ``IWAELoss`` under one shared scale s != 1 (subsampling) applies s after the log-sum-exp
  (the bound of the full data set); Pyro scales the log-weights before it. Checked:
  ours == s * Pyro's on the same model with that scale divided out.
- ``IWAELoss`` refuses guide sites without reparameterized draws (Pyro's ``RenyiELBO(alpha=0)``
  silently drops their score-function term).
- ``TraceMeanFieldELBO`` raises ``InputError`` for a model latent the guide lacks, where Pyro's
  raises a ``KeyError``.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from ppl_vae.errors import InputError
from ppl_vae.losses import IWAELoss, TraceELBO, TraceMeanFieldELBO

F64 = torch.float64
N = 5
X = torch.linspace(-1.0, 2.0, N, dtype=F64)
X2 = torch.stack([X, 0.5 * X - 1], -1)  # (N, 2)
CASES = {}


def case(name, nesting=1, meanfield=True, iwae="same", scale=1.0):
    """Registers a builder returning (model, guide, args).

    ``iwae``: "same" (equal to Renyi), "rescaled" (ours = scale * Renyi of the model with the
    scale divided out), "refused" (ours raises). ``meanfield``: whether Pyro's mean-field ELBO
    accepts the pair (if not, both must raise).
    """

    def add(build):
        CASES[name] = dict(build=build, nesting=nesting, meanfield=meanfield, iwae=iwae, s=scale)
        return build

    return add


def p(name, value, **kw):
    return pyro.param(name, torch.as_tensor(value, dtype=F64), **kw)


def positive(name, value):
    return p(name, value, constraint=dist.constraints.positive)


# -- the zoo -------------------------------------------------------------------------------------


@case("local latent, plate at dim -1")
def local():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.7), obs=x)

    def guide(x):
        loc, sd = p("loc", 0.3 * torch.ones(N)), positive("sd", 0.8 * torch.ones(N))
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(loc + 0.5 * x, sd))

    return model, guide, (X,)


@case("local latent, plate at dim -2", nesting=2)
def local_dim2():
    def model(x):
        with pyro.plate("data", N, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, 1, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.7), obs=x)

    def guide(x):
        loc = p("loc", torch.zeros(N, 1))
        with pyro.plate("data", N, dim=-2):
            pyro.sample("z", dist.Normal(loc + 0.5 * x, 0.6))

    return model, guide, (X[:, None],)


@case("vector latent, to_event")
def vector_latent():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, 2, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        w = p("w", 0.4 * torch.ones(2))
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(w * x, positive("sd", torch.ones(2))).to_event(1))

    return model, guide, (X2,)


@case("global latent only", iwae="same")
def global_only():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("data", N):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(p("m", 0.1), positive("s", 0.5)))

    return model, guide, (X,)


@case("global and local latents")
def global_and_local():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(mu * torch.ones(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(p("m", 0.1), positive("s", 0.5)))
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.5) * x, 0.4))

    return model, guide, (X,)


@case("nested plates (data at -2, features at -1)", nesting=2)
def nested():
    def model(x):
        with pyro.plate("data", N, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, 1, dtype=F64), 1.0))
            with pyro.plate("features", 2, dim=-1):
                pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N, dim=-2):
            pyro.sample("z", dist.Normal(p("a", 0.3) * x.mean(-1, keepdim=True), 0.5))

    return model, guide, (X2,)


@case("sequential plate of latents")
def sequential():
    def model(x):
        for i in pyro.plate("steps", 3):
            z = pyro.sample(f"z{i}", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
            with pyro.plate(f"data{i}", N):
                pyro.sample(f"x{i}", dist.Normal(z, 1.0), obs=x + i)

    def guide(x):
        for i in pyro.plate("steps", 3):
            pyro.sample(f"z{i}", dist.Normal(p(f"m{i}", 0.1 * i), 0.5))

    return model, guide, (X,)


@case("subsampled data plate", iwae="rescaled", scale=10 / 4)
def subsampled():
    data = torch.linspace(-2, 2, 10, dtype=F64)

    def model(x):
        with pyro.plate("data", 10, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(4, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.6), obs=x[idx])

    def guide(x):
        with pyro.plate("data", 10, subsample_size=4) as idx:
            pyro.sample("z", dist.Normal(p("a", 0.4) * x[idx], positive("s", 0.7)))

    return model, guide, (data,)


@case("subsampled plate under a global latent")
def subsampled_global():
    data = torch.linspace(-2, 2, 10, dtype=F64)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", 10, subsample_size=4) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    def guide(x):
        pyro.sample("mu", dist.Normal(p("m", 0.2), positive("s", 0.3)))

    return model, guide, (data,)


@case("poutine.mask on the observation")
def masked_obs():
    mask = torch.tensor([True, False, True, True, False])

    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            with poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("poutine.mask on the latent in model and guide")
def masked_latent():
    mask = torch.tensor([True, True, False, True, False])

    def model(x):
        with pyro.plate("data", N):
            with poutine.mask(mask=mask):
                z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N), poutine.mask(mask=mask):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("a latent masked off entirely")
def masked_off():
    def model(x):
        with pyro.plate("data", N):
            with poutine.mask(mask=False):
                z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N), poutine.mask(mask=False):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("dist.mask on the observation")
def dist_mask():
    mask = torch.tensor([False, True, True, False, True])

    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5).mask(mask), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("obs_mask, the missing values drawn by the guide")
def obs_mask_guided():
    mask = torch.tensor([True, False, True, True, False])

    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x, obs_mask=mask)

    def guide(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))
            with poutine.mask(mask=~mask):
                pyro.sample("x_unobserved", dist.Normal(z, positive("u", 0.5)))

    return model, guide, (X,)


S = torch.tensor(0.5, dtype=F64)  # one tensor object, shared by every site


@case("tensor scale (0-dim)")  # a tensor scale is applied before the log-sum-exp, as in Pyro
def tensor_scale():
    s = S

    def model(x):
        with pyro.plate("data", N), poutine.scale(scale=s):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N), poutine.scale(scale=s):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("per-point scale of shape (N,)")
def shaped_scale():
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=F64)

    def model(x):
        with pyro.plate("data", N), poutine.scale(scale=w):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N), poutine.scale(scale=w):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("scales that differ between sites (a KL weight)")
def kl_weighted():
    def model(x):
        with pyro.plate("data", N):
            with poutine.scale(scale=0.3):
                z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N), poutine.scale(scale=0.3):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("pyro.factor per point")
def factor():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.factor("penalty", -0.1 * z**2)
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.6) * x, 0.5))

    return model, guide, (X,)


@case("two dependent local latents")
def chain():
    def model(x):
        with pyro.plate("data", N):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            z2 = pyro.sample("z2", dist.Normal(0.5 * z1, 0.8))
            pyro.sample("x", dist.Normal(z1 + z2, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            z1 = pyro.sample("z1", dist.Normal(p("a", 0.3) * x, 0.6))
            pyro.sample("z2", dist.Normal(p("b", 0.2) * x + 0.1 * z1, 0.6))

    return model, guide, (X,)


@case("Gamma and Dirichlet latents (reparameterized)")
def gamma_dirichlet():
    counts = torch.tensor([[2.0, 0.0, 1.0]] * N, dtype=F64)

    def model(x):
        with pyro.plate("data", N):
            rate = pyro.sample("rate", dist.Gamma(torch.full((N,), 2.0, dtype=F64), 1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x.abs().round())
            probs = pyro.sample("probs", dist.Dirichlet(torch.ones(N, 3, dtype=F64)))
            pyro.sample("c", dist.Multinomial(3, probs), obs=counts)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("rate", dist.Gamma(positive("k", 2.0 * torch.ones(N)), 1.5))
            pyro.sample("probs", dist.Dirichlet(positive("conc", torch.ones(N, 3))))

    return model, guide, (X,)


@case("multivariate normal guide")
def mvn():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, 2, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        tril = p("tril", torch.eye(2), constraint=dist.constraints.lower_cholesky)
        with pyro.plate("data", N):
            pyro.sample("z", dist.MultivariateNormal(0.5 * x, scale_tril=tril))

    return model, guide, (X2,)


@case("transformed-distribution guide")
def transformed():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.LogNormal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        base = dist.Normal(p("m", torch.zeros(N)), 0.5)
        t = dist.transforms.ExpTransform()
        with pyro.plate("data", N):
            pyro.sample("z", dist.TransformedDistribution(base, [t]))

    return model, guide, (X,)


def with_guide_only_site(auxiliary: bool):
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            u = pyro.sample(
                "u", dist.Normal(torch.zeros(N, dtype=F64), 1.0), infer={"is_auxiliary": auxiliary}
            )
            pyro.sample("z", dist.Normal(p("a", 0.5) * x + 0.1 * u, 0.5))

    return model, guide, (X,)


case("an auxiliary guide site")(lambda: with_guide_only_site(True))
case("a guide-only site not marked auxiliary", meanfield=False)(lambda: with_guide_only_site(False))


@case("a model latent the guide lacks", meanfield=False)
def missing_latent():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            w = pyro.sample("w", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z + p("c", 0.2) * w, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.5) * x, 0.5))

    return model, guide, (X,)


@case("a discrete latent (score function)", meanfield=False, iwae="refused")
def discrete():
    def model(x):
        with pyro.plate("data", N):
            c = pyro.sample("c", dist.Bernoulli(torch.full((N,), 0.5, dtype=F64)))
            pyro.sample("x", dist.Normal(p("loc", 1.0) * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("c", dist.Bernoulli(logits=p("logit", 0.2) * x))

    return model, guide, (X,)


@case("a discrete global and a continuous local latent", meanfield=False, iwae="refused")
def discrete_global():
    def model(x):
        k = pyro.sample("k", dist.Categorical(torch.ones(3, dtype=F64) / 3))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(k.to(F64) * torch.ones(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        pyro.sample("k", dist.Categorical(logits=p("logits", torch.zeros(3))))
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(p("a", 0.5) * x, 0.5))

    return model, guide, (X,)


@case("a Delta guide site")
def delta():
    def model(x):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Delta(p("point", 0.5) * x))

    return model, guide, (X,)


def hierarchical(x):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
    sd = pyro.sample("sd", dist.LogNormal(torch.tensor(0.0, dtype=F64), 0.5))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu * torch.ones(N, dtype=F64), sd))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


for _auto, _mf in [(AutoNormal, True), (AutoDiagonalNormal, True), (AutoMultivariateNormal, True),
                   (AutoDelta, True)]:  # fmt: skip

    def _build(auto=_auto):
        return hierarchical, auto(hierarchical), (X,)

    case(f"{_auto.__name__} on a hierarchical model", meanfield=_mf)(_build)


@case("AutoNormal with a subsampled plate")
def auto_subsampled():
    data = torch.linspace(-2, 2, 10, dtype=F64)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("data", 10, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(mu * torch.ones(4, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x[idx])

    return model, AutoNormal(model), (data,)


# -- running them --------------------------------------------------------------------------------


def run(loss, build, pyros: bool, seed=0, wrap=None):
    """(value, {param: grad}, warnings) or ("raised", exception) from an empty param store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide, args = build()
    if wrap is not None:
        model, guide = wrap(model), wrap(guide)
    with warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(True):
        warnings.simplefilter("always")
        try:
            if pyros:
                value = loss.loss_and_grads(model, guide, *args)
                store = pyro.get_param_store()
                grads = {n: store[n].unconstrained().grad for n in store}
            else:
                value = loss.differentiable_loss(model, guide, *args)
                store = pyro.get_param_store()
                names = list(store.keys())
                params = [store[n].unconstrained() for n in names]
                g = (
                    torch.autograd.grad(value, params, allow_unused=True)
                    if value.requires_grad
                    else [None] * len(params)
                )
                grads, value = dict(zip(names, g, strict=True)), value.item()
        except Exception as e:  # noqa: BLE001 - compared with the other side
            return ("raised", e)
    messages = sorted({str(w.message).split("\n")[0] for w in caught})
    return value, grads, messages


def same(ours, theirs, factor=1.0):
    if ours[0] == "raised" and theirs[0] == "raised":  # the same error on both sides
        assert type(ours[1]) is type(theirs[1]), (ours[1], theirs[1])
        return
    assert ours[0] != "raised", f"ours raised {ours[1]!r} where Pyro gave {theirs[0]}"
    assert theirs[0] != "raised", f"Pyro raised {theirs[1]!r} where ours gave {ours[0]}"
    (a, ga, wa), (b, gb, wb) = ours, theirs
    assert a == pytest.approx(factor * b, rel=1e-9, abs=1e-9)
    assert ga.keys() == gb.keys()
    for name in ga:
        u, v = ga[name], gb[name]
        u = torch.zeros(()) if u is None else u
        v = torch.zeros(()) if v is None else v * factor
        assert torch.allclose(u.to(F64), torch.as_tensor(v).to(F64), rtol=1e-8, atol=1e-10), name
    assert wa == wb


PARTICLES = [
    pytest.param({}, id="1 particle"),
    pytest.param({"num_particles": 3}, id="3 sequential"),
    pytest.param({"num_particles": 3, "vectorize_particles": True}, id="3 vectorized"),
]


@pytest.mark.parametrize("kwargs", PARTICLES)
@pytest.mark.parametrize("name", list(CASES))
def test_trace_elbo_is_pyros(name, kwargs):
    c = CASES[name]
    options = dict(max_plate_nesting=c["nesting"], **kwargs)
    same(run(TraceELBO(**options), c["build"], False), run(Trace_ELBO(**options), c["build"], True))


@pytest.mark.parametrize("kwargs", PARTICLES)
@pytest.mark.parametrize("name", list(CASES))
def test_trace_mean_field_elbo_is_pyros(name, kwargs):
    c = CASES[name]
    options = dict(max_plate_nesting=c["nesting"], **kwargs)
    ours = run(TraceMeanFieldELBO(**options), c["build"], False)
    theirs = run(TraceMeanField_ELBO(**options), c["build"], True)
    if c["meanfield"]:
        same(ours, theirs)
    else:  # Pyro's raises (KeyError, NotImplementedError for score terms); ours too
        assert theirs[0] == "raised" and ours[0] == "raised", (ours, theirs)
        if isinstance(theirs[1], KeyError):
            assert isinstance(ours[1], InputError) and "is not in the guide" in str(ours[1])


@pytest.mark.parametrize("name", list(CASES))
def test_iwae_is_pyros_renyi_alpha_0_or_documented(name):
    c = CASES[name]
    k, nesting = 4, c["nesting"]
    ours = run(IWAELoss(num_particles=k, max_plate_nesting=nesting), c["build"], False)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=nesting)
    if c["iwae"] == "refused":
        assert ours[0] == "raised" and isinstance(ours[1], InputError)
        assert "needs reparameterized guide sites" in str(ours[1])
        return
    if c["iwae"] == "same":
        same(ours, run(renyi, c["build"], True))
        return
    # one shared scale s: ours applies it after the log-sum-exp, so it equals s times Pyro's
    # bound of the model whose log-densities carry no scale
    s = c["s"]
    unscaled = run(renyi, c["build"], True, wrap=poutine.scale(scale=1 / s))
    same(ours, unscaled, factor=float(s))
    assert ours[0] != pytest.approx(run(renyi, c["build"], True)[0], rel=1e-3)  # they do differ


def test_the_zoo_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["iwae"] != "refused"])
def test_iwae_with_one_particle_is_the_elbo_whatever_the_plates_and_scales(name):
    c, n = CASES[name], CASES[name]["nesting"]
    one = run(IWAELoss(num_particles=1, max_plate_nesting=n), c["build"], False, seed=4)
    elbo = run(TraceELBO(max_plate_nesting=n), c["build"], False, seed=4)
    assert one[0] == pytest.approx(elbo[0], rel=1e-9)


def _deviations():
    """The largest relative deviations from Pyro over the zoo (``python tests/<this file>``)."""
    worst = {}
    for c in CASES.values():
        n = c["nesting"]
        pairs = {"TraceELBO": (TraceELBO, Trace_ELBO), "TraceMeanFieldELBO": (TraceMeanFieldELBO,
                 TraceMeanField_ELBO)}  # fmt: skip
        runs = []
        for label, (ours, theirs) in pairs.items():
            if label == "TraceMeanFieldELBO" and not c["meanfield"]:
                continue
            for kw in ({}, {"num_particles": 3}, {"num_particles": 3, "vectorize_particles": True}):
                o = dict(max_plate_nesting=n, **kw)
                runs.append(
                    (label, run(ours(**o), c["build"], False), run(theirs(**o), c["build"], True))
                )
        if c["iwae"] == "same":
            renyi = RenyiELBO(
                alpha=0, num_particles=4, vectorize_particles=True, max_plate_nesting=n
            )
            runs.append(
                ("IWAELoss", run(IWAELoss(4, n), c["build"], False), run(renyi, c["build"], True))
            )
        for label, (a, ga, _), (b, gb, _) in runs:
            dv = abs(a - b) / max(abs(b), 1e-300)
            dg = max(
                [((u - v).abs().max() / v.abs().max().clamp_min(1e-300)).item()
                 for u, v in ((ga[k], gb[k]) for k in ga) if u is not None and v is not None],
                default=0.0,
            )  # fmt: skip
            w = worst.setdefault(label, [0.0, 0.0, 0])
            w[0], w[1], w[2] = max(w[0], dv), max(w[1], dg), w[2] + 1
    for label, (dv, dg, count) in worst.items():
        print(f"{label}: {count} runs, value rel. diff <= {dv:.1e}, gradient rel. diff <= {dg:.1e}")


if __name__ == "__main__":
    _deviations()
