r"""The ``ppl-vae`` command line: builds configurations and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 200,200, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def _build_parser() -> argparse.ArgumentParser:
    from ppl_vae.data import BINARIZATIONS, DATASETS
    from ppl_vae.guides import GUIDES
    from ppl_vae.model import LIKELIHOODS
    from ppl_vae.networks import ACTIVATIONS, NETWORKS
    from ppl_vae.train import LOSSES

    parser = _Parser(
        prog="ppl-vae",
        description="Variational autoencoders written as Pyro programs, trained by SVI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    t = sub.add_parser(
        "train",
        help="train a VAE by SVI and write metrics, a checkpoint and pictures",
        description="Train a VAE (Pyro model p(z)p(x|z), amortized guide q(z|x)) by SVI. "
        "Writes metrics.jsonl (one line per epoch), checkpoint.pt, samples.png and "
        "reconstructions.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = t.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default="mnist",
        help=f"{', '.join(DATASETS)}, or a .pt/.npy file holding an (N, ...) tensor",
    )
    d.add_argument(
        "--binarize",
        default="dynamic",
        choices=BINARIZATIONS,
        help="MNIST encoding: fresh Bernoulli draws per batch, one fixed draw, or gray intensities",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder holding MNIST/raw (default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)",
    )
    m = t.add_argument_group("model and guide")
    m.add_argument("--latent-dim", type=int, default=50, help="dimension of z")
    m.add_argument(
        "--network",
        default="mlp",
        choices=NETWORKS,
        help="MLP, or the MNIST conv encoder/decoder pair",
    )
    m.add_argument(
        "--hidden",
        type=_int_list,
        default=(200, 200),
        help="MLP hidden widths, comma-separated (the decoder mirrors them)",
    )
    m.add_argument("--activation", default="tanh", help=f"one of {', '.join(ACTIVATIONS)}")
    m.add_argument(
        "--likelihood",
        default=None,
        help=f"p(x|z): one of {', '.join(LIKELIHOODS)}; default: bernoulli for "
        "binary data, gaussian (learned per-dimension sigma) otherwise",
    )
    m.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="fixed sigma for gaussian-fixed (default 0.1), initial sigma for gaussian (default 1)",
    )
    m.add_argument(
        "--guide",
        default="gaussian",
        help=f"q(z|x): one of {', '.join(GUIDES)} (zuko-* need the zuko package)",
    )
    m.add_argument(
        "--flow-length", type=int, default=4, help="steps of a flow guide (planar ... zuko-maf)"
    )
    m.add_argument(
        "--flow-hidden",
        type=int,
        default=None,
        help="width of the iaf/spline autoregressive networks; unset: max(4 * latent-dim, 32)",
    )
    m.add_argument("--rank", type=int, default=2, help="covariance rank of the lowrank guide")
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    o.add_argument("--batch-size", type=int, default=100, help="data points per SVI step")
    o.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    o.add_argument(
        "--loss",
        default="elbo",
        choices=list(LOSSES),
        help="Trace_ELBO, or TraceMeanField_ELBO (analytic KL)",
    )
    o.add_argument(
        "--num-particles", type=int, default=1, help="vectorized ELBO particles per step"
    )
    o.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    o.add_argument(
        "--kl-warmup",
        type=int,
        default=0,
        help="epochs over which the KL weight rises linearly from 0 to beta",
    )
    o.add_argument("--seed", type=int, default=0, help="makes a run reproducible")
    o.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay a checked record of each step's tensor operations instead of running "
        "the Pyro program again (same numbers, less Python per step)",
    )
    r = t.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    r.add_argument("--out", default="runs/vae", help="run directory")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (--epochs is the new total)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser(
        "evaluate",
        help="estimate log p(x) of a trained run by importance sampling",
        description="Estimate log p(x) of every point of a split by importance sampling with the "
        "run's guide as proposal; print the mean NLL (nats), ELBO and effective sample size and "
        "write them with the settings and wall time to RUN/evaluate.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--run", required=True, help="run directory written by ppl-vae train")
    e.add_argument("--num-samples", type=int, default=5000, help="K, importance samples per point")
    e.add_argument("--split", default="test", choices=["test", "train"])
    e.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="draws per vectorized pass, None for about 100,000 / --batch-size; "
        "peak memory grows with chunk size x batch size, not with K",
    )
    e.add_argument("--batch-size", type=int, default=100, help="data points per pass")
    e.add_argument(
        "--iwae-k",
        type=_int_list,
        default=(1, 10, 100),
        help="k of the IWAE bounds to report from the same draws (each <= K)",
    )
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N points")
    e.add_argument("--seed", type=int, default=0, help="seeds the draws and the binarization")
    e.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    e.add_argument("--data-dir", default=None, help="folder holding MNIST/raw, if it moved")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    from ppl_vae.mixture import COVARIANCE_TYPES, INITS

    em = sub.add_parser(
        "em",
        help="fit a Gaussian (or, for MNIST, Bernoulli) mixture by EM, as a baseline",
        description="Fit a mixture by expectation-maximisation to the training split: a "
        "Gaussian mixture for continuous data, a Bernoulli mixture (Beta prior, MAP) for "
        "statically binarized MNIST. Writes results.json (train/test mean log-likelihood in "
        "nats per point, iterations, convergence, settings, seconds) and mixture.png (density "
        "over the data for 2-D sets, component means for images) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    em.add_argument(
        "--dataset",
        default="pinwheel",
        help=f"{', '.join(DATASETS)} (statically binarized), or a .pt/.npy (N, ...) tensor",
    )
    em.add_argument("--data-dir", default=None, help="folder holding MNIST/raw")
    em.add_argument("--components", type=int, default=8, help="K, the number of components")
    em.add_argument(
        "--covariance",
        default="full",
        choices=COVARIANCE_TYPES,
        help="Gaussian covariance type (ignored for MNIST)",
    )
    em.add_argument("--max-iter", type=int, default=100, help="EM iterations per initialisation")
    em.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        help="stop when the mean log-likelihood changes by less (0: run --max-iter)",
    )
    em.add_argument(
        "--reg-covar", type=float, default=1e-6, help="added to every covariance diagonal"
    )
    em.add_argument("--n-init", type=int, default=1, help="initialisations; the best is kept")
    em.add_argument("--init", default="kmeans", choices=INITS, help="initial responsibilities")
    em.add_argument(
        "--alpha", type=float, default=1.0, help="Bernoulli mixture: Beta prior pseudo-count"
    )
    em.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    em.add_argument("--seed", type=int, default=0, help="seeds the data and the initialisation")
    em.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    em.add_argument("--out", default="runs/em", help="output directory")
    return parser


def _evaluate(args: argparse.Namespace) -> None:
    import json
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from ppl_vae.train import write_text_atomic
    from ppl_vae.vae import evaluate_run, load_run

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
    ks = tuple(k for k in args.iwae_k if k <= args.num_samples)
    run = load_run(args.run, args.device, data_dir=args.data_dir)
    n = run.data.test.shape[0] if args.split == "test" else run.data.train.shape[0]
    n = min(n, args.limit) if args.limit else n
    bar = tqdm(
        total=n * args.num_samples,
        unit="draw",
        unit_scale=True,
        dynamic_ncols=True,
        disable=args.quiet or not sys.stderr.isatty(),
        desc=f"log p(x), {args.split}",
    )
    t0 = time.perf_counter()
    result = evaluate_run(
        run,
        args.split,
        args.num_samples,
        args.chunk_size,
        args.batch_size,
        ks,
        args.seed,
        args.limit,
        progress=lambda done: bar.update(done - bar.n),
    )
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {k: v for k, v in result.items() if k != "log_px"}
    record = {
        **summary, "seconds": seconds, "epoch": run.metrics[-1]["epoch"] if run.metrics else 0,
        "chunk_size": args.chunk_size, "batch_size": args.batch_size, "seed": args.seed,
        "device": str(run.data.device), "log_px": result["log_px"],
    }  # fmt: skip
    write_text_atomic(json.dumps(record) + "\n", Path(args.run) / "evaluate.json")
    iwae = ", ".join(f"IWAE_{k} {v:.2f}" for k, v in result["iwae"].items())
    print(
        f"{args.split} NLL {result['nll']:.2f} ± {result['nll_standard_error']:.2f} nats "
        f"(K={args.num_samples}, {result['num_points']} points); ELBO {result['elbo']:.2f}; "
        f"{iwae}; mean ESS {result['ess']:.1f}; {seconds:.1f} s"
    )


def _em(args: argparse.Namespace) -> None:
    from ppl_vae.data import DataConfig
    from ppl_vae.mixture import MixtureConfig, em_run

    config = MixtureConfig(
        components=args.components,
        covariance=args.covariance,
        max_iter=args.max_iter,
        tol=args.tol,
        reg_covar=args.reg_covar,
        n_init=args.n_init,
        init=args.init,
        alpha=args.alpha,
        seed=args.seed,
        dtype=args.dtype,
    )
    data_config = DataConfig(
        name=args.dataset, binarize="static", data_dir=args.data_dir, seed=args.seed
    )
    r = em_run(data_config, config, args.out, args.device)
    status = "converged" if r["converged"] else "not converged"
    print(
        f"{r['mixture']} K={args.components} on {r['dataset']}: train "
        f"{r['train_log_likelihood']:.4f}, test {r['test_log_likelihood']:.4f} nats per point; "
        f"{r['n_iter']} iterations ({status}), {r['seconds']:.1f} s; wrote {args.out}"
    )


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ppl_vae.data import DataConfig
    from ppl_vae.networks import NetworkConfig
    from ppl_vae.plots import plot_reconstructions, plot_samples
    from ppl_vae.train import TrainConfig
    from ppl_vae.vae import VAEConfig, train_run

    data_config = DataConfig(
        name=args.dataset, binarize=args.binarize, data_dir=args.data_dir, seed=args.seed
    )
    vae_config = VAEConfig(
        latent_dim=args.latent_dim,
        network=NetworkConfig(args.network, tuple(args.hidden), args.activation),
        likelihood=args.likelihood,
        sigma=args.sigma,
        guide=args.guide,
        flow_length=args.flow_length,
        flow_hidden=args.flow_hidden,
        rank=args.rank,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        loss=args.loss,
        num_particles=args.num_particles,
        beta=args.beta,
        kl_warmup=args.kl_warmup,
        seed=args.seed,
        capture=args.capture,
    )
    run = train_run(
        data_config,
        vae_config,
        train_config,
        args.out,
        device=args.device,
        resume=args.resume,
        quiet=args.quiet,
    )
    out = Path(args.out)
    plot_samples(run.model, run.data, out / "samples.png")
    plot_reconstructions(run.model, run.guide, run.data, out / "reconstructions.png")
    last = run.metrics[-1] if run.metrics else None
    if last is not None and not args.quiet:
        print(
            f"epoch {last['epoch']}: train ELBO {last['train_elbo']:.2f}, "
            f"test ELBO {last['test_elbo']:.2f} nats per example; wrote {out}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "em":
            _em(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"ppl-vae: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"ppl-vae: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ppl-vae: interrupted; the last finished epoch is in the checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
