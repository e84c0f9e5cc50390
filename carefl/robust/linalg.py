"""Memory-bounded primitives on the update matrix ``X`` float32 ``(n, d)``.

No ``(n, n, d)`` tensor and no full ``(n, d)`` temporary is ever built: distances go through a
Gram matrix accumulated over column blocks, order statistics are taken block by block.
For DenseNet121 (d = 7.03M) and n = 20 the matrix itself is 562 MB; the extra memory here is a
few MB.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from carefl.robust.gram import gram as gram_matrix
from carefl.robust.networks import selection_network

#: columns per order-statistics block and torch thread (up to 4 threads): with n ~ 20 rows the
#: (n + 1) x 65536 float32 workspace (5.5 MB) stays in L2/L3, and each comparator op is long
#: enough (65536 floats per thread) to amortise torch's per-op dispatch. Measured on the 2-core
#: dev machine: 1 thread is fastest at 65536, 2 threads at 131072 (BENCHMARKS.md).
SORT_BLOCK = 1 << 16
#: floats per column block for Gram / distance passes: small enough that the centred /
#: shifted temporary (n x 65536 floats) stays in cache; per-block results are summed in float64.
DIST_BLOCK = 1 << 16
#: columns per float32 block of the uncentred Gram in :func:`pairwise_sq_dists_bounded`: its
#: error bound grows linearly with it (gamma ~ 4.9e-4 at 8192); the kernel
#: (:mod:`carefl.robust.gram`) is fastest here at 8192 (0.030 s; 0.033 s at 16384).
BOUNDED_BLOCK = 1 << 13
#: up to this many rows, columns go through an elementwise min/max comparator network
#: (see :mod:`carefl.robust.networks`; several times faster than ``torch.sort`` along dim 0 on
#: CPU); above it ``torch.sort``.
NETWORK_MAX_N = 40


def column_blocks(d: int, block: int) -> Iterator[slice]:
    """Consecutive column slices of width ``block`` covering ``range(d)``."""
    for start in range(0, d, block):
        yield slice(start, min(start + block, d))


def _centred_gram(x: Tensor) -> Tensor:
    """Gram matrix ``(n, n)`` float64 of the rows of ``x`` ``(n, d)``, each column block of
    ``DIST_BLOCK`` columns shifted by its column mean first (into a reused buffer): one float32
    GEMM per block, blocks summed in float64."""
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    block_gram = torch.empty(n, n, dtype=x.dtype)
    shifted = torch.empty(n, min(DIST_BLOCK, d), dtype=x.dtype)
    for cols in column_blocks(d, DIST_BLOCK):
        block = x[:, cols]
        block = torch.sub(block, block.mean(dim=0), out=shifted[:, : cols.stop - cols.start])
        gram += torch.mm(block, block.T, out=block_gram)
    return gram


def _dists_from_gram(gram: Tensor) -> Tensor:
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    return dist.fill_diagonal_(0.0)


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Squared L2 distances ``(n, n)`` float64 between the rows of ``x`` ``(n, d)``, accurate
    even when the rows share a large component.

    ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`` on a Gram matrix built block by block, each
    block centred on its column mean first (distances are translation invariant; centring
    removes the shared component that would otherwise cancel catastrophically in float32).
    Negative round-off is clamped to 0; the diagonal is 0.
    """
    return _dists_from_gram(_centred_gram(x))


#: float32 unit round-off
_U32 = 2.0**-24


def pairwise_sq_dists_bounded(x: Tensor) -> tuple[Tensor, Tensor]:
    """Squared L2 distances ``(n, n)`` float64 from the *uncentred* Gram, with a rigorous bound
    ``(n, n)`` on their error: ``|dist_ij - D_ij| <= err_ij``, ``D`` the exact distances of the
    float32 rows. ``x`` must be float32. One pass of the hand-written kernel
    (:func:`carefl.robust.gram.gram`): 0.03 s for 20 x 7.03M on one thread, against 0.14 s for
    :func:`pairwise_sq_dists`.

    Bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1): a float32 dot product
    of c terms, in any summation order, errs by at most ``gamma_c * sum_k |a_k b_k|`` with
    ``gamma_c = c u / (1 - c u)``, ``u = 2^-24``. Per block c <= BOUNDED_BLOCK; summed over
    blocks, ``sum_k |a_k b_k| <= ||a|| ||b||`` (Cauchy-Schwarz), and the float64 sums add
    < 1e-12 of that.
    ``D_ij = N_i + N_j - 2 G_ij`` (N: squared norms) then errs by at most
    ``gamma (sqrt N_i + sqrt N_j)^2``; the computed ``N`` is at least ``(1 - gamma) N``, and a
    1e-6 relative margin covers the float64 terms. Cancellation shows as a large bound: the
    error is relative to the norms, not to the distance.
    """
    gram = gram_matrix(x, BOUNDED_BLOCK)
    dist = _dists_from_gram(gram)
    c = min(BOUNDED_BLOCK, x.shape[1]) + 1  # + 1: spare (the kernel sums each block in float32)
    gamma = c * _U32 / (1 - c * _U32)
    norms = (gram.diagonal().clamp_min(0.0) / (1 - gamma)).sqrt()
    err = (norms[:, None] + norms[None, :]).square_().mul_(gamma * (1 + 1e-6))
    return dist, err.fill_diagonal_(0.0)


def dists_to(x: Tensor, v: Tensor) -> Tensor:
    """L2 distances ``(n,)`` float64 from each row of ``x`` ``(n, d)`` to ``v`` ``(d,)``."""
    n, d = x.shape
    acc = torch.zeros(n, dtype=torch.float64)
    for cols in column_blocks(d, DIST_BLOCK):
        acc += torch.linalg.vector_norm(x[:, cols] - v[cols], dim=1).double().square()
    return acc.sqrt()


def sort_block(d: int) -> int:
    """Columns per block for :func:`ordered_blocks` on d columns (callers size scratch with it)."""
    return min(SORT_BLOCK * min(torch.get_num_threads(), 4), d)


def ordered_blocks(
    x: Tensor, ranks: tuple[int, ...] = (), splits: tuple[int, ...] = (), rows: Tensor | None = None
) -> Iterator[tuple[slice, list[Tensor]]]:
    """Order statistics of the columns of ``x[rows]`` ``(m, d)`` (all rows if ``rows`` is None),
    one column block at a time.

    Yields ``(cols, wires)``: ``wires`` is a list of m ``(c,)`` tensors, the block's columns after
    :func:`~carefl.robust.networks.selection_network` ``(m, ranks, splits)``, so ``wires[r]`` is
    the r-th smallest value of each column for ``r`` in ``ranks`` and ``wires[:k]`` hold the k
    smallest for ``k`` in ``splits``. Above ``NETWORK_MAX_N`` rows the block is fully sorted
    with ``torch.sort`` instead (which keeps both promises).

    Blocks are ``sort_block(d)`` columns wide. The wires live in one ``(m + 1, sort_block(d))``
    workspace reused for the next block: read them before advancing. Comparators write with
    ``out=`` into the spare row and swap references, so no memory is allocated per block.
    """
    d = x.shape[1]
    row_ids = list(range(x.shape[0])) if rows is None else rows.tolist()
    m = len(row_ids)
    if m > NETWORK_MAX_N:
        for cols in column_blocks(d, sort_block(d)):
            block = x[:, cols] if rows is None else x[rows, cols]
            yield cols, list(block.sort(dim=0).values.unbind(0))
        return
    network = selection_network(m, tuple(sorted(set(ranks))), tuple(sorted(set(splits))))
    workspace = torch.empty(m + 1, sort_block(d), dtype=x.dtype)
    for cols in column_blocks(d, sort_block(d)):
        wires = list(workspace[:, : cols.stop - cols.start].unbind(0))
        spare = wires.pop()
        for wire, r in zip(wires, row_ids):
            wire.copy_(x[r, cols])
        for i, j in network:
            lo, hi = wires[i], wires[j]
            torch.minimum(lo, hi, out=spare)
            torch.maximum(lo, hi, out=hi)
            wires[i], spare = spare, lo
        yield cols, wires


def median_ranks(m: int) -> tuple[int, int]:
    """The two middle ranks of m values (equal when m is odd)."""
    return (m - 1) // 2, m // 2
