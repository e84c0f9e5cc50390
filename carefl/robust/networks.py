"""Comparator networks: sorting and partial-sorting (selection / partition) networks.

A comparator ``(i, j)``, ``i < j``, puts ``min`` on wire ``i`` and ``max`` on wire ``j``. On
columns of the update matrix every comparator is two elementwise torch ops over a whole block
of coordinates, so the number of comparators *is* the cost of an order-statistic rule.

Guarantee (0-1 principle, Knuth TAOCP vol. 3, 5.3.4, Theorem Z, extended to selection): a
network puts the r-th smallest input on wire r for *all* real inputs iff it does so for all
2**n inputs in {0, 1}**n; likewise "wires 0..k-1 hold the k smallest values" (max of those
wires <= min of the rest). Proof sketch: min/max commute with every monotone map g; if wire r
got y_r > v_r (the true r-th value) on some input, g(t) = [t >= y_r] gives a 0-1 input with at
least r+1 zeros on which wire r reads 1. The same threshold argument shows a partition
violation y_a > y_b (a < k <= b) survives as a 0-1 violation.

:func:`selection_network` drops comparators from Batcher's sorting network one at a time,
keeping a drop only if the requirement still holds on every 0-1 input (exhaustive check,
bit-packed: 2**20 inputs for n = 20 in a fraction of a second). For n = 20 the median needs 73
comparators instead of 103, a trimmed mean with k = 2 needs 62. Above ``PRUNE_MAX_N`` inputs
the exhaustive check would be too slow, and Batcher's full (correct, unpruned) network is used.
Written by hand: no maintained Python library builds selection networks.
"""

from __future__ import annotations

import functools

import numpy as np

#: largest n whose network is pruned (2**n 0-1 inputs are checked exhaustively)
PRUNE_MAX_N = 20

Network = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def batcher_network(n: int) -> Network:
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


class _ZeroOneInputs:
    """All 2**n inputs in {0, 1}**n, bit-packed: wire w is a uint8 array whose bit b is input
    b's value on wire w. ``target[r]`` is wire r after a full sort (1 iff the input has at
    least n - r ones)."""

    def __init__(self, n: int):
        index = np.arange(1 << n, dtype=np.uint32)
        bits = [((index >> w) & 1).astype(bool) for w in range(n)]
        ones = np.sum(bits, axis=0)
        self.n = n
        self.wires = [np.packbits(b) for b in bits]
        self.target = [np.packbits(ones >= n - r) for r in range(n)]

    def satisfied(self, network: Network, ranks: tuple[int, ...], splits: tuple[int, ...]) -> bool:
        w = list(self.wires)
        for i, j in network:
            w[i], w[j] = w[i] & w[j], w[i] | w[j]
        if any(not np.array_equal(w[r], self.target[r]) for r in ranks):
            return False
        for k in splits:  # a 1 below the split while a 0 sits above it = violation
            below = np.bitwise_or.reduce(w[:k]) if k else np.zeros_like(w[0])
            above = np.bitwise_and.reduce(w[k:]) if k < self.n else np.full_like(w[0], 255)
            if np.any(below & ~above):
                return False
        return True


@functools.lru_cache(maxsize=None)
def selection_network(n: int, ranks: tuple[int, ...] = (), splits: tuple[int, ...] = ()) -> Network:
    """A comparator network on ``n`` wires such that afterwards, for every input:

    - wire ``r`` holds the r-th smallest value (0-based) for each ``r`` in ``ranks``;
    - wires ``0..k-1`` hold the k smallest values (in some order) for each ``k`` in ``splits``.

    ``ranks = range(n)`` asks for a full sort. Pruned from :func:`batcher_network` and checked
    exhaustively for n <= ``PRUNE_MAX_N`` (see the module docstring); Batcher's full network
    above that. Cached per arguments.
    """
    if any(not 0 <= r < n for r in ranks) or any(not 0 <= k <= n for k in splits):
        raise ValueError(f"ranks {ranks} / splits {splits} out of range for n={n}")
    network = list(batcher_network(n))
    if n > PRUNE_MAX_N or len(ranks) == n:
        return tuple(network)
    inputs = _ZeroOneInputs(n)
    for c in range(len(network) - 1, -1, -1):  # last comparators first: they serve the fewest ranks
        trial = network[:c] + network[c + 1 :]
        if inputs.satisfied(tuple(trial), ranks, splits):
            network = trial
    return tuple(network)
