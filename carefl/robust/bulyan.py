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
    contiguous window of the sorted column; of the ``2f + 1`` windows, the one whose farther
    end is nearest the median is taken.
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
            med = median_of_sorted(s)
            best_start = torch.zeros(s.shape[1], dtype=torch.long)
            best_reach = torch.maximum(med - s[0], s[beta - 1] - med)
            for a in range(1, theta - beta + 1):
                reach = torch.maximum(med - s[a], s[a + beta - 1] - med)
                better = reach < best_reach
                best_start[better] = a
                best_reach = torch.where(better, reach, best_reach)
            rows = best_start + torch.arange(beta)[:, None]
            update[cols] = s.gather(0, rows).mean(dim=0)
        return AggResult(update, scores, selected)
