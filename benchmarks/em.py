r"""Times EM of :class:`ppl_vae.mixture.GaussianMixture` against scikit-learn's, in one run.

The problem of the scikit-learn comparison in the issue: 100,000 points in 32 dimensions drawn from
16 Gaussians with random covariances, a 16-component mixture with ``full`` and with ``diag``
covariances, 100 EM iterations (``tol=0``) from the same initial weights, means and precisions
(uniform weights, 16 random data points, the inverse covariance of the whole data set), so both
do exactly the same arithmetic. Every contender gets the data *and* the starting parameters in
its own dtype: a float32 contender is handed float32 weights, means and precisions (scikit-learn
keeps float64 initial parameters in float64, so float32 data with a float64 start would run
partly in float64 and flatter float32). Each repeat runs every contender in turn (interleaved); the
figure is the median over repeats of the whole ``fit`` (ours includes building the sufficient
statistics). Contenders: scikit-learn on float64 data (its reference dtype) and on float32, ours
on float64 and float32 tensors. Everything runs on one thread: ``torch.set_num_threads(1)`` and
``threadpoolctl.threadpool_limits(1)`` for NumPy/SciPy's BLAS.

Memory: each fit's peak resident memory above what the process held before it (the data and the
start already made), measured in a fresh process per contender (Linux: the peak is reset through
``/proc/self/clear_refs`` just before the fit).

Run: ``python benchmarks/em.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import warnings

import numpy as np
import torch
from common import (
    interleave,
    medians,
    parse_args,
    peak_rss_mib,
    reset_peak_rss,
    write_section,
)

from ppl_vae.mixture import ConvergenceWarning as OurConvergenceWarning
from ppl_vae.mixture import GaussianMixture


def problem(n: int, d: int, k: int, seed: int = 0):
    """Data (n, d) from k random Gaussians, and the shared start: weights, means, precisions."""
    rng = np.random.default_rng(seed)
    centres = 4 * rng.normal(size=(k, d))
    factors = rng.normal(size=(k, d, d)) / np.sqrt(d)
    z = rng.integers(k, size=n)
    x = centres[z] + np.einsum("nij,nj->ni", factors[z], rng.normal(size=(n, d)))
    weights = np.full(k, 1 / k)
    means = x[rng.choice(n, k, replace=False)]
    precision = np.linalg.inv(np.cov(x.T))
    precisions = {
        "full": np.repeat(precision[None], k, 0),
        "diag": np.repeat((1 / x.var(0))[None], k, 0),
    }
    return x, weights, means, precisions


def time_all(covariance: str, n: int, d: int, k: int, iters: int, repeats: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SklearnMixture
    from threadpoolctl import threadpool_limits

    x, w, m, p = problem(n, d, k)
    p = p[covariance]

    def sklearn(dtype):
        xs, ws, ms, ps = (a.astype(dtype) for a in (x, w, m, p))  # data and start alike

        def fit():
            gm = SklearnMixture(
                k, covariance_type=covariance, tol=0, max_iter=iters,
                weights_init=ws, means_init=ms, precisions_init=ps,
            )  # fmt: skip
            gm.fit(xs)
            return gm.score(xs)

        return fit

    def ours(dtype):
        xt, wt, mt, pt = (torch.from_numpy(a).to(dtype) for a in (x, w, m, p))

        def fit():
            gm = GaussianMixture(k, covariance, tol=0, max_iter=iters)
            gm.fit(xt, weights_init=wt, means_init=mt, precisions_init=pt)
            return gm.score(xt)

        return fit

    contenders = {
        "sklearn float64": sklearn(np.float64),
        "ours float64": ours(torch.float64),
        "sklearn float32": sklearn(np.float32),
        "ours float32": ours(torch.float32),
    }
    scores = {}

    def report(name, seconds, score):
        scores[name] = score
        print(f"  {covariance} {name}: {seconds:.2f} s", flush=True)

    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: no fit converges
        warnings.simplefilter("ignore", OurConvergenceWarning)
        times = interleave(contenders, repeats, torch.device("cpu"), report=report)
    return {"median": medians(times), "scores": scores}


def peak_growth(who: str, dtype: str, covariance: str, n: int, d: int, k: int) -> float:
    """MiB of peak memory a 2-iteration fit adds, in a fresh process (``em.py --peak ...``)."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", who, dtype, covariance, str(n), str(d), str(k)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.split()[-1])


def _peak_child(who: str, dtype: str, covariance: str, n: str, d: str, k: str) -> None:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    x, w, m, p = problem(int(n), int(d), int(k))
    x, w, m, p = (a.astype(dtype) for a in (x, w, m, p[covariance]))
    if who == "ours":
        x, w, m, p = (torch.from_numpy(a) for a in (x, w, m, p))
        gm = GaussianMixture(int(k), covariance, tol=0, max_iter=2)
        fit = lambda: gm.fit(x, weights_init=w, means_init=m, precisions_init=p)  # noqa: E731
    else:
        from sklearn.mixture import GaussianMixture as SklearnMixture

        gm = SklearnMixture(
            int(k), covariance_type=covariance, tol=0, max_iter=2,
            weights_init=w, means_init=m, precisions_init=p,
        )  # fmt: skip
        fit = lambda: gm.fit(x)  # noqa: E731
    before = reset_peak_rss()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit()
    print(f"{peak_rss_mib() - before:.1f}")


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--peak"]:
        _peak_child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--covariances", default="full,diag")
    args, _ = parse_args(parser, argv, repeats=3, device=False)
    torch.set_num_threads(1)
    import sklearn

    rows, peak_rows = [], []
    for covariance in args.covariances.split(","):
        r = time_all(
            covariance, args.points, args.dims, args.components, args.iterations, args.repeats
        )
        t, s = r["median"], r["scores"]
        peaks = [
            peak_growth(who, dtype, covariance, args.points, args.dims, args.components)
            for dtype in ("float64", "float32")
            for who in ("sklearn", "ours")
        ]
        peak_rows.append(f"| {covariance} | " + " | ".join(f"{m:.0f}" for m in peaks) + " |")
        print(peak_rows[-1], flush=True)
        ref = s["sklearn float64"]
        rows.append(
            f"| {covariance} | {t['sklearn float64']:.2f} | {t['ours float64']:.2f} | "
            f"**{t['ours float64'] / t['sklearn float64']:.3f}** | {t['sklearn float32']:.2f} | "
            f"{t['ours float32']:.2f} | **{t['ours float32'] / t['sklearn float64']:.3f}** | "
            f"{t['ours float32'] / t['sklearn float32']:.3f} | "
            f"{abs(s['ours float64'] - ref) / abs(ref):.1e} | "
            f"{abs(s['sklearn float32'] - ref) / abs(ref):.1e} | "
            f"{abs(s['ours float32'] - ref) / abs(ref):.1e} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__} "
            f"(MKL), scikit-learn {sklearn.__version__} (OpenBLAS), one thread each "
            f"(`torch.set_num_threads(1)`, `threadpoolctl.threadpool_limits(1)`). "
            f"{args.points:,} points x {args.dims} dims, {args.components} components, "
            f"{args.iterations} EM iterations (`tol=0`) from the same initial weights, means "
            f"and precisions, handed to each contender in its own dtype (data and start); "
            f"seconds per whole `fit`, median of {args.repeats} interleaved repeats. The last "
            f"three columns: relative difference of the mean log-likelihood of the training "
            f"data (each model scored in its own dtype) from scikit-learn's float64 fit.",
            "",
            "| covariance | sklearn f64 s | ours f64 s | ours f64 / sklearn f64 | sklearn f32 s "
            "| ours f32 s | ours f32 / sklearn f64 | ours f32 / sklearn f32 | score vs sklearn "
            "f64: ours f64 | sklearn f32 | ours f32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Peak memory a fit adds above the data and start it was handed (MiB; 2 iterations, "
            "one fresh process each):",
            "",
            "| covariance | sklearn f64 | ours f64 | sklearn f32 | ours f32 |",
            "|---|---|---|---|---|",
            *peak_rows,
        ]
    )
    if args.write:
        write_section("em (cpu)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
