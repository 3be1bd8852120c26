r"""The ``ppl-vae`` command line: flags built from the configuration dataclasses, and dispatch."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ppl_vae.config import field_types, strip_optional
from ppl_vae.data import DataConfig
from ppl_vae.distributed import RankStopped, barrier, destroy, world
from ppl_vae.errors import InputError
from ppl_vae.presets import dataset_defaults, model_defaults, presets_help, prior_defaults
from ppl_vae.registry import Registry
from ppl_vae.runs import (
    PICTURES,
    EvaluateConfig,
    GapsConfig,
    Interrupted,
    MixtureConfig,
    em_run,
    evaluate_run,
    gaps_run,
    join_processes,
    plot_run,
    resume_run,
    train_run,
)
from ppl_vae.runs.checkpoint import CHECKPOINTS
from ppl_vae.runs.gaps import QUANTITIES
from ppl_vae.selection import best_epoch, watched
from ppl_vae.svi import TrainConfig, kl_weight_note
from ppl_vae.vae import VAEConfig

__all__ = ["main"]

SHARED = ("seed", "data_dir")  # configuration fields set by the shared flags
EM_DATA = {"dataset": "pinwheel"}  # the em command's own default data set
# torchrun reads --run as an abbreviation of its own --run-path, even after the module name
RUN_FLAGS = ("--run", "--run-dir")
RUN_HELP = "run directory written by ppl-vae train (under torchrun: --run-dir)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2, and which
    takes no abbreviations (``--over`` must not mean ``--overwrite``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _converter(parse):
    """An argparse type from a parser that raises InputError (its message becomes the error)."""

    def convert(text: str):
        try:
            return parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_config(
    group, cls: type, prefix: str, only: Sequence[str] | None = None, defaults: dict | None = None
) -> None:
    """Adds a flag for every field of the dataclass ``cls`` (nested dataclasses recursively).

    Defaults stay in the dataclass: a flag not given is absent from the namespace, so the
    dataclass default applies and the configuration records what was asked for.
    """
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in SHARED or (only is not None and f.name not in only):
            continue
        dest = f"{prefix}.{f.name}"
        tp, _ = strip_optional(types[f.name])
        if dataclasses.is_dataclass(tp):
            _add_config(group, tp, dest)
            continue
        meta = f.metadata
        flags = meta.get("flags") or [f"--{f.name.replace('_', '-')}"]
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        help_text = meta.get("help", "")
        default = (defaults or {}).get(f.name, f.default)
        if default is not dataclasses.MISSING and default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        kwargs["help"] = help_text.replace("%", "%%")
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            parse = meta.get("parse") or (tp if tp in (int, float) else str)
            kwargs["type"] = _converter(parse) if meta.get("parse") else parse
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = choices.names if isinstance(choices, Registry) else choices
            if meta.get("metavar") or choices is None:
                kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}.get(tp, "TEXT")
        group.add_argument(*flags, **kwargs)


def _build(cls: type, args: argparse.Namespace, prefix: str, **shared):
    """The dataclass ``cls`` from the flags given under ``prefix`` and the ``shared`` values."""
    given = {k[len(prefix) + 1 :]: v for k, v in vars(args).items() if k.startswith(prefix + ".")}
    values: dict[str, Any] = {}
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = strip_optional(types[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, args, f"{prefix}.{f.name}")
        elif f.name in given:
            values[f.name] = given[f.name]
        elif f.name in shared and shared[f.name] is not None:
            values[f.name] = shared[f.name]
    return cls(**values)


def _shared_flags() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    s = shared.add_argument_group("shared")
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    s.add_argument(
        "--seed", type=int, default=None, help="seeds everything random in the run (default: 0)"
    )
    s.add_argument(
        "--data-dir",
        default=None,
        help="folder holding the image sets' files: MNIST/raw, FashionMNIST/raw, KMNIST/raw, "
        "EMNIST/raw, OMNIGLOT/chardata.mat (see --dataset; default: $PPL_VAE_DATA, else "
        "~/.cache/ppl_vae)",
    )
    s.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (a bar on a terminal, else a line every 10 s or epoch); the result "
        "is still printed",
    )
    return shared


def build_parser() -> argparse.ArgumentParser:
    """The ``ppl-vae`` parser with its commands."""
    parser = _Parser(
        prog="ppl-vae",
        description="Variational autoencoders written as Pyro programs, trained by SVI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    shared = [_shared_flags()]
    t = sub.add_parser(
        "train",
        parents=shared,
        help="train a VAE by SVI and write metrics, a checkpoint and pictures",
        description="Train a VAE (Pyro model p(z)p(x|z), amortized guide q(z|x)) by SVI. "
        "Writes config.json, metrics.jsonl (one line per epoch), checkpoint.pt and the "
        "pictures of ppl-vae plot to --out. Some data sets and priors have defaults of their "
        "own, used where the flag is not given and recorded in the run (--resume keeps the "
        f"recorded settings): {presets_help()}",
    )
    _add_config(t.add_argument_group("data"), DataConfig, "data")
    _add_config(t.add_argument_group("model and guide"), VAEConfig, "vae")
    _add_config(t.add_argument_group("optimisation"), TrainConfig, "train")
    r = t.add_argument_group("run")
    r.add_argument("--out", default="runs/vae", help="run directory (default: runs/vae)")
    either = r.add_mutually_exclusive_group()  # continue a run, or replace it
    either.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint: its data, model and objective; "
        "only --epochs (the new total), --capture, --device, --quiet, --plot-every and "
        "--tensorboard may change",
    )
    either.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (it stays intact until the new run's first checkpoint)",
    )
    r.add_argument(
        "--plot-every",
        type=int,
        default=None,
        metavar="N",
        help="also draw the pictures every N epochs (they are always drawn at the end)",
    )
    r.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also log to TensorBoard in DIR, a folder outside --out: per epoch the ELBOs, KL "
        "weight, lr, grad_norm and seconds, the pictures, the configuration as hparams; "
        "--resume logs on into it (needs pip install 'ppl_vae[tensorboard]')",
    )
    e = sub.add_parser(
        "evaluate",
        parents=shared,
        help="estimate log p(x) of a trained run by importance sampling or AIS",
        description="Estimate log p(x) of every point of a split, by importance sampling with "
        "the run's guide as proposal (--method is: print the mean NLL in nats, ELBO and "
        "effective sample size) or by annealed importance sampling from the guide to the "
        "posterior (--method ais: the NLL, HMC acceptance, log-weight variance and chain ESS), "
        "and write them with the method, settings and wall time to RUN/evaluate.json.",
    )
    _add_record_flags(e, "evaluate.json")
    _add_config(e.add_argument_group("estimate (is, ais)"), EvaluateConfig, "evaluate")
    g = sub.add_parser(
        "gaps",
        parents=shared,
        help="split log p(x) - ELBO of a trained run into approximation and amortization gaps",
        description="On the first --limit test points: log p(x) by annealed importance "
        "sampling (AIS), the ELBO of q* (the best q of the guide's family per point, fitted "
        "with the model fixed), the amortized ELBO (the guide's), the approximation gap "
        "(log p(x) - ELBO of q*) and the amortization gap (ELBO of q* - amortized ELBO) "
        "(Cremer et al., 2018); print each as mean ± standard error over points and write "
        "them with the per-point values, settings and wall time to RUN/gaps.json. Gaussian "
        "guides only (gaussian, lowrank, fullrank).",
    )
    _add_record_flags(g, "gaps.json")
    _add_config(g.add_argument_group("gaps"), GapsConfig, "gaps")
    p = sub.add_parser(
        "plot",
        parents=shared,
        help="draw the pictures of a finished or running run",
        description="Draw a run's pictures from its checkpoint and metrics.jsonl (neither is "
        "changed): curves.png (ELBO per epoch), samples.png, and for images "
        "reconstructions.png, interpolation.png, latent.png and, for a 2-D latent, "
        "manifold.png; for 2-D data density.png (data and model log-density) and latent.png. "
        f"Pictures: {PICTURES.help()}.",
    )
    p.add_argument(*RUN_FLAGS, dest="run", required=True, help=RUN_HELP)
    p.add_argument("--out", default=None, help="folder for the pictures (default: the run's)")
    p.add_argument(*CHECKPOINT_FLAG, **CHECKPOINT_OPTIONS)
    p.add_argument(
        "--pictures",
        type=_converter(_names),
        default=None,
        metavar="NAME,...",
        help=f"which pictures, comma-separated (default: all that apply): {', '.join(PICTURES)}",
    )
    m = sub.add_parser(
        "em",
        parents=shared,
        help="fit a Gaussian (or, for binary data, Bernoulli) mixture by EM, as a baseline",
        description="Fit a mixture by expectation-maximisation to the training split: a "
        "Gaussian mixture for continuous data, a Bernoulli mixture (Beta prior, MAP) for "
        "binary data such as statically binarized MNIST (--mixture chooses). Writes "
        "results.json (train/test mean log-likelihood in nats per point, iterations, "
        "convergence, settings, seconds) and mixture.png (density over the data for 2-D "
        "sets, component means for images) to --out.",
    )
    _add_config(
        m.add_argument_group("data"), DataConfig, "data", only=("dataset",), defaults=EM_DATA
    )
    _add_config(m.add_argument_group("mixture"), MixtureConfig, "mixture")
    m.add_argument("--out", default="runs/em", help="output directory (default: runs/em)")
    return parser


def _add_record_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """--run, --out FILE|DIR or --no-write, and --checkpoint: a command writing ``name``."""
    parser.add_argument(*RUN_FLAGS, dest="run", required=True, help=RUN_HELP)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default=None,
        metavar="FILE|DIR",
        help=f"write the record here (a file, or a folder for {name}) instead of into "
        f"the run, e.g. for a read-only run (default: RUN/{name})",
    )
    where.add_argument(
        "--no-write", action="store_true", help="print the result only; write no file"
    )
    parser.add_argument(*CHECKPOINT_FLAG, **CHECKPOINT_OPTIONS)


CHECKPOINT_FLAG = ("--checkpoint",)
CHECKPOINT_OPTIONS = dict(
    choices=CHECKPOINTS,
    default=None,
    help="best: best.pt, the epoch with the best validation ELBO (the test ELBO for runs "
    "without --validation); last: checkpoint.pt, the last epoch (default: best where the run "
    "keeps one)",
)


def _given(args: argparse.Namespace, prefix: str, **shared) -> dict:
    """The flags given under ``prefix`` (nested by field), and the shared ones given."""
    out: dict = {k: v for k, v in shared.items() if v is not None}
    for key, value in vars(args).items():
        if key.startswith(prefix + "."):
            *path, name = key[len(prefix) + 1 :].split(".")
            target = out
            for part in path:
                target = target.setdefault(part, {})
            target[name] = value
    return out


def _lay_under(args: argparse.Namespace, defaults: dict, prefix: str = "") -> None:
    """Sets the flags of ``defaults`` (nested by part and field) that were not given."""
    for name, value in defaults.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            _lay_under(args, value, key)
        elif not hasattr(args, key):
            setattr(args, key, value)


def _train(args: argparse.Namespace) -> None:
    shared = {"seed": args.seed, "data_dir": args.data_dir}
    options = dict(quiet=args.quiet, plot_every=args.plot_every, tensorboard=args.tensorboard)
    if args.resume:  # the run's own settings, with what was given over them (checked there)
        given = {
            "data": _given(args, "data", **shared),
            "vae": _given(args, "vae"),
            "train": _given(args, "train", seed=args.seed),
        }
        run = resume_run(args.out, given, args.device, **options)
    else:
        data = _build(DataConfig, args, "data", **shared)
        model = getattr(args, "vae.model", None)
        _lay_under(args, model_defaults(model))
        loss = getattr(args, "train.loss", None)
        _lay_under(args, prior_defaults(getattr(args, "vae.prior", None), loss=loss))
        _lay_under(
            args,
            dataset_defaults(
                data.dataset,
                loss=loss,
                model=model,
                prior=getattr(args, "vae.prior", None),
            ),  # fmt: skip
        )
        vae = _build(VAEConfig, args, "vae")
        train = _build(TrainConfig, args, "train", **shared)
        run = train_run(
            data, vae, train, args.out, args.device, overwrite=args.overwrite, **options
        )
    last = run.metrics[-1] if run.metrics else None
    if last is not None and world().main:  # the result, also with --quiet
        best, key = best_epoch(run.metrics), watched(run.metrics)
        kept = (
            f"; best.pt: epoch {best}, {key.replace('_', ' ').replace('elbo', 'ELBO')} "
            f"{run.metrics[best - 1][key]:.2f}"
            if best != last["epoch"]
            else ""
        )
        print(
            f"epoch {last['epoch']}: train ELBO {last['train_elbo']:.2f}{kl_weight_note(last)}, "
            f"test ELBO {last['test_elbo']:.2f} nats per example{kept}"
            + (" (bounds on log p(y|x))" if run.vae_config.model == "cvae" else "")
            + (
                f" (unlabelled bounds: the label summed out); test accuracy "
                f"{last['test_accuracy']:.4f}"
                if run.vae_config.model == "m2"
                else ""
            )
            + f"; wrote {args.out}"
        )


def _evaluate(args: argparse.Namespace) -> None:
    config = _build(EvaluateConfig, args, "evaluate", seed=args.seed)
    evaluate_run(
        args.run, config, device=args.device, data_dir=args.data_dir, quiet=args.quiet,
        write=not args.no_write, out=args.out, report=_print_evaluation,
        checkpoint=args.checkpoint,
    )  # fmt: skip


def _importance_line(r: dict) -> str:
    iwae = ", ".join(f"IWAE_{k} {v:.2f}" for k, v in r["iwae"].items())
    return (
        f"K={r['num_samples']}, {r['num_points']} points); ELBO {r['elbo']:.2f}; {iwae}; "
        f"mean ESS {r['ess']:.1f}"
    )


def _annealed_line(r: dict) -> str:
    a = r["ais"]
    return (
        f"AIS, C={r['num_chains']}, T={r['num_steps']}, {r['num_points']} points); mean "
        f"acceptance {a['acceptance']:.2f}, log-weight variance {a['log_weight_variance']:.3g}, "
        f"chain ESS {a['ess']:.1f} of {r['num_chains']}"
    )


ESTIMATE_LINES = {"is": _importance_line, "ais": _annealed_line}  # by evaluate --method


def _print_evaluation(r: dict) -> None:
    """The estimate, printed before it is written (a failed write then loses nothing)."""
    if r.get("label_summed_out"):  # an M2 run
        print(
            f"{r['split']} NLL {r['nll']:.2f} ± {r['nll_standard_error']:.2f} nats (is, "
            f"K={r['num_samples']} per class, the label summed out exactly, {r['num_points']} "
            f"points); test accuracy {r['test_accuracy']:.4f}; {r['seconds']:.1f} s",
            flush=True,
        )
        return
    what = "-log p(y|x)" if r.get("conditional") else "NLL"
    print(
        f"{r['split']} {what} {r['nll']:.2f} ± {r['nll_standard_error']:.2f} nats "
        f"({ESTIMATE_LINES[r['method']](r)}; {r['seconds']:.1f} s",
        flush=True,
    )
    if "active_units" not in r:  # a conditional VAE: no collapse diagnostics
        if "baseline" in r:
            b = r["baseline"]
            print(
                f"{r['split']} -log p(y|x) of the baseline {b['nll']:.2f} ± "
                f"{b['nll_standard_error']:.2f} nats (exact)",
                flush=True,
            )
        return
    mi, k = r.get("mutual_information"), r.get("pareto_k")
    print(
        f"active units {r['active_units']}/{len(r['kl_per_dim'])}; "
        f"KL to N(0, I) {sum(r['kl_per_dim']):.2f}"
        + (f"; I(x;z) {mi:.2f} nats" if mi is not None else "")
        + (f"; k̂ > 0.7 for {k['above_0.7']:.1%} of points" if k else ""),
        flush=True,
    )


def _gaps(args: argparse.Namespace) -> None:
    config = _build(GapsConfig, args, "gaps", seed=args.seed)
    gaps_run(
        args.run, config, device=args.device, data_dir=args.data_dir, quiet=args.quiet,
        write=not args.no_write, out=args.out, report=_print_gaps, checkpoint=args.checkpoint,
    )  # fmt: skip


def _print_gaps(r: dict) -> None:
    """One line per quantity, printed before the record is written."""
    print(
        f"{r['num_points']} test points, AIS C={r['num_chains']}, T={r['num_steps']}, "
        f"epoch {r['epoch']}; {r['seconds']:.1f} s; nats, mean ± standard error over points:",
        flush=True,
    )
    width = max(map(len, QUANTITIES.values()))
    for key, label in QUANTITIES.items():
        se = r["standard_errors"][key]
        shown = f" ± {se:.3f}" if se is not None else ""
        print(f"  {label:<{width}}  {r['means'][key]:9.3f}{shown}", flush=True)


def _em(args: argparse.Namespace) -> None:
    data = _build(DataConfig, args, "data", seed=args.seed, data_dir=args.data_dir, **EM_DATA)
    config = _build(MixtureConfig, args, "mixture", seed=args.seed)
    data = dataclasses.replace(data, binarize="static")

    def report(r: dict) -> None:  # printed before the files are written
        status = "converged" if r["converged"] else "not converged: raise --max-iter or --tol"
        print(
            f"{r['mixture']} K={config.n_components} on {r['dataset']}: train "
            f"{r['train_log_likelihood']:.4f}, test {r['test_log_likelihood']:.4f} nats per "
            f"point; {r['n_iter']} iterations ({status}), {r['seconds']:.1f} s; writing to "
            f"{args.out}",
            flush=True,
        )

    em_run(data, config, args.out, args.device, quiet=args.quiet, report=report)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    for name in names:
        PICTURES.check(name)
    return names


def _plot(args: argparse.Namespace) -> None:
    paths = plot_run(
        args.run, args.out, args.pictures, args.device, data_dir=args.data_dir,
        checkpoint=args.checkpoint,
    )  # fmt: skip
    if not args.quiet:
        print(
            f"wrote {', '.join(p.name for p in paths)} to {paths[0].parent if paths else args.out}"
        )


COMMANDS = {"train": _train, "evaluate": _evaluate, "gaps": _gaps, "plot": _plot, "em": _em}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    previous = signal.signal(signal.SIGTERM, _terminate)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        join_processes(args.device)  # under torchrun; nothing in one process
        COMMANDS[args.command](args)
        barrier()  # under torchrun: no rank leaves while rank 0 still writes (pictures, JSON)
    except InputError as e:
        _say(f"ppl-vae: error: {e}", every_rank=True)
        return 2
    except (FloatingPointError, OSError) as e:
        _say(f"ppl-vae: error: {e}", every_rank=isinstance(e, OSError))
        return 1
    except RankStopped as e:  # under torchrun: another rank died; its launcher stops this one
        previous = signal.SIG_IGN  # with SIGTERM, which must not cut this short (see finally)
        signal.signal(signal.SIGTERM, previous)
        _say(f"ppl-vae: error: {e}", every_rank=e.told_by(world()))
        return 1
    except Interrupted as e:  # train: the message says which checkpoint is intact
        _say(f"ppl-vae: interrupted; {e}")
        return 130
    except KeyboardInterrupt:
        _say(f"ppl-vae: interrupted; {args.command} wrote nothing")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = shown
        destroy()
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning for the user (a reseeded stream, a program run without its record) as one
    line on stderr, from rank 0 only; a library that imports ppl_vae keeps Python's display."""
    _say(f"ppl-vae: warning: {message}")


def _say(message: str, every_rank: bool = False) -> None:
    """A message on stderr: from rank 0 only under torchrun (the ranks agree on what happened)
    unless ``every_rank`` (an error that one rank alone may meet), then prefixed by the rank."""
    w = world()
    if w.main:
        print(message, file=sys.stderr)
    elif every_rank:
        print(f"[rank {w.rank}] {message}", file=sys.stderr)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) is handled as Ctrl-C is


if __name__ == "__main__":
    sys.exit(main())
