"""Gram matrix ``X X^T`` of a few long float32 rows: the float32 Gram kernel (the float64 and
exact kernels are in linalg.py).

Krum, Multi-Krum and Bulyan need every pairwise distance between the hospitals' updates, that
is the Gram matrix of the float32 ``(n, d)`` update matrix, with n ~ 20 and d ~ 10^7. None of
our dependencies has a fast kernel for that shape. Measured for 20 x 7.03M (DenseNet121) on the
2-core dev machine (AMD EPYC with AVX-512, BENCHMARKS.md), one thread:

- ``torch.mm``: 0.10-0.11 s. MKL takes its generic, non-AVX-512 path on AMD CPUs.
- numpy's OpenBLAS ``sgemm``: 0.08-0.09 s.
- scipy's OpenBLAS ``ssyrk``: 0.17 s.
- this kernel: 0.030 s. Two threads: 0.023 s; reading the 562 MB once takes 0.016 s.

How: numba compiles it for the host CPU (AVX-512 where present). Rows go 4 x 4 at a time. One
pass over a tile's 8 rows feeds 16 float32 accumulators that stay in registers, 16
multiply-adds per column for 8 loads. Only tiles on or below the diagonal are computed: 15 for
n = 20 instead of 25. Columns go in blocks of ``block``; each block's float32 dot products are
added to a float64 total. With T torch threads the columns are split into T contiguous ranges
of whole blocks, run in T Python threads (the kernel releases the GIL), and summed in float64.

Accuracy: :func:`carefl.robust.linalg.pairwise_sq_dists_bounded` relies on this. Within one
block of c columns each entry is a float32 sum of c products. The compiler may reorder the sum
and fuse multiply-adds (``fastmath`` = reassoc + contract, nothing else). Higham's bound
(*Accuracy and Stability of Numerical Algorithms*, 3.1) holds for any summation order:
``|G~_ij - G_ij| <= gamma_c sum_k |a_k b_k|`` with ``gamma_c = c u / (1 - c u)`` and
``u = 2^-24``. The float64 additions add at most ~1e-12 relative to that.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit
from torch import Tensor

_TILE = 4


@njit(fastmath={"reassoc", "contract"}, nogil=True)
def _tile(a0, a1, a2, a3, b0, b1, b2, b3, out):
    """``out[p, q] = sum_k a_p[k] b_q[k]`` (4 x 4) over equal-length rows, accumulated in
    ``out``'s dtype: float32 for this module's Gram, float64 for the centred Gram of
    :mod:`carefl.robust.linalg` (numba compiles one version per dtype). The loop runs from 0
    over 1-D row slices that numba types as contiguous, so it drops its wrap-around check and
    vectorises the loop (an offset range or a 2-D column slice is 7-11x slower)."""
    out[0, 0] = 0.0
    zero = out[0, 0]  # 0 in out's dtype
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for k in range(a0.shape[0]):
        p0, p1, p2, p3 = a0[k], a1[k], a2[k], a3[k]
        q0, q1, q2, q3 = b0[k], b1[k], b2[k], b3[k]
        s00 += p0 * q0
        s01 += p0 * q1
        s02 += p0 * q2
        s03 += p0 * q3
        s10 += p1 * q0
        s11 += p1 * q1
        s12 += p1 * q2
        s13 += p1 * q3
        s20 += p2 * q0
        s21 += p2 * q1
        s22 += p2 * q2
        s23 += p2 * q3
        s30 += p3 * q0
        s31 += p3 * q1
        s32 += p3 * q2
        s33 += p3 * q3
    out[0, 0], out[0, 1], out[0, 2], out[0, 3] = s00, s01, s02, s03
    out[1, 0], out[1, 1], out[1, 2], out[1, 3] = s10, s11, s12, s13
    out[2, 0], out[2, 1], out[2, 2], out[2, 3] = s20, s21, s22, s23
    out[3, 0], out[3, 1], out[3, 2], out[3, 3] = s30, s31, s32, s33


@njit(nogil=True)
def _lower_gram(x, lo, hi, block):
    """Lower triangle (diagonal included) of the Gram of ``x[:, lo:hi]``, ``x`` float32
    C-contiguous ``(n, d)``: ``(n, n)`` float64, zeros above the diagonal. Rows past the last
    full tile repeat row n - 1; their products are computed and dropped."""
    n = x.shape[0]
    g = np.zeros((n, n))
    out = np.empty((_TILE, _TILE), np.float32)
    last = n - 1
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        for i0 in range(0, n, _TILE):
            a0, a1 = x[i0, start:stop], x[min(i0 + 1, last), start:stop]
            a2, a3 = x[min(i0 + 2, last), start:stop], x[min(i0 + 3, last), start:stop]
            for j0 in range(0, i0 + 1, _TILE):
                b0, b1 = x[j0, start:stop], x[min(j0 + 1, last), start:stop]
                b2, b3 = x[min(j0 + 2, last), start:stop], x[min(j0 + 3, last), start:stop]
                _tile(a0, a1, a2, a3, b0, b1, b2, b3, out)
                for p in range(min(_TILE, n - i0)):
                    for q in range(min(_TILE, i0 + p - j0 + 1)):
                        g[i0 + p, j0 + q] += out[p, q]
    return g


def gram(x: Tensor, block: int) -> Tensor:
    """Gram matrix ``(n, n)`` float64 of the rows of ``x`` float32 ``(n, d)``, each entry a
    float64 sum of float32 dot products over column blocks of at most ``block`` columns (error
    bound in the module docstring). Uses ``torch.get_num_threads()`` threads."""
    if x.dtype != torch.float32:
        raise TypeError(f"gram: expects the float32 update matrix, got {x.dtype}")
    rows = x.detach().contiguous().numpy()
    d = rows.shape[1]
    threads = max(1, min(torch.get_num_threads(), -(-d // block)))
    span = -(-d // threads)
    span = -(-span // block) * block  # whole blocks per thread: the bound's c stays <= block
    starts = range(0, d, span)
    if len(starts) == 1:
        lower = _lower_gram(rows, 0, d, block)
    else:
        with ThreadPoolExecutor(len(starts)) as pool:
            lower = sum(pool.map(lambda s: _lower_gram(rows, s, min(s + span, d), block), starts))
    lower = torch.from_numpy(lower)
    return lower + lower.tril(-1).T
