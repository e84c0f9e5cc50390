"""Memory-bounded primitives on the update matrix ``X`` float32 ``(n, d)``.

No ``(n, n, d)`` tensor and no full ``(n, d)`` temporary is ever built: distances go through a
Gram matrix accumulated over column blocks, order statistics are taken block by block.
For DenseNet121 (d = 7.03M) and n = 20 the matrix itself is 562 MB; the extra memory here is a
few MB.

Pairwise distances come at three accuracies, each with its cost for 20 x 7.03M on one thread:
:func:`pairwise_sq_dists_bounded` (uncentred float32 Gram, error bound relative to the row
norms, 0.03 s), :func:`pairwise_sq_dists` (float64 Gram of the rows shifted by one row, error
bound ~1e-12 relative to the distances near that row, 0.09 s) and :func:`exact_dots` (exact
integer dot products, 0.017 s per pair). :class:`carefl.robust.krum.KrumDistances` uses them in
that order, each only where the previous one cannot decide.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit
from torch import Tensor

from carefl.robust.gram import _tile
from carefl.robust.gram import gram as gram_matrix
from carefl.robust.networks import selection_network

#: columns per order-statistics block and torch thread (up to 4 threads): with n ~ 20 rows the
#: (n + 1) x 65536 float32 workspace (5.5 MB) stays in L2/L3, and each comparator op is long
#: enough (65536 floats per thread) to amortise torch's per-op dispatch. Measured on the 2-core
#: dev machine: 1 thread is fastest at 65536, 2 threads at 131072 (BENCHMARKS.md).
SORT_BLOCK = 1 << 16
#: floats per column block for :func:`dists_to`: small enough that the shifted temporary
#: (n x 65536 floats) stays in cache; per-block results are summed in float64.
DIST_BLOCK = 1 << 16
#: columns per block of the float64 centred Gram in :func:`pairwise_sq_dists`: the shifted
#: float64 block (n x 8192, 1.3 MB for n = 20) stays in cache; its error bound grows with it
#: (gamma ~ 1e-12 at d = 7M). 0.09-0.10 s for 20 x 7.03M at 4096-16384 on the loaded dev machine.
CENTRED_BLOCK = 1 << 13
#: columns per float32 block of the uncentred Gram in :func:`pairwise_sq_dists_bounded`: its
#: error bound grows linearly with it (gamma ~ 4.9e-4 at 8192); the kernel
#: (:mod:`carefl.robust.gram`) is fastest here at 8192 (0.030 s; 0.033 s at 16384).
BOUNDED_BLOCK = 1 << 13
#: up to this many rows, columns go through an elementwise min/max comparator network
#: (see :mod:`carefl.robust.networks`; several times faster than ``torch.sort`` along dim 0 on
#: CPU); above it ``torch.sort``.
NETWORK_MAX_N = 40


#: float64 unit round-off
_U64 = 2.0**-53
#: :func:`exact_dots` returns integers in units of 2^-EXACT_SHIFT: every float32 is an integer
#: multiple of 2^-149, so every product of two is a multiple of 2^-298.
EXACT_SHIFT = 298


def column_blocks(d: int, block: int) -> Iterator[slice]:
    """Consecutive column slices of width ``block`` covering ``range(d)``."""
    for start in range(0, d, block):
        yield slice(start, min(start + block, d))


def _dists_from_gram(gram: Tensor) -> Tensor:
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    return dist.fill_diagonal_(0.0)


@njit(nogil=True)
def _centre_row(xi, ci, yi):
    """``yi[k] = float64(xi[k]) - float64(ci[k])``, one rounding (no fastmath: nothing may be
    reassociated or contracted here)."""
    for k in range(xi.shape[0]):
        yi[k] = np.float64(xi[k]) - np.float64(ci[k])


@njit(nogil=True)
def _lower_centred_gram(x, rows, centre, lo, hi, block):
    """Lower triangle of the float64 Gram of ``x[rows, lo:hi] - x[centre, lo:hi]``: each column
    block of ``block`` columns is centred into a float64 buffer, then multiplied by 4 x 4 tiles;
    block results are added in float64."""
    n = rows.shape[0]
    g = np.zeros((n, n))
    out = np.empty((4, 4))
    y = np.empty((n, block))
    last = n - 1
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        w = stop - start
        c = x[centre, start:stop]
        for i in range(n):
            _centre_row(x[rows[i], start:stop], c, y[i, :w])
        for i0 in range(0, n, 4):
            a0, a1 = y[i0, :w], y[min(i0 + 1, last), :w]
            a2, a3 = y[min(i0 + 2, last), :w], y[min(i0 + 3, last), :w]
            for j0 in range(0, i0 + 1, 4):
                b0, b1 = y[j0, :w], y[min(j0 + 1, last), :w]
                b2, b3 = y[min(j0 + 2, last), :w], y[min(j0 + 3, last), :w]
                _tile(a0, a1, a2, a3, b0, b1, b2, b3, out)
                for p in range(min(4, n - i0)):
                    for q in range(min(4, i0 + p - j0 + 1)):
                        g[i0 + p, j0 + q] += out[p, q]
    return g


def _centred_gram(x: Tensor, centre: int, rows: list[int]) -> Tensor:
    """Gram matrix ``(len(rows), len(rows))`` float64 of the rows ``rows`` of ``x`` float32
    ``(n, d)`` minus row ``centre``, differences and products in float64 (bound in
    :func:`pairwise_sq_dists_error`). Columns are split into up to ``torch.get_num_threads()``
    ranges of whole blocks, one Python thread each (the kernel releases the GIL), partial Grams
    added in float64."""
    if x.dtype != torch.float32:
        raise TypeError(f"pairwise_sq_dists: expects the float32 update matrix, got {x.dtype}")
    data = x.detach().contiguous().numpy()
    index = np.asarray(rows, dtype=np.int64)
    d = data.shape[1]
    block = min(CENTRED_BLOCK, max(d, 1))
    threads = max(1, min(torch.get_num_threads(), -(-d // block)))
    span = -(-d // threads)
    span = -(-span // block) * block  # whole blocks per thread, as the bound counts them
    starts = range(0, d, span)
    if len(starts) <= 1:
        lower = _lower_centred_gram(data, index, centre, 0, d, block)
    else:
        with ThreadPoolExecutor(len(starts)) as pool:
            parts = pool.map(lambda s: _lower_centred_gram(data, index, centre, s, min(s + span, d), block), starts)
            lower = sum(parts)
    lower = torch.from_numpy(lower)
    return lower + lower.tril(-1).T


def central_row(x: Tensor) -> int:
    """A row near the middle of the others: the one whose ``(n - 1) // 2`` nearest other rows
    are closest in total, by the uncentred distances of :func:`pairwise_sq_dists_bounded`.
    With fewer than half the rows far away it is near the bulk; any row gives exact
    distances, this one gives small error bounds."""
    n = x.shape[0]
    if n <= 2:
        return 0
    dist, _ = pairwise_sq_dists_bounded(x)
    dist.fill_diagonal_(float("inf"))
    return int(dist.topk((n - 1) // 2, dim=1, largest=False).values.sum(1).argmin())


def pairwise_sq_dists(x: Tensor, centre: int | None = None, rows: list[int] | None = None) -> Tensor:
    """Squared L2 distances ``(m, m)`` float64 between the rows ``rows`` (default all n) of ``x``
    float32 ``(n, d)``, accurate even when the rows share a large component or a few rows are
    huge.

    Distances are translation invariant, so each row is first shifted by row ``centre``
    (default :func:`central_row`; it must be one of ``rows``): ``y_i = x_i - x_centre`` in
    float64, then ``||y_i||^2 + ||y_j||^2 - 2 y_i.y_j`` from their float64 Gram. The error is
    relative to ``(||y_i|| + ||y_j||)^2`` (:func:`pairwise_sq_dists_error`, about 1e-12 of it
    for d = 7M): shifting by a row in the bulk, not by the column mean (which a few huge rows
    drag away), keeps that close to the distances themselves. Negative round-off is clamped
    to 0; the diagonal is 0. Row ``centre`` is shifted to exactly 0, so its column holds the
    computed ``||y_i||^2``. 0.09 s for 20 x 7.03M on one thread (time grows with the number of
    rows; plus 0.03 s for :func:`central_row` when ``centre`` is None); numba compiles the
    kernel at first use (~1 s).
    """
    rows = list(range(x.shape[0])) if rows is None else list(rows)
    if centre is None:
        centre = rows[central_row(x[rows])] if len(rows) < x.shape[0] else central_row(x)
    if centre not in rows:
        raise ValueError(f"pairwise_sq_dists: centre {centre} is not among rows {rows}")
    return _dists_from_gram(_centred_gram(x, centre, rows))


def pairwise_sq_dists_error(dist: Tensor, centre: int, d: int) -> Tensor:
    """A rigorous bound ``(m, m)`` on ``|dist_ij - D_ij|`` for ``dist = pairwise_sq_dists(x,
    rows[centre], rows)``, ``D`` the exact squared distances of those float32 rows, ``d``
    columns; ``centre`` is the centre's position in ``rows``.

    Proof (Higham, *Accuracy and Stability of Numerical Algorithms*, 2.2 and 3.1; u = 2^-53):
    ``y_ik = fl(x_ik - x_ck) = (x_ik - x_ck)(1 + e)``, ``|e| <= u``. The Gram entry is a sum of
    d products ``y_ik y_jk`` formed in an order the compiler picks within each block of
    c <= CENTRED_BLOCK columns (reassociation, fused multiply-adds), then added block by block
    and thread range by thread range, each of the nb blocks and at most nb ranges one more
    float64 addition: every product passes through at most ``M = c + 2 nb + 3`` roundings
    (the two differences included), so ``|G~_ij - G_ij| <= gamma_M sum_k |y_ik y_jk| <=
    gamma_M |y_i| |y_j|`` with ``gamma_M = M u / (1 - M u)``. ``D = N_i + N_j - 2 G_ij``
    (N: squared norms) takes two more roundings, so ``|dist_ij - D_ij| <= gamma_{M+3} (|y_i| +
    |y_j|)^2``; clamping at 0 only moves towards D >= 0. ``|y_i|^2 = N_i <= dist[i, centre] /
    (1 - gamma)`` (row ``centre`` is shifted to exactly 0, so ``dist[i, centre]`` is the
    computed ``N_i``). The bound returned uses ``gamma = gamma_{M+7}``: the 4 spare roundings
    cover the float64 evaluation of the bound and of ``dist - err`` / ``dist + err``, so those,
    as computed, still enclose D (a 1e-6 relative margin on top).
    """
    block = min(CENTRED_BLOCK, max(d, 1))
    nb = -(-d // block)
    big_m = block + 2 * nb + 10
    gamma = big_m * _U64 / (1 - big_m * _U64)
    norms = (dist[:, centre].clamp_min(0.0) / (1 - gamma)).sqrt()
    err = (norms[:, None] + norms[None, :]).square_().mul_(gamma * (1 + 1e-6))
    return err.fill_diagonal_(0.0)


#: float32 unit round-off
_U32 = 2.0**-24


def pairwise_sq_dists_bounded(x: Tensor) -> tuple[Tensor, Tensor]:
    """Squared L2 distances ``(n, n)`` float64 from the *uncentred* Gram, with a rigorous bound
    ``(n, n)`` on their error: ``|dist_ij - D_ij| <= err_ij``, ``D`` the exact distances of the
    float32 rows. ``x`` must be float32. One pass of the hand-written kernel
    (:func:`carefl.robust.gram.gram`): 0.03 s for 20 x 7.03M on one thread, against 0.09 s for
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


@njit(nogil=True)
def _exact_dot_bins(a, b, bins) -> bool:
    """Add ``a . b`` exactly into ``bins`` (int64): ``a``, ``b`` are float32 rows viewed as int32
    bits. Each value is ``+-m 2^(e - 150)`` with an integer ``m < 2^24`` (e = 1 for subnormals),
    so each product is a 48-bit integer times ``2^(ea + eb - 300)``: its low 24 bits go to bin
    ``ea + eb - 2`` and the rest (floor, so negative products stay exact) 24 bins up, bin t
    counting in units of ``2^(t - EXACT_SHIFT)``. Every addition is below 2^24 in magnitude, so
    no bin overflows before 2^39 additions. False (and nothing trustworthy) if a value is
    Inf or NaN."""
    for k in range(a.shape[0]):
        u = a[k]
        v = b[k]
        eu = (u >> 23) & 0xFF
        ev = (v >> 23) & 0xFF
        if eu == 0xFF or ev == 0xFF:
            return False
        mu = np.int64(u & 0x7FFFFF)
        mv = np.int64(v & 0x7FFFFF)
        if eu == 0:
            eu = 1
        else:
            mu |= 0x800000
        if ev == 0:
            ev = 1
        else:
            mv |= 0x800000
        p = mu * mv
        if p == 0:
            continue
        if (u ^ v) < 0:
            p = -p
        t = eu + ev - 2
        bins[t] += p & 0xFFFFFF
        bins[t + 24] += p >> 24
    return True


def exact_dots(x: Tensor, pairs: list[tuple[int, int]]) -> list[int]:
    """The exact dot products ``x[i] . x[j]`` of float32 rows, for each ``(i, j)`` in ``pairs``,
    as Python integers in units of ``2^-EXACT_SHIFT`` (no rounding anywhere: integer products
    into exponent bins, :func:`_exact_dot_bins`, then the bins summed as Python integers).
    Pairs run in up to ``torch.get_num_threads()`` threads; 0.017 s per pair at d = 7.03M.
    Raises ValueError on a non-finite value (the server never aggregates one)."""
    if x.dtype != torch.float32:
        raise TypeError(f"exact_dots: expects the float32 update matrix, got {x.dtype}")
    bits = [x[i].detach().contiguous().numpy().view(np.int32) for i in range(x.shape[0])]

    def one(pair: tuple[int, int]) -> int:
        bins = np.zeros(2 * 254 + 24, dtype=np.int64)
        if not _exact_dot_bins(bits[pair[0]], bits[pair[1]], bins):
            raise ValueError(f"exact_dots: row {pair[0]} or {pair[1]} holds Inf or NaN")
        return sum(int(bins[t]) << int(t) for t in np.flatnonzero(bins))

    threads = max(1, min(torch.get_num_threads(), len(pairs)))
    if threads == 1:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, pairs))


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
