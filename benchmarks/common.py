r"""What the benchmark scripts share: options, the reference VAE, interleaved timing, the report.

Each script in ``benchmarks/`` imports this module as ``from common import ...``; running a
script as ``python benchmarks/<name>.py`` puts this folder on ``sys.path``.

- :func:`parse_args` adds the shared options (``--repeats``, ``--steps``, ``--device``,
  ``--threads``, ``--write``), parses and applies ``--threads``;
- :func:`reference_vae` builds the reference MNIST VAE (MLP 784-200-200, z of dimension 50,
  Bernoulli likelihood, dynamic binarization) from seed 0;
- :func:`training_step` is one SVI step as :func:`ppl_vae.svi.train` runs it;
- :func:`interleave` times contenders in turn, repeat after repeat, so that a slow spell of a
  shared machine hits all of them alike; :func:`medians` summarises;
- :func:`reset_peak_memory` and :func:`peak_memory_mib` measure the peak memory of a device
  (the CUDA allocator's, or the process's resident memory on the CPU);
- :func:`describe` is the line naming the device and versions; :func:`write_section` rewrites
  the script's section of docs/BENCHMARKS.md (``--write``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch

from ppl_vae import DataConfig, VAEConfig, build_vae, load_data
from ppl_vae.svi import collect_params, svi_step

__all__ = [
    "BENCHMARKS_MD",
    "ROOT",
    "describe",
    "interleave",
    "measured_apart",
    "medians",
    "mnist",
    "parse_args",
    "peak_memory_mib",
    "peak_memory_name",
    "reference_vae",
    "reset_peak_memory",
    "sync",
    "time_calls",
    "training_step",
    "write_section",
]

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"


def parse_args(
    parser: argparse.ArgumentParser,
    argv=None,
    *,
    repeats: int,
    steps: int | None = None,
    device: bool = True,
) -> tuple[argparse.Namespace, torch.device]:
    """Adds the options the benchmarks share, parses ``argv``, applies ``--threads``.

    Every script gets ``--repeats`` (default ``repeats``) and ``--write``; ``--steps`` is added
    when ``steps`` is given, ``--device`` and ``--threads`` when ``device`` is true (otherwise
    the device is the CPU). Returns the arguments and the device.
    """
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats")
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help="timed steps per repeat")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args, torch.device(getattr(args, "device", "cpu"))


def describe(device: torch.device) -> str:
    """``Device: <type> (<name>), torch <version>, pyro <version>, <n> threads``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return (
        f"Device: {device.type} ({name}), torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def mnist(device: torch.device):
    """Dynamically binarized MNIST on ``device``, loaded once per process."""
    return load_data(DataConfig("mnist", "dynamic"), device)


def reference_vae(device: torch.device, config: VAEConfig | None = None):
    """``(data, model, guide)``: MNIST and a VAE built from seed 0, the param store cleared.

    ``config`` defaults to :class:`~ppl_vae.vae.VAEConfig` ``()``, the reference architecture.
    """
    data = mnist(device)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build_vae(config or VAEConfig(), data)
    return data, model, guide


def reference_batch(device: torch.device, batch: int):
    """``(data, model, guide, x, params)``: :func:`reference_vae`, a binarized batch of the
    first ``batch`` training images and the parameters of both programs, registered."""
    data, model, guide = reference_vae(device)
    x = torch.bernoulli(data.train[:batch])
    params = collect_params(model, guide, x, data.train.shape[0])
    return data, model, guide, x, params


def training_step(
    loss: Callable,
    optimizer: torch.optim.Optimizer,
    *args,
    step: Callable = svi_step,
    **kwargs,
) -> Callable:
    """A closure running one ``step`` (default :func:`~ppl_vae.svi.svi_step`; or a
    :class:`~ppl_vae.graphs.GraphedSteps`) of ``loss``, validation off.

    ``closure(*more)`` passes ``more`` after ``args`` (a batch given at each call). Validation
    is off as in :func:`ppl_vae.svi.train`'s loop, after the first trace.
    """

    def closure(*more):
        with pyro.validation_enabled(False):
            return step(loss, optimizer, *args, *more, **kwargs)

    return closure


def time_calls(
    fn: Callable[[], Any], device: torch.device, calls: int = 1, warmup: int = 0
) -> tuple[float, Any]:
    """Seconds per call of ``fn`` over ``calls`` timed calls after ``warmup`` untimed ones.

    Returns the time and what the last call returned.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        result = fn()
    sync(device)
    return (time.perf_counter() - t0) / calls, result


def interleave(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    *,
    calls: int = 1,
    warmup: int = 0,
    rotate: bool = False,
    before: Callable[[str], None] | None = None,
    report: Callable[[str, float, Any], None] | None = None,
) -> dict[str, list[float]]:
    """Times every contender in turn, ``repeats`` times; the seconds per call, by name.

    In each repeat every contender runs ``warmup`` untimed then ``calls`` timed calls (see
    :func:`time_calls`). ``rotate`` rotates the order from repeat to repeat; ``before(name)``
    runs before a contender's turn, untimed; ``report(name, seconds, result)`` after it.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(name)
            seconds, result = time_calls(contenders[name], device, calls, warmup)
            times[name].append(seconds)
            if report is not None:
                report(name, seconds, result)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list."""
    return {name: statistics.median(v) for name, v in times.items()}


def write_section(title: str, body: str, command: str | None = None) -> None:
    """Replaces (or appends) the section ``title`` of docs/BENCHMARKS.md.

    ``command`` (default: this process's command line) is recorded above ``body``.
    """
    if command is None:
        script = Path(sys.argv[0]).resolve()
        if script.is_relative_to(ROOT):  # as run from the repository's root
            script = script.relative_to(ROOT)
        command = " ".join(["python", str(script), *sys.argv[1:]])
    path = BENCHMARKS_MD
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {title} -->", f"<!-- /{title} -->"
    section = f"{start}\n## {title}\n\nCommand: `{command}`\n\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def reset_peak_memory(device: torch.device) -> float:
    """Resets the peak memory of ``device`` to what is in use now, and returns that in MiB.

    On CUDA: the caching allocator's peak allocation (``torch.cuda.reset_peak_memory_stats``)
    and the bytes allocated; on the CPU: this process's peak resident memory (VmHWM, reset
    through ``/proc/self/clear_refs``, Linux only) and the resident memory, after a garbage
    collection. A fresh process gives the CPU figure a heap of its own.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return peak_memory_mib(device)


def peak_memory_mib(device: torch.device) -> float:
    """The peak memory of ``device`` since :func:`reset_peak_memory` in MiB: the CUDA
    allocator's ``max_memory_allocated``, or this process's peak resident memory (Linux)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def peak_memory_name(device: torch.device) -> str:
    """What :func:`peak_memory_mib` measures on ``device``, for a table's caption."""
    return "max_memory_allocated" if device.type == "cuda" else "peak RSS"


def measured_apart(
    device: torch.device, here: Callable[[], Any], command: list[str], env: dict | None = None
) -> Any:
    """A memory measurement: ``here()`` on CUDA (in this process: the allocator's peak resets),
    else what ``python command...`` prints as JSON from a fresh process (a heap of its own,
    so that its peak resident memory is the measurement's)."""
    if device.type == "cuda":
        return here()
    out = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.splitlines()[-1])  # its last line: the figure
