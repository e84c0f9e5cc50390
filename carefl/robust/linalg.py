"""Memory-bounded primitives on the update matrix ``X`` float32 ``(n, d)``.

No ``(n, n, d)`` tensor and no full ``(n, d)`` temporary is ever built: distances go through a
Gram matrix accumulated over column blocks, order statistics are taken block by block.
For DenseNet121 (d = 7.03M) and n = 20 the matrix itself is 562 MB; the extra memory here is a
few MB.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

#: floats per column block for order statistics: n x 16384 x 4 bytes stays in L2 cache for
#: n ~ 20, which is what makes the sorting network below fast.
SORT_BLOCK = 16384
#: floats per column block for Gram / distance passes: small enough that the centred /
#: shifted temporary (n x 65536 floats) stays in cache; per-block results are summed in float64.
DIST_BLOCK = 1 << 16
#: up to this many rows, columns are sorted with an elementwise min/max sorting network
#: (about 8x faster than ``torch.sort`` along dim 0 on CPU); above it ``torch.sort``.
NETWORK_MAX_N = 40


def column_blocks(d: int, block: int) -> Iterator[slice]:
    """Consecutive column slices of width ``block`` covering ``range(d)``."""
    for start in range(0, d, block):
        yield slice(start, min(start + block, d))


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Squared L2 distances ``(n, n)`` float64 between the rows of ``x`` ``(n, d)``.

    ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`` on a Gram matrix built block by block, each
    block centred on its column mean first (distances are translation invariant; centring
    removes the shared component that would otherwise cancel catastrophically in float32).
    Block Grams are summed in float64. Negative round-off is clamped to 0; the diagonal is 0.
    """
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for cols in column_blocks(d, DIST_BLOCK):
        block = x[:, cols]
        block = block - block.mean(dim=0, keepdim=True)
        gram += (block @ block.T).double()
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def dists_to(x: Tensor, v: Tensor) -> Tensor:
    """L2 distances ``(n,)`` float64 from each row of ``x`` ``(n, d)`` to ``v`` ``(d,)``."""
    n, d = x.shape
    acc = torch.zeros(n, dtype=torch.float64)
    for cols in column_blocks(d, DIST_BLOCK):
        acc += torch.linalg.vector_norm(x[:, cols] - v[cols], dim=1).double().square()
    return acc.sqrt()


@functools.lru_cache(maxsize=None)
def _batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for ``n`` inputs.

    Built for the next power of two with +inf padding; comparators touching a padding
    position never swap (the +inf stays above), so they are dropped.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_columns(block: Tensor) -> Tensor:
    """``block`` ``(n, c)`` sorted ascending along dim 0 (each column independently)."""
    n = block.shape[0]
    if n > NETWORK_MAX_N:
        return block.sort(dim=0).values
    rows = list(block.unbind(0))
    for i, j in _batcher_network(n):
        lo, hi = rows[i], rows[j]
        rows[i], rows[j] = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return torch.stack(rows)


def median_of_sorted(s: Tensor) -> Tensor:
    """Median ``(c,)`` of columns already sorted along dim 0 (mean of the two middles if even)."""
    n = s.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) * 0.5
