"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018) over Multi-Krum selection."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.krum import krum_scores
from carefl.robust.linalg import SORT_BLOCK, column_blocks, median_of_sorted, sort_columns


class Bulyan(Rule):
    """1. Selection: the ``theta = n - 2f`` updates with the lowest Krum scores (Krum scores
    computed once on all n, as in Flower and El Mhamdi et al.'s AggregaThor).
    2. Per coordinate: the mean of the ``beta = theta - 2f`` selected values closest to the
    coordinate-wise median of the selected values.
    Needs ``n >= 4f + 3``. Ignores claimed example counts.

    scores: Krum score. selected: in the theta-set of step 1.

    Step 2 works on sorted columns: the ``beta`` values closest to the median form a
    contiguous window of the sorted column, found by counting the window slides that bring a
    closer value in (duplicate values are handled exactly).
    """

    def __init__(self, f: int = 0):
        self.f = f

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n, d = updates.shape
        theta = n - 2 * self.f
        beta = theta - 2 * self.f
        scores = krum_scores(updates, self.f)
        chosen = torch.argsort(scores, stable=True)[:theta]
        selected = torch.zeros(n, dtype=torch.bool)
        selected[chosen] = True
        chosen = chosen.sort().values
        update = torch.empty(d, dtype=updates.dtype)
        for cols in column_blocks(d, SORT_BLOCK):
            s = sort_columns(updates[chosen, cols])
            # sliding the window right by one swaps s[a] out for s[a + beta]; it helps iff
            # s[a + beta] is closer to the median. |s - med| is V-shaped along the sorted column,
            # so the helpful slides form a prefix and the best start is their count. Compared in
            # float64, where differences of float32 values are exact (no float32 near-ties).
            s64 = s.double()
            med = median_of_sorted(s64)
            best_start = torch.zeros(s.shape[1], dtype=torch.long)
            for a in range(theta - beta):
                best_start += (s64[a + beta] - med).abs() < (s64[a] - med).abs()
            rows = best_start + torch.arange(beta)[:, None]
            update[cols] = s.gather(0, rows).mean(dim=0)
        return AggResult(update, scores, selected)
