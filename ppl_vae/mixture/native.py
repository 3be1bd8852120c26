r"""The E-step on a CPU in compiled loops, built from C on first use (float32).

Two kernels, one library:

- ``normalise``: torch's normalisation of a (K, n) joint takes seven passes over it (maximum,
  shift, ``exp2``, column sums, reciprocal, scaling, row sums), each its own trip through memory.
  One C function does all of them on blocks of 256 points that stay in the first-level cache,
  with glibc's vectorised ``exp2f`` and ``log2f`` (libmvec, glibc 2.35 or later): about 0.4 of
  torch's time for a (16, 16,384) float32 chunk. Every mixture's pass uses it.
- ``diag_pass``: a whole diagonal-covariance pass for at most 16 components (:func:`diag_pass`).
  The E-step's products, the normalisation and the M-step's sums run on 16 points at a time in
  AVX-512 registers, one component per lane, so x is read from memory once a pass and neither
  x^2 nor the joint is ever written out: half of the time of torch's products and ``normalise``
  at 100k x 32, K = 16 (docs/BENCHMARKS.md, em). Built only where the compiler targets AVX-512.

The library is built once per process, the first time a large enough pass asks for it, with the
C compiler (``$CC``, else ``cc``) in a temporary directory that is removed as soon as the library
is loaded (about 0.5 s); nothing is kept on disk. Without a compiler, where the build fails, or
with ``PPL_VAE_NATIVE=0``, :func:`kernel` and :func:`diag_pass` return None and the pass uses
torch's operations. ``-ffast-math`` lets the compiler call libmvec in ``normalise``; the objects
are linked without it, so that loading the library does not change the process's floating-point
mode. ``diag_pass`` calls libmvec itself and is compiled without ``-ffast-math``.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LANES", "MAX_THREADS", "MIN_VALUES", "diag_pass", "kernel"]

MIN_VALUES = 2**20  # K N of a pass below which the build (0.4 s) is not worth it
# The loop runs on one thread; torch's operations run on all of them. With two threads it took
# 0.86 of their time still (a float32 diag pass); with more, untried on this 2-core machine,
# they are left to do it.
MAX_THREADS = 2
LANES = 16  # components per AVX-512 register of float32: diag_pass takes at most this many

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

# A diagonal-covariance pass over n points x (n, d) for k <= 16 components, one per lane of a
# 16-float register. coef: (2, d, 16), the joint's coefficients of x_j and of x_j^2 for each
# component; bias (16,) its constant, -inf past k. sums (2, d, 16) gets sum_n r_nk x_nj and
# sum_n r_nk x_nj^2 added, nk (16,) sum_n r_nk; returns sum_n log sum_k exp(joint), in double.
# work: 64 d + 256 floats. Per 16 points: the joint (one register per point), transposed to one
# register per component for the normalisation (exp2 floored at -126 as in normalise), transposed
# back for the M-step's sums. Sums are kept per block of 256 points, then added (as torch's
# products accumulate per chunk).
DIAG_SOURCE = r"""
#ifdef __AVX512F__
#include <immintrin.h>

__m512 _ZGVeN16v_exp2f(__m512);
__m512 _ZGVeN16v_log2f(__m512);

/* r[i] becomes column i of the 16 x 16 matrix whose rows were r[0..15]. */
static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

void transpose_check(float *m) { /* for the tests: m (16, 16) transposed in place */
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(m + 16 * i);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(m + 16 * i, r[i]);
}

/* s[i] += r_p y[p d + i] over points p < w, for the n_i <= 8 columns i of y, for sums s (16,) */
#define M_STEP(n_i, y, s)                                                              \
    for (long p = 0; p < w; ++p) {                                                     \
        const __m512 r = _mm512_loadu_ps(resp + 16 * p);                               \
        for (int i = 0; i < n_i; ++i)                                                  \
            s[i] = _mm512_fmadd_ps(r, _mm512_set1_ps(y[p * d + j + i]), s[i]);         \
    }

double diag_pass(const float *restrict x, long n, long d, const float *restrict coef,
                 const float *restrict bias, long k, float *restrict sums,
                 float *restrict nk, float *restrict work) {
    const __m512 log2e = _mm512_set1_ps(1.4426950408889634f);
    const __m512 ln2 = _mm512_set1_ps(0.6931471805599453f);
    const __m512 floor_ = _mm512_set1_ps(-126.0f), zero = _mm512_setzero_ps();
    const __m512 b = _mm512_loadu_ps(bias);
    const float *restrict ax = coef, *restrict aq = coef + 16 * d;
    float *restrict x2 = work, *restrict pad = work + 16 * d, *restrict resp = pad + 16 * d;
    float *restrict block_sums = resp + 256; /* (2, d, 16) */
    double total = 0.0;
    for (long start = 0; start < n; start += 256) {
        const long size = n - start < 256 ? n - start : 256;
        for (long i = 0; i < 32 * d; ++i) block_sums[i] = 0;
        __m512 count = zero;
        for (long g = 0; g < size; g += 16) {
            const long w = size - g < 16 ? size - g : 16; /* points in this group */
            const float *restrict xp = x + (start + g) * d;
            if (w < 16) { /* the last few points, and zeros */
                for (long i = 0; i < 16 * d; ++i) pad[i] = i < w * d ? xp[i] : 0;
                xp = pad;
            }
            for (long i = 0; i < 16 * d; ++i) x2[i] = xp[i] * xp[i];
            __m512 a[16]; /* a[p]: point p's joint over the components */
            for (int p = 0; p < 16; ++p) a[p] = b;
            for (long j = 0; j < d; ++j) {
                const __m512 cx = _mm512_loadu_ps(ax + 16 * j), cq = _mm512_loadu_ps(aq + 16 * j);
                for (int p = 0; p < 16; ++p) {
                    a[p] = _mm512_fmadd_ps(cx, _mm512_set1_ps(xp[p * d + j]), a[p]);
                    a[p] = _mm512_fmadd_ps(cq, _mm512_set1_ps(x2[p * d + j]), a[p]);
                }
            }
            transpose16(a); /* a[c]: component c's joint for the 16 points */
            __m512 top = a[0], norm = zero;
            for (int c = 1; c < 16; ++c) top = _mm512_max_ps(top, a[c]);
            for (int c = 0; c < 16; ++c) {
                if (c < k) {
                    const __m512 power = _mm512_mul_ps(_mm512_sub_ps(a[c], top), log2e);
                    a[c] = _ZGVeN16v_exp2f(_mm512_max_ps(power, floor_));
                    norm = _mm512_add_ps(norm, a[c]);
                } else {
                    a[c] = zero;
                }
            }
            const __m512 log_p = _mm512_fmadd_ps(_ZGVeN16v_log2f(norm), ln2, top);
            total += _mm512_mask_reduce_add_ps((__mmask16)((1u << w) - 1u), log_p);
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), norm);
            for (int c = 0; c < 16; ++c) a[c] = _mm512_mul_ps(a[c], inv);
            transpose16(a); /* a[p]: point p's responsibilities */
            for (int p = 0; p < 16; ++p) _mm512_storeu_ps(resp + 16 * p, a[p]);
            for (long p = 0; p < w; ++p) count = _mm512_add_ps(count, a[p]);
            for (long j = 0; j < d; j += 8) {
                const int n_i = d - j < 8 ? (int)(d - j) : 8;
                float *restrict bx = block_sums + 16 * j, *restrict bq = bx + 16 * d;
                __m512 s[8], q[8];
                for (int i = 0; i < n_i; ++i) {
                    s[i] = _mm512_loadu_ps(bx + 16 * i);
                    q[i] = _mm512_loadu_ps(bq + 16 * i);
                }
                if (n_i == 8) { /* constant bounds: the sums stay in registers */
                    M_STEP(8, xp, s)
                    M_STEP(8, x2, q)
                } else {
                    M_STEP(n_i, xp, s)
                    M_STEP(n_i, x2, q)
                }
                for (int i = 0; i < n_i; ++i) {
                    _mm512_storeu_ps(bx + 16 * i, s[i]);
                    _mm512_storeu_ps(bq + 16 * i, q[i]);
                }
            }
        }
        for (long i = 0; i < 32 * d; ++i) sums[i] += block_sums[i];
        _mm512_storeu_ps(nk, _mm512_add_ps(_mm512_loadu_ps(nk), count));
    }
    return total;
}
#endif
"""
COMPILE = ("-O3", "-march=native", "-fPIC")
FAST = "-ffast-math"  # normalise only: without it the compiler calls scalar exp2f and log2f

_library: ctypes.CDLL | None | bool = False  # False: not built yet


def _compile(cc: str, source: str, *args: str) -> bool:
    """Whether ``cc args`` (reading ``source`` on its standard input) succeeded."""
    done = subprocess.run(
        [cc, *args], input=source, text=True, capture_output=True, timeout=120, check=False
    )
    return done.returncode == 0


def _build() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built with vectorised exp2 (a loop of
    scalar exp2 calls is several times slower than torch's). ``diag_pass`` is left out where the
    compiler does not target AVX-512."""
    cc = os.environ.get("CC", "cc")
    if os.environ.get("PPL_VAE_NATIVE", "1") == "0" or shutil.which(cc) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ppl_vae_native_") as folder:
        obj, diag, lib = (str(Path(folder) / name) for name in ("normalise.o", "diag.o", "lib.so"))
        try:
            if not _compile(cc, SOURCE, *COMPILE, FAST, "-x", "c", "-c", "-", "-o", obj):
                return None
            calls = Path(obj).read_bytes()  # libmvec's names: _ZGV<isa>N<lanes>v_exp2f
            if b"v_exp2f\0" not in calls:
                return None
            objects = [obj]
            if _compile(cc, DIAG_SOURCE, *COMPILE, "-x", "c", "-c", "-", "-o", diag):
                objects.append(diag)
            if not _compile(cc, "", "-shared", *objects, "-o", lib, "-lmvec", "-lm"):
                return None
            library = ctypes.CDLL(lib)  # loaded: the file can go
        except (OSError, subprocess.SubprocessError):
            return None
    pointer, long = ctypes.c_void_p, ctypes.c_long
    library.normalise.restype = ctypes.c_double
    library.normalise.argtypes = [pointer, pointer, long, long]
    if hasattr(library, "diag_pass"):  # absent without AVX-512: an empty object
        library.diag_pass.restype = ctypes.c_double
        library.diag_pass.argtypes = [pointer, long, long, pointer, pointer, long] + 3 * [pointer]
        library.transpose_check.argtypes = [pointer]
    return library


def _library_for(like: Tensor, values: int) -> ctypes.CDLL | None:
    """The library for a pass of ``values`` = K N joint values of the dtype and device of
    ``like``, or None where torch's operations should do it: not a CPU float32 tensor, a small
    pass, more than :data:`MAX_THREADS` threads, or no library."""
    global _library
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return None
    if values < MIN_VALUES or torch.get_num_threads() > MAX_THREADS:
        return None
    if _library is False:
        _library = _build()
    return _library or None


def kernel(like: Tensor, values: int) -> Callable[[Tensor, Tensor], float] | None:
    """``normalise(joint, nk) -> sum_n log p(x_n)`` for a pass of ``values`` = K N joint values
    of the dtype and device of ``like``: the joint (K, n, contiguous) is overwritten by the
    responsibilities and their row sums are added to ``nk`` (K,). None where torch's operations
    should do it (:func:`_library_for`; in float64 the loop took 1.06 of torch's time: libmvec's
    double exp2 is no faster than torch's)."""
    library = _library_for(like, values)
    if library is None:
        return None
    function = library.normalise

    def normalise(joint: Tensor, nk: Tensor) -> float:
        k, n = joint.shape
        if not (joint.is_contiguous() and nk.is_contiguous() and nk.dtype == joint.dtype):
            raise ValueError("normalise takes a contiguous (K, n) joint and nk of its dtype")
        return function(joint.data_ptr(), nk.data_ptr(), k, n)

    return normalise


def diag_pass(
    x: Tensor, k: int
) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, float]] | None:
    """``run(a_x, a_square, b) -> (stats, nk, sum_n log p(x_n))``: a whole diagonal-covariance
    pass over the points ``x`` (N, D) for the joint ``a_x x + a_square x^2 + b`` of ``k``
    components (a_x, a_square (K, D), b (K,)), with stats (K, 2 D) = [r^T x, r^T x^2] and nk (K,)
    = sum_n r. None where torch's operations should do it (:func:`_library_for`), for more than
    :data:`LANES` components, a non-contiguous ``x``, or a library built without AVX-512."""
    library = _library_for(x, k * x.shape[0])
    if library is None or k > LANES or not x.is_contiguous() or x.dim() != 2:
        return None
    function = getattr(library, "diag_pass", None)
    if function is None:
        return None
    n, d = x.shape
    work = x.new_empty(64 * d + 256)

    def run(a_x: Tensor, a_square: Tensor, b: Tensor) -> tuple[Tensor, Tensor, float]:
        coef = x.new_zeros(2, d, LANES)
        coef[0, :, :k], coef[1, :, :k] = a_x.T, a_square.T
        bias = x.new_full((LANES,), -math.inf)
        bias[:k] = b
        sums, nk = x.new_zeros(2, d, LANES), x.new_zeros(LANES)
        pointer = torch.Tensor.data_ptr
        total = function(
            pointer(x), n, d, pointer(coef), pointer(bias), k, pointer(sums), pointer(nk),
            pointer(work)
        )  # fmt: skip
        return sums[:, :, :k].permute(2, 0, 1).reshape(k, 2 * d), nk[:k], total

    return run
