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
on float64 and float32 tensors on ``--device`` (scikit-learn runs on the CPU whatever the
device; ours fits once untimed first, for the device's first-call costs). Everything on the
CPU runs on ``--threads`` threads (default one): ``torch.set_num_threads`` and
``threadpoolctl.threadpool_limits`` for NumPy/SciPy's BLAS.

Memory: each fit's peak memory above what the process held before it (the data and the start
already made). On the CPU, the peak resident memory, measured in a fresh process per contender
(Linux: the peak is reset through ``/proc/self/clear_refs`` just before the fit); on CUDA, ours
only, the allocator's ``torch.cuda.max_memory_allocated`` in this process (scikit-learn's peak
is the CPU section's).

Run: ``python benchmarks/em.py --write`` (``--write`` updates docs/BENCHMARKS.md); on a GPU,
``python benchmarks/em.py --device cuda --threads 16``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import warnings

import numpy as np
import torch
from common import (
    interleave,
    measured_apart,
    medians,
    parse_args,
    peak_memory_mib,
    reset_peak_memory,
    write_section,
)

from ppl_vae.mixture import ConvergenceWarning as OurConvergenceWarning
from ppl_vae.mixture import GaussianMixture

CPU = torch.device("cpu")
DTYPES = ("float64", "float32")


@functools.cache
def problem(n: int, d: int, k: int, seed: int = 0):
    """Data (n, d) from k random Gaussians, and the shared start: weights, means, precisions
    (made once per process; not to be modified)."""
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


def time_all(
    covariance: str, n: int, d: int, k: int, iters: int, repeats: int, device, threads: int
) -> dict:
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
        xt, wt, mt, pt = (torch.from_numpy(a).to(device, dtype) for a in (x, w, m, p))

        def fit(max_iter=iters):
            gm = GaussianMixture(k, covariance, tol=0, max_iter=max_iter)
            gm.fit(xt, weights_init=wt, means_init=mt, precisions_init=pt)
            return gm.score(xt)

        fit(1)  # untimed: first-call costs (on CUDA the context, kernels and libraries)
        return fit

    scores = {}

    def report(name, seconds, score):
        scores[name] = score
        print(f"  {covariance} {name}: {seconds:.2f} s", flush=True)

    with threadpool_limits(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: no fit converges
        warnings.simplefilter("ignore", OurConvergenceWarning)
        contenders = {
            "sklearn float64": sklearn(np.float64),
            "ours float64": ours(torch.float64),
            "sklearn float32": sklearn(np.float32),
            "ours float32": ours(torch.float32),
        }
        times = interleave(contenders, repeats, device, report=report)
    return {"median": medians(times), "times": times, "scores": scores}


def fit_peak(who: str, dtype: str, covariance: str, n: int, d: int, k: int, device) -> float:
    """MiB of peak memory a 2-iteration fit adds above the data and start it is handed: ours on
    ``device``, scikit-learn's on the CPU (BLAS on one thread)."""
    from threadpoolctl import threadpool_limits

    where = device if who == "ours" else CPU
    x, w, m, p = problem(n, d, k)
    x, w, m, p = (a.astype(dtype) for a in (x, w, m, p[covariance]))
    if who == "ours":
        x, w, m, p = (torch.from_numpy(a).to(where) for a in (x, w, m, p))
        gm = GaussianMixture(k, covariance, tol=0, max_iter=2)
        fit = lambda: gm.fit(x, weights_init=w, means_init=m, precisions_init=p)  # noqa: E731
    else:
        from sklearn.mixture import GaussianMixture as SklearnMixture

        gm = SklearnMixture(
            k, covariance_type=covariance, tol=0, max_iter=2,
            weights_init=w, means_init=m, precisions_init=p,
        )  # fmt: skip
        fit = lambda: gm.fit(x)  # noqa: E731
    before = reset_peak_memory(where)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit()
    return peak_memory_mib(where) - before


def peak_growth(who: str, dtype: str, covariance: str, n: int, d: int, k: int, device) -> float:
    """:func:`fit_peak`: on CUDA in this process (the allocator's peak resets), on the CPU in a
    fresh process (``em.py --peak ...``, a heap of its own)."""
    here = lambda: fit_peak(who, dtype, covariance, n, d, k, device)  # noqa: E731
    cmd = [__file__, "--peak", who, dtype, covariance, str(n), str(d), str(k)]
    return measured_apart(device, here, cmd)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--peak"]:
        who, dtype, covariance, *sizes = sys.argv[2:]
        torch.set_num_threads(1)
        print(f"{fit_peak(who, dtype, covariance, *map(int, sizes), CPU):.1f}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--covariances", default="full,diag")
    args, device = parse_args(parser, argv, repeats=3)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    import sklearn

    cpu = device.type == "cpu"
    whos = ("sklearn", "ours") if cpu else ("ours",)  # scikit-learn's peak: the CPU section's
    peak_columns = [(who, dtype) for dtype in DTYPES for who in whos]
    sizes = (args.points, args.dims, args.components)
    rows, peak_rows = [], []
    for covariance in args.covariances.split(","):
        r = time_all(covariance, *sizes, args.iterations, args.repeats, device, threads)
        t, s = r["median"], r["scores"]
        # each repeat runs the contenders back to back, so its ratio shares the host's state
        ours, theirs = r["times"]["ours float32"], r["times"]["sklearn float32"]
        paired = [a / b for a, b in zip(ours, theirs, strict=True)]
        peaks = [peak_growth(who, dtype, covariance, *sizes, device) for who, dtype in peak_columns]
        peak_rows.append(f"| {covariance} | " + " | ".join(f"{m:.0f}" for m in peaks) + " |")
        ref = s["sklearn float64"]
        rows.append(
            f"| {covariance} | {t['sklearn float64']:.2f} | {t['ours float64']:.2f} | "
            f"**{t['ours float64'] / t['sklearn float64']:.3f}** | {t['sklearn float32']:.2f} | "
            f"{t['ours float32']:.2f} | **{t['ours float32'] / t['sklearn float64']:.3f}** | "
            f"{t['ours float32'] / t['sklearn float32']:.3f} | "
            f"{statistics.median(paired):.3f} ({', '.join(f'{v:.3f}' for v in paired)}) | "
            f"{abs(s['ours float64'] - ref) / abs(ref):.1e} | "
            f"{abs(s['sklearn float32'] - ref) / abs(ref):.1e} | "
            f"{abs(s['ours float32'] - ref) / abs(ref):.1e} |"
        )
        print(rows[-1], peak_rows[-1], sep="\n", flush=True)
    body = "\n".join(
        [
            f"CPU: {platform.processor() or platform.machine()}"
            + ("" if cpu else f", ours on {torch.cuda.get_device_name(device)}")
            + f", torch {torch.__version__} (MKL), scikit-learn {sklearn.__version__} "
            f"(OpenBLAS), {threads} thread{'s' if threads > 1 else ''} each on the CPU "
            f"(`torch.set_num_threads({threads})`, `threadpoolctl.threadpool_limits({threads})`). "
            f"{args.points:,} points x {args.dims} dims, {args.components} components, "
            f"{args.iterations} EM iterations (`tol=0`) from the same initial weights, means "
            f"and precisions, handed to each contender in its own dtype (data and start); "
            f"seconds per whole `fit`, median of {args.repeats} interleaved repeats (each repeat "
            f"runs the four contenders back to back). The last "
            f"three columns: relative difference of the mean log-likelihood of the training "
            f"data (each model scored in its own dtype) from scikit-learn's float64 fit.",
            "",
            "| covariance | sklearn f64 s | ours f64 s | ours f64 / sklearn f64 | sklearn f32 s "
            "| ours f32 s | ours f32 / sklearn f64 | ours f32 / sklearn f32 | the same, median of "
            "the repeats' ratios (each repeat's) | score vs sklearn f64: ours f64 | sklearn f32 "
            "| ours f32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Peak memory a fit adds above the data and start it was handed (MiB; 2 iterations"
            + (
                ", one fresh process each):"
                if cpu
                else "; max_memory_allocated on the GPU, scikit-learn's in the CPU section):"
            ),
            "",
            "| covariance | " + " | ".join(f"{w} f{d[-2:]}" for w, d in peak_columns) + " |",
            "|---" * (1 + len(peak_columns)) + "|",
            *peak_rows,
        ]
    )
    print(body)
    if args.write:
        write_section(f"em ({device.type})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
