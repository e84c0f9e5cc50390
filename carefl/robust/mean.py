"""(Weighted) mean — FedAvg's rule, with claimed example counts capped."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import dists_to


class WeightedMean(Rule):
    """Mean of the updates, optionally weighted by claimed example counts.

    weighted=True: hospital i gets weight ``min(c_i, median(c)) / sum_j min(c_j, median(c))``
    where ``c`` are the claimed example counts and the median of an even count is the mean of
    the two middle claims. A hospital claiming 10^9 examples therefore
    weighs no more than the median hospital: a lie about size cannot buy more than one
    "typical" share (honest hospitals above the median are capped too — the price of not
    trusting unverifiable claims). weighted=False: uniform ``1/n``.

    Not robust: one arbitrary update moves the mean arbitrarily (``strategy.f`` is ignored).

    scores: L2 distance of each update to the mean. selected: weight > 0.
    """

    def __init__(self, weighted: bool = True):
        self.weighted = weighted

    def capped_weights(self, weights: Tensor) -> Tensor:
        """Normalised weights ``(n,)`` float64 from claims ``(n,)`` (see class docstring)."""
        n = weights.shape[0]
        if not self.weighted:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        claims = weights.double().clamp_min(0.0)
        capped = claims.clamp_max(torch.quantile(claims, 0.5))
        if capped.sum() <= 0:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        return capped / capped.sum()

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        w = self.capped_weights(weights)
        update = w.to(updates.dtype) @ updates
        return AggResult(update, dists_to(updates, update), w > 0)
