"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018): recursive Krum selection, then a coordinate-wise
trimmed average around the median."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.krum import KrumDistances
from carefl.robust.linalg import median_ranks, ordered_blocks, sort_block


def bulyan_selection(updates: Tensor, f: int) -> list[int]:
    """The ``theta = n - 2f`` rows Bulyan's step 1 picks, in the order picked.

    Recursive, as published (El Mhamdi, Guerraoui, Rouault, *The Hidden Vulnerability of
    Distributed Learning in Byzantium*, ICML 2018, arXiv:1802.07927): Krum picks one row of the
    remaining set R (initially all n), the row leaves R, and Krum runs again on what is left,
    theta times. Krum on R scores each row by its ``k = max(1, |R| - f - 2)`` nearest rows in R:
    the number Krum uses on |R| rows with f Byzantine, floored at 1, which binds only at f <= 1
    (f = 1: the last pick, |R| = 3; f = 0: every row is picked anyway). Flower's legacy
    ``flwr.server.strategy.aggregate.aggregate_bulyan`` with ``aggregate_krum`` does the same
    (tested equal). Each pick is Krum's exact-arithmetic choice, ties to the lower index
    (:class:`~carefl.robust.krum.KrumDistances`); the distance enclosures are shared by all
    picks, so the recursion costs n x n work per pick on top of one Krum: ~2 ms at n = 20, plus
    the float64 enclosure for the few rows left when a late pick (small k) meets a near-tie
    (+0.02 s at 20 x 7.03M in ``benchmarks/bench_aggregation.py``).

    Why not the one-shot variant (the theta lowest Krum scores on all n, as in Flower 1.41's
    ``flwr.serverapp.strategy.Bulyan`` and CareFL before): it differs from the recursion on
    about half of random inputs (63 of 105 in our check), the paper's guarantee is proved for
    the recursion, and it would save only the time above. So it is not offered.
    """
    n = updates.shape[0]
    distances = KrumDistances(updates)
    remaining, picks = list(range(n)), []
    for _ in range(n - 2 * f):
        pick = distances.select(remaining, max(1, len(remaining) - f - 2), 1)[0]
        picks.append(pick)
        remaining.remove(pick)
    return picks


class Bulyan(Rule):
    """1. Selection: ``theta = n - 2f`` updates by recursive Krum (:func:`bulyan_selection`).
    2. Per coordinate: the mean of the ``beta = theta - 2f`` selected values closest to the
    coordinate-wise median of the selected values.
    Needs ``n >= 4f + 3``. Ignores claimed example counts.

    scores: the position at which step 1 picked the update (0 = first, the most central), and
    theta for the updates it did not pick. selected: picked by step 1.

    Step 2, per column with the selected values sorted ``s[0] <= ... <= s[theta-1]`` and median
    ``med = (s[m1] + s[m2]) / 2``: the beta values closest to ``med`` form a window
    ``s[a : a + beta]``. Sliding the window from a = j to j + 1 swaps ``s[j]`` out for
    ``s[j + beta]``; it brings a closer value in iff ``h_j: s[j] + s[j + beta] < s[m1] + s[m2]``
    (for ``s[j] <= med <= s[j + beta]`` this is ``|s[j + beta] - med| < |s[j] - med|``; when
    both lie on one side of ``med`` the two tests agree, or differ only by swapping equal
    values). ``s[j] + s[j + beta]`` grows with j, so the ``h_j`` are a prefix of Trues and the
    best start is ``a = #{j < 2f : h_j}``: row r is in the window iff ``a <= r`` (i.e.
    ``r >= 2f`` or not ``h_r``) and ``r < a + beta`` (i.e. ``r < beta`` or ``h_{r - beta}``).
    The sums are taken in float64, where a sum of two float32 values is exact unless their
    exponents differ by more than 29 (no float32 near-ties). Only the ranks these formulas read
    are computed (a selection network, not a full sort).
    """

    def __init__(self, f: int = 0):
        self.f = f

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n, d = updates.shape
        theta = n - 2 * self.f
        beta = theta - 2 * self.f
        g = theta - beta  # = 2f possible window starts after 0
        picks = bulyan_selection(updates, self.f)
        scores = torch.full((n,), float(theta), dtype=torch.float64)
        scores[picks] = torch.arange(theta, dtype=torch.float64)
        selected = torch.zeros(n, dtype=torch.bool)
        selected[picks] = True
        m1, m2 = median_ranks(theta)
        edge = [r for r in range(theta) if r < g or r >= beta]  # rows whose inclusion varies
        width = sort_block(d)
        pair_sums = torch.empty(2, width, dtype=torch.float64)
        slides = torch.empty(g, width, dtype=updates.dtype)  # h_j as 0./1.
        update = torch.empty(d, dtype=updates.dtype)
        for cols, s in ordered_blocks(updates, ranks=(*edge, m1, m2), rows=torch.tensor(sorted(picks))):
            c = cols.stop - cols.start
            twice_med, pair = pair_sums[0, :c].copy_(s[m1]).add_(s[m2]), pair_sums[1, :c]
            h = slides[:, :c]
            for j in range(g):
                torch.lt(pair.copy_(s[j]).add_(s[j + beta]), twice_med, out=h[j])
            total = update[cols].zero_()
            for r in range(g, beta):  # in every window; the network left them unordered
                total.add_(s[r])
            for r in edge:  # keep in {0., 1.}: adds exactly the value or 0 (updates are finite)
                keep = 1.0 - h[r] if r < g else h[r - beta]  # a <= r, else r < a + beta
                if r < g and r >= beta:
                    keep = keep * h[r - beta]
                total.addcmul_(keep, s[r])
            total.div_(beta)
        return AggResult(update, scores, selected)
