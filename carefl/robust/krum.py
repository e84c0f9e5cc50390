"""Krum and Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import pairwise_sq_dists


def krum_scores(updates: Tensor, f: int) -> Tensor:
    """Krum score ``(n,)`` float64: for each update, the sum of squared L2 distances to its
    ``n - f - 2`` nearest other updates. Needs ``n > 2f + 2`` (checked by
    ``check_assumptions``; never clamped here)."""
    n = updates.shape[0]
    dist = pairwise_sq_dists(updates)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1)


class MultiKrum(Rule):
    """Average (uniform — claims ignored) of the ``m`` updates with the lowest Krum scores.
    ``m = None`` means ``n - f``. Tolerates f with ``n > 2f + 2``.

    scores: Krum score (sum of squared distances to the n-f-2 nearest neighbours).
    selected: among the m lowest scores (ties broken by index).
    """

    def __init__(self, f: int = 0, m: int | None = None):
        self.f, self.m = f, m

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n = updates.shape[0]
        scores = krum_scores(updates, self.f)
        m = n - self.f if self.m is None else self.m
        chosen = torch.argsort(scores, stable=True)[:m]
        selected = torch.zeros(n, dtype=torch.bool)
        selected[chosen] = True
        if m == 1:
            return AggResult(updates[chosen[0]].clone(), scores, selected)
        # a weight vector, not updates[chosen].mean(0): no (m, d) copy of the selected rows
        return AggResult((selected.to(updates.dtype) / m) @ updates, scores, selected)


class Krum(MultiKrum):
    """Krum: the single update with the lowest Krum score (Multi-Krum with m = 1)."""

    def __init__(self, f: int = 0):
        super().__init__(f=f, m=1)
