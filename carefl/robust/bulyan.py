"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018) over Multi-Krum selection."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.krum import krum_selection
from carefl.robust.linalg import median_ranks, ordered_blocks, sort_block


class Bulyan(Rule):
    """1. Selection: the ``theta = n - 2f`` updates with the lowest Krum scores (Krum scores
    computed once on all n, as in Flower and El Mhamdi et al.'s AggregaThor).
    2. Per coordinate: the mean of the ``beta = theta - 2f`` selected values closest to the
    coordinate-wise median of the selected values.
    Needs ``n >= 4f + 3``. Ignores claimed example counts.

    scores: Krum score. selected: in the theta-set of step 1.

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
        scores, chosen, selected = krum_selection(updates, self.f, theta)
        m1, m2 = median_ranks(theta)
        edge = [r for r in range(theta) if r < g or r >= beta]  # rows whose inclusion varies
        width = sort_block(d)
        pair_sums = torch.empty(2, width, dtype=torch.float64)
        slides = torch.empty(g, width, dtype=updates.dtype)  # h_j as 0./1.
        update = torch.empty(d, dtype=updates.dtype)
        for cols, s in ordered_blocks(updates, ranks=(*edge, m1, m2), rows=chosen.sort().values):
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
