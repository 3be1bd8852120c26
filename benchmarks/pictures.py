r"""Time of each picture of ``train``/``plot`` on a trained run: the figure and its PNG.

For every picture that applies to the run (``ppl_vae.runs.pictures.default_pictures``, or
``--pictures``), each repeat times the figure function as ``write_pictures`` calls it
(``PICTURES[name].factory(run)``: encoding, decoding, projection, matplotlib artists) and the
PNG written as ``write_pictures`` writes it (``ppl_vae.runs.files._savefig``, into memory),
pictures in turn; then one whole ``write_pictures`` into a temporary folder (every picture,
the files renamed into place, ``written.json``). Medians over repeats.

Run: ``python benchmarks/pictures.py --run RUN --threads 1 --write`` (``--write`` updates
docs/BENCHMARKS.md). ``RUN`` is a run folder (the reference run: MLP 784-200-200, z = 50,
tanh, MNIST); nothing is written into it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time

from common import describe, parse_args, sync, write_section

from ppl_vae.rng import forked_rng
from ppl_vae.runs import load_run
from ppl_vae.runs.files import _savefig
from ppl_vae.runs.pictures import PICTURES, default_pictures, write_pictures


def time_pictures(run, names: tuple[str, ...], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of the figure, the PNG and both, per picture."""
    times = {name: {"figure": [], "png": [], "total": []} for name in names}
    device = run.data.device
    with forked_rng(device, 0):
        for _ in range(repeats):
            for name in names:
                t0 = time.perf_counter()
                fig = PICTURES[name].factory(run)
                sync(device)
                t1 = time.perf_counter()
                _savefig(fig, io.BytesIO())
                t2 = time.perf_counter()
                fig.clear()
                for key, value in (("figure", t1 - t0), ("png", t2 - t1), ("total", t2 - t0)):
                    times[name][key].append(value)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def time_write(run, names: tuple[str, ...], repeats: int) -> float:
    """Median seconds of one ``write_pictures`` of ``names`` into a new temporary folder."""
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            write_pictures(run, out, names)
            seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a trained run's folder (only read)")
    parser.add_argument("--checkpoint", default="last", choices=("best", "last"))
    parser.add_argument("--pictures", default=None, help="comma-separated names (default: all)")
    args, device = parse_args(parser, argv, repeats=5)
    run = load_run(args.run, device, checkpoint=args.checkpoint)
    names = tuple(args.pictures.split(",")) if args.pictures else default_pictures(run)
    write_pictures(run, tempfile.mkdtemp(), names)  # warm-up: first-call costs of matplotlib
    per = time_pictures(run, names, args.repeats)
    whole = time_write(run, names, max(3, args.repeats // 2))
    rows = [
        f"| {n} | {t['figure']:.3f} | {t['png']:.3f} | **{t['total']:.3f}** |"
        for n, t in per.items()
    ]
    rows.append(f"| `write_pictures`, all {len(names)} | | | **{whole:.3f}** |")
    test = run.data.test.shape[0]
    table = "\n".join(
        [
            f"{describe(device)}; run {args.run} (checkpoint {args.checkpoint}, "
            f"{run.vae_config.latent_dim}-D z, {test:,} test points); seconds, median of "
            f"{args.repeats} repeats, pictures in turn (write_pictures: median of "
            f"{max(3, args.repeats // 2)}).",
            "",
            "| picture | figure s | PNG s | figure + PNG s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"pictures ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
