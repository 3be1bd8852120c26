r"""The E-step's normalisation of a chunk in one loop, compiled from C on first use (CPU).

On a CPU, torch's normalisation of a (K, n) joint takes seven passes over it (maximum, shift,
``exp2``, column sums, reciprocal, scaling, row sums), each its own trip through memory. Here one
C function does all of them on blocks of 256 points that stay in the first-level cache, with
glibc's vectorised ``exp2f`` and ``log2f`` (libmvec, glibc 2.35 or later): about 0.4 of torch's
time for a (16, 16,384) float32 chunk, 0.88 of a float32 diag pass at 100k x 32, K = 16
(docs/BENCHMARKS.md, em). Float32 only.

The kernel is built once per process, the first time a large enough pass asks for it, with the C
compiler (``$CC``, else ``cc``) in a temporary directory that is removed as soon as the library
is loaded (about 0.4 s); nothing is kept on disk. Without a compiler, where the build fails, or
with ``PPL_VAE_NATIVE=0``, :func:`kernel` returns None and the pass uses torch's operations.
``-ffast-math`` lets the compiler call libmvec; the object is linked without it, so that loading
the library does not change the process's floating-point mode.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_THREADS", "MIN_VALUES", "kernel"]

MIN_VALUES = 2**20  # K N of a pass below which the build (0.4 s) is not worth it
# The loop runs on one thread; torch's operations run on all of them. With two threads it took
# 0.86 of their time still (a float32 diag pass); with more, untried on this 2-core machine,
# they are left to do it.
MAX_THREADS = 2

# The joint (K, n), in nats, becomes the responsibilities; nk (K,) gets their row sums added; the
# return value is sum_n log sum_k exp(joint), in double. exp2's argument is floored at -126, the
# exponent of the smallest normal float: below it libmvec takes a scalar path per value, which
# made a pass twice as slow once the responsibilities separate, and a responsibility of 1e-38
# instead of less changes no sum.
SOURCE = r"""
#include <math.h>

double normalise(float *restrict joint, float *restrict nk, long k, long n) {
    const float log2e = 1.4426950408889634f, ln2 = 0.6931471805599453f;
    float top[256] __attribute__((aligned(64))), norm[256] __attribute__((aligned(64)));
    double total = 0.0;
    for (long start = 0; start < n; start += 256) {
        const long w = n - start < 256 ? n - start : 256;
        float *restrict block = joint + start;
        for (long j = 0; j < w; ++j) top[j] = block[j];
        for (long i = 1; i < k; ++i) {
            const float *restrict row = block + i * n;
            for (long j = 0; j < w; ++j) top[j] = row[j] > top[j] ? row[j] : top[j];
        }
        for (long j = 0; j < w; ++j) norm[j] = 0;
        for (long i = 0; i < k; ++i) {
            float *restrict row = block + i * n;
            for (long j = 0; j < w; ++j) {
                const float power = (row[j] - top[j]) * log2e; /* <= 0 */
                const float e = exp2f(power > -126 ? power : -126);
                row[j] = e;
                norm[j] += e;
            }
        }
        float log_p = 0;
        for (long j = 0; j < w; ++j) {
            log_p += top[j] + log2f(norm[j]) * ln2;
            norm[j] = 1 / norm[j];
        }
        total += log_p;
        for (long i = 0; i < k; ++i) {
            float *restrict row = block + i * n;
            float sum = 0;
            for (long j = 0; j < w; ++j) {
                row[j] *= norm[j];
                sum += row[j];
            }
            nk[i] += sum;
        }
    }
    return total;
}
"""
COMPILE = ("-O3", "-march=native", "-ffast-math", "-fPIC")

_library: ctypes.CDLL | None | bool = False  # False: not built yet


def _compile(cc: str, *args: str) -> bool:
    """Whether ``cc args`` (reading :data:`SOURCE` on its standard input) succeeded."""
    done = subprocess.run(
        [cc, *args], input=SOURCE, text=True, capture_output=True, timeout=120, check=False
    )
    return done.returncode == 0


def _build() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built with vectorised exp2 (a loop of
    scalar exp2 calls is several times slower than torch's)."""
    cc = os.environ.get("CC", "cc")
    if os.environ.get("PPL_VAE_NATIVE", "1") == "0" or shutil.which(cc) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ppl_vae_native_") as folder:
        obj, lib = str(Path(folder) / "normalise.o"), str(Path(folder) / "normalise.so")
        try:
            if not _compile(cc, *COMPILE, "-x", "c", "-c", "-", "-o", obj):
                return None
            calls = Path(obj).read_bytes()  # libmvec's names: _ZGV<isa>N<lanes>v_exp2f
            if b"v_exp2f\0" not in calls:
                return None
            if not _compile(cc, "-shared", obj, "-o", lib, "-lmvec", "-lm"):
                return None
            library = ctypes.CDLL(lib)  # loaded: the file can go
        except (OSError, subprocess.SubprocessError):
            return None
    library.normalise.restype = ctypes.c_double
    library.normalise.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    return library


def kernel(like: Tensor, values: int) -> Callable[[Tensor, Tensor], float] | None:
    """``normalise(joint, nk) -> sum_n log p(x_n)`` for a pass of ``values`` = K N joint values
    of the dtype and device of ``like``: the joint (K, n, contiguous) is overwritten by the
    responsibilities and their row sums are added to ``nk`` (K,). None where torch's operations
    should do it: not a CPU float32 tensor (in float64 the loop took 1.06 of torch's time:
    libmvec's double exp2 is no faster than torch's), a small pass, more than
    :data:`MAX_THREADS` threads, or no kernel."""
    global _library
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return None
    if values < MIN_VALUES or torch.get_num_threads() > MAX_THREADS:
        return None
    if _library is False:
        _library = _build()
    if _library is None:
        return None
    function = _library.normalise

    def normalise(joint: Tensor, nk: Tensor) -> float:
        k, n = joint.shape
        if not (joint.is_contiguous() and nk.is_contiguous() and nk.dtype == joint.dtype):
            raise ValueError("normalise takes a contiguous (K, n) joint and nk of its dtype")
        return function(joint.data_ptr(), nk.data_ptr(), k, n)

    return normalise
