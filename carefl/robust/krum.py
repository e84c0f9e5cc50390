"""Krum and Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import pairwise_sq_dists, pairwise_sq_dists_bounded


def _scores(dist: Tensor, k: int) -> Tensor:
    """Sum over each row of its k smallest off-diagonal entries."""
    dist = dist.clone().fill_diagonal_(float("inf"))
    return dist.topk(k, dim=1, largest=False).values.sum(dim=1)


def _lowest(scores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Indices ``(m,)`` of the m lowest scores (ties by index) and the same set as a mask ``(n,)``."""
    chosen = torch.argsort(scores, stable=True)[:m]
    selected = torch.zeros(scores.numel(), dtype=torch.bool)
    selected[chosen] = True
    return chosen, selected


def krum_selection(updates: Tensor, f: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Krum scores ``(n,)`` float64, the indices ``(m,)`` of the m lowest (ties by index) and
    the same set as a bool mask ``(n,)``.

    The score of update i is the sum of squared L2 distances to its ``k = n - f - 2`` nearest
    other updates; needs ``n > 2f + 2`` (checked by ``check_assumptions``; never clamped here).

    Certified fast path: distances come first from the uncentred Gram, each within a rigorous
    error bound ``e_ij`` of the exact distance of the float32 updates
    (:func:`pairwise_sq_dists_bounded`). The exact score then lies between the sums of the k
    smallest ``dist_ij - e_ij`` and of the k smallest ``dist_ij + e_ij`` (a sum of k smallest
    values is monotone in every value). If the highest upper bound among the chosen is below
    the lowest lower bound among the rest, the chosen set is the one exact arithmetic would
    choose, and it is returned. Otherwise (rows sharing a large component, or a near-tie at the
    cut) distances are recomputed from the block-centred Gram (:func:`pairwise_sq_dists`).
    """
    n = updates.shape[0]
    k = n - f - 2
    dist, err = pairwise_sq_dists_bounded(updates)
    scores = _scores(dist, k)
    chosen, selected = _lowest(scores, m)
    if m < n and not _scores(dist + err, k)[selected].max() < _scores(dist - err, k)[~selected].min():
        scores = _scores(pairwise_sq_dists(updates), k)
        chosen, selected = _lowest(scores, m)
    return scores, chosen, selected


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
        m = n - self.f if self.m is None else self.m
        scores, chosen, selected = krum_selection(updates, self.f, m)
        if m == 1:
            return AggResult(updates[chosen[0]].clone(), scores, selected)
        # a weight vector, not updates[chosen].mean(0): no (m, d) copy of the selected rows
        return AggResult((selected.to(updates.dtype) / m) @ updates, scores, selected)


class Krum(MultiKrum):
    """Krum: the single update with the lowest Krum score (Multi-Krum with m = 1)."""

    def __init__(self, f: int = 0):
        super().__init__(f=f, m=1)
