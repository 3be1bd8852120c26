r"""EM and SVI fit the same Gaussian mixture: the log-likelihood against the bound each one climbs.

The data are ``ring8`` (eight Gaussians on a circle), the model a K = 8 full-covariance mixture

    p(x | theta) = sum_k w_k N(x | mu_k, Sigma_k),
    i.e.  z_n ~ Categorical(w),  x_n | z_n ~ N(mu_{z_n}, Sigma_{z_n}),

and both methods start from the same parameters theta_0 (equal weights, means at eight random
data points, every covariance that of the whole data set). Everything is reported in nats per
point.

What "bound" means. For any distribution q(z) over the assignments of all points,

    log p(x | theta) = F(q, theta) + KL(q(z) || p(z | x, theta)),
    F(q, theta) = E_q[log p(x, z | theta)] + H[q]   (the ELBO),

so F(q, theta) <= log p(x | theta), with equality exactly when q is the posterior.

- EM (``ppl_vae.mixture.GaussianMixture``) is coordinate ascent on F. The E-step sets
  q_t = p(z | x, theta_t), the responsibilities, so F(q_t, theta_t) = log p(x | theta_t): the
  bound *touches* the log-likelihood after every E-step (to rounding, ~1e-15 here). The M-step
  maximises F(q_t, theta) in theta, giving theta_{t+1}; there F(q_t, theta_{t+1}) lies below
  log p(x | theta_{t+1}) by KL(q_t || p(z | x, theta_{t+1})), and the next E-step closes the gap.
  The plot shows that saw-tooth: the bound at theta_t (on the curve) and at theta_{t+1} (below).
- SVI (Pyro, ``TraceEnum_ELBO``) on a Pyro model whose assignment site ``z`` is enumerated in
  parallel (``config_enumerate``) and whose parameters are ``pyro.param`` point estimates: the
  guide has no latent sites at all. Enumeration sums z out exactly, so the "ELBO" Pyro computes
  *is* log p(x | theta) -- the implicit q(z) is the exact posterior at every step, and there is no
  gap to plot: SVI climbs the log-likelihood itself by Adam steps, with no bound in between. A
  bound that is an ELBO in the usual sense needs a q over z that SVI does not re-fit to the
  posterior. Two are shown:

  * fixed q: F(q_0, theta_t) with q_0 = p(z | x, theta_0), the responsibilities at the shared
    start (EM's first E-step). It touches at step 0 and falls away as theta moves, because
    nothing refreshes q; the gap is KL(q_0 || p(z | x, theta_t));
  * amortisation-free local q: a second SVI run whose guide has one free categorical
    q(z_n) = Categorical(softmax(phi_n)) per point, enumerated in the guide (so the ELBO is
    exact, not Monte Carlo), trained jointly with theta by Adam. Its bound F(q_phi, theta) stays
    strictly below log p(x | theta): gradient steps on phi approach the posterior but never set
    q to it, as an E-step does.

Run:
    python examples/em_vs_svi.py --quick          # < 1 minute on one CPU core
    python examples/em_vs_svi.py --out em_vs_svi.png
"""

from __future__ import annotations

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch.distributions import constraints

from ppl_vae.data import synthetic_2d
from ppl_vae.mixture import ConvergenceWarning, GaussianMixture

K = 8  # components, one per Gaussian of ring8


def elbo(q: torch.Tensor, joint: torch.Tensor) -> float:
    """F(q, theta) per point: E_q[log p(x, z)] + H[q] for (N, K) q and joint log p(x, z=k)."""
    return (q * joint - torch.xlogy(q, q)).sum(1).mean().item()


def joint_log_prob(x, weights, locs, scale_tril) -> torch.Tensor:
    """log w_k + log N(x_n | mu_k, Sigma_k), shape (N, K), from bare torch distributions."""
    comp = dist.MultivariateNormal(locs, scale_tril=scale_tril)
    return weights.log() + comp.log_prob(x.unsqueeze(1))


def run_em(x: torch.Tensor, gm: GaussianMixture, iterations: int) -> dict:
    """One EM iteration at a time (warm start), recording F before and after each M-step."""
    gm.max_iter, gm.warm_start = 1, True
    ll, bound_e, bound_m = [], [], []
    for _ in range(iterations):
        q, joint = gm.predict_proba(x), gm.joint_log_prob(x)  # E-step at theta_t
        ll.append(gm.score(x))
        bound_e.append(elbo(q, joint))  # F(q_t, theta_t)
        with warnings.catch_warnings():  # one iteration per fit is the point, not a failure
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)  # the same E-step, then the M-step: theta_{t+1}
        bound_m.append(elbo(q, gm.joint_log_prob(x)))  # F(q_t, theta_{t+1})
    ll.append(gm.score(x))
    return {"log_likelihood": ll, "bound_after_e": bound_e, "bound_after_m": bound_m}


def mixture_params(theta0: dict):
    weights = pyro.param("weights", theta0["weights"].clone(), constraint=constraints.simplex)
    locs = pyro.param("locs", theta0["locs"].clone())
    scale_tril = pyro.param(
        "scale_tril", theta0["scale_tril"].clone(), constraint=constraints.lower_cholesky
    )
    return weights, locs, scale_tril


def make_model(theta0: dict):
    """The mixture as a Pyro program; its parameters are point estimates (``pyro.param``)."""

    def model(x):
        weights, locs, scale_tril = mixture_params(theta0)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=x)

    return model


def run_svi(x, theta0, q0, steps: int, lr: float, local: bool) -> dict:
    """Adam on TraceEnum_ELBO; records log p(x | theta_t) and an ELBO at every step.

    ``local=False``: z enumerated in the model, an empty guide; the bound recorded is
    F(q0, theta_t) with q0 fixed. ``local=True``: z enumerated in a guide with free per-point
    logits phi (started at log q0); the bound recorded is the trained F(q_phi, theta_t).
    """
    pyro.clear_param_store()
    model = make_model(theta0)
    if local:

        def guide(x):
            logits = pyro.param("phi", q0.clamp_min(1e-30).log())
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    else:
        model = config_enumerate(model, "parallel")

        def guide(x):  # no latent sites: z is summed out in the model
            pass

    svi = SVI(model, guide, Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=1))
    ll, bound, loss_gap = [], [], 0.0
    for _ in range(steps + 1):
        store = pyro.get_param_store()
        with torch.no_grad():
            if not store:  # parameters are created by the first step
                params = theta0["weights"], theta0["locs"], theta0["scale_tril"]
            else:
                params = store["weights"], store["locs"], store["scale_tril"]
            joint = joint_log_prob(x, *params)
            ll.append(torch.logsumexp(joint, 1).mean().item())
            q = q0 if not local or not store else torch.softmax(store["phi"], 1)
            bound.append(elbo(q, joint))
        if len(ll) == steps + 1:
            break
        loss = svi.step(x) / len(x)  # -ELBO at theta_t, before the update
        target = -ll[-1] if not local else -bound[-1]
        loss_gap = max(loss_gap, abs(loss - target))
    return {"log_likelihood": ll, "bound": bound, "max_loss_mismatch": loss_gap}


def plot(em: dict, svi: dict, local: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    n = len(em["bound_after_e"])
    ax.plot(range(n + 1), em["log_likelihood"], "k-", lw=1.5, label="log p(x | θ_t)")
    saw_x, saw_y = [], []
    for t in range(n):
        saw_x += [t, t + 1]
        saw_y += [em["bound_after_e"][t], em["bound_after_m"][t]]
    ax.plot(
        saw_x, saw_y, "C1-", lw=1, label="bound F(q_t, θ): after E-step (touches), after M-step"
    )
    ax.plot(range(n), em["bound_after_e"], "o", ms=4, mfc="none", c="C1")
    ax.set_title("EM: q_t = responsibilities at θ_t")
    ax.set_xlabel("EM iteration t")
    ax.set_ylabel("nats per point")
    ax.set_ylim(em["log_likelihood"][0] - 0.1, max(em["log_likelihood"]) + 0.1)

    ax = axes[1]
    steps = range(len(svi["log_likelihood"]))
    ax.plot(steps, svi["log_likelihood"], "k-", lw=1.5, label="log p(x | θ_t), z enumerated")
    ax.plot(steps, svi["bound"], "C0-", lw=1, label="F(q_0, θ_t), q fixed at θ_0's posterior")
    ax.plot(steps, local["log_likelihood"], "k--", lw=1, label="log p(x | θ_t), local-q run")
    ax.plot(steps, local["bound"], "C2-", lw=1, label="F(q_φ, θ_t), local q trained by SVI")
    ax.set_title("SVI (Adam, TraceEnum_ELBO)")
    ax.set_xlabel("SVI step")
    low = min(svi["log_likelihood"][0], local["bound"][0]) - 0.1
    ax.set_ylim(low, max(max(svi["log_likelihood"]), max(em["log_likelihood"])) + 0.1)

    ax = axes[2]
    floor = 1e-17
    gap_e = [
        max(abs(a - b), floor)
        for a, b in zip(em["log_likelihood"], em["bound_after_e"], strict=False)
    ]
    gap_m = [
        max(a - b, floor)
        for a, b in zip(em["log_likelihood"][1:], em["bound_after_m"], strict=True)
    ]
    ax.semilogy(range(n), gap_e, "C1o", ms=3, label="EM after E-step: |log p − F|")
    ax.semilogy(range(1, n + 1), gap_m, "C1x", ms=4, label="EM after M-step: log p − F")
    gap_fixed = [
        max(a - b, floor) for a, b in zip(svi["log_likelihood"], svi["bound"], strict=True)
    ]
    gap_local = [
        max(a - b, floor) for a, b in zip(local["log_likelihood"], local["bound"], strict=True)
    ]
    ax.semilogy(steps, gap_fixed, "C0-", lw=1, label="SVI, fixed q_0")
    ax.semilogy(steps, gap_local, "C2-", lw=1, label="SVI, local q_φ")
    ax.set_title("gap log p(x | θ) − bound = KL(q ‖ posterior)")
    ax.set_xlabel("EM iteration / SVI step (log scale past 1)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_ylim(floor / 2, None)
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"ring8, K={K} full-covariance Gaussian mixture, same θ_0 for EM and SVI", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 points, 30 EM / 300 SVI")
    parser.add_argument("--points", type=int, default=4000, help="ring8 points")
    parser.add_argument("--em-iterations", type=int, default=60)
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate for SVI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="em_vs_svi.png", help="where the figure goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.em_iterations, args.svi_steps = 1000, 30, 300

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    x = synthetic_2d("ring8", args.points, torch.Generator().manual_seed(args.seed)).double()
    # theta_0, shared by EM and both SVI runs: equal weights, means at K random points, and
    # the covariance of the whole data set for every component
    g = torch.Generator().manual_seed(args.seed)
    means0 = x[torch.randperm(len(x), generator=g)[:K]]
    precision0 = torch.linalg.inv(torch.cov(x.T)).expand(K, 2, 2)
    weights0 = torch.full((K,), 1 / K, dtype=x.dtype)
    gm = GaussianMixture(K, "full", tol=0, max_iter=0).fit(
        x, weights_init=weights0, means_init=means0, precisions_init=precision0
    )
    theta0 = {
        "weights": gm.weights_.clone(),
        "locs": gm.means_.clone(),
        "scale_tril": torch.linalg.cholesky(gm.covariances_),
    }
    q0 = gm.predict_proba(x)
    em = run_em(x, gm, args.em_iterations)
    svi = run_svi(x, theta0, q0, args.svi_steps, args.lr, local=False)
    local = run_svi(x, theta0, q0, args.svi_steps, args.lr, local=True)
    plot(em, svi, local, args.out)

    touch = max(abs(a - b) for a, b in zip(em["log_likelihood"], em["bound_after_e"], strict=False))
    below = min(a - b for a, b in zip(em["log_likelihood"][1:], em["bound_after_m"], strict=True))
    print(
        f"EM, {args.em_iterations} iterations: log-likelihood {em['log_likelihood'][0]:.4f} -> "
        f"{em['log_likelihood'][-1]:.4f} nats per point"
    )
    print(
        f"EM: max |bound after E-step - log-likelihood| = {touch:.2e}; "
        f"min (log-likelihood - bound after M-step) = {below:.2e}"
    )
    print(
        f"SVI (z enumerated), {args.svi_steps} steps: log-likelihood "
        f"{svi['log_likelihood'][-1]:.4f}; fixed-q bound {svi['bound'][-1]:.4f}; "
        f"|Pyro loss + log-likelihood| <= {svi['max_loss_mismatch']:.1e}"
    )
    print(
        f"SVI (local q): log-likelihood {local['log_likelihood'][-1]:.4f}; bound "
        f"{local['bound'][-1]:.4f}; |Pyro loss + bound| <= {local['max_loss_mismatch']:.1e}"
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return {"em": em, "svi": svi, "svi_local": local, "max_touch_gap": touch}


if __name__ == "__main__":
    main()
