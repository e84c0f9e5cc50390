"""Coordinate-wise median (Yin et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import dists_to, median_ranks, ordered_blocks


def coordinate_median(updates: Tensor) -> Tensor:
    """``(d,)``: per column of ``updates`` ``(n, d)``, the median (mean of the two middle values
    when n is even, as ``numpy.median``), in the updates' dtype."""
    n, d = updates.shape
    lo, hi = median_ranks(n)
    median = torch.empty(d, dtype=updates.dtype)
    for cols, wires in ordered_blocks(updates, ranks=(lo, hi)):
        torch.add(wires[lo], wires[hi], out=median[cols]).mul_(0.5)
    return median


class CoordinateMedian(Rule):
    """``update[k] = median_i updates[i, k]`` (mean of the two middle values when n is even,
    as ``numpy.median``). Tolerates f < n/2. Ignores claimed example counts.

    scores: L2 distance of each update to the median. selected: all True (a coordinate-wise
    rule excludes no hospital as a whole).
    """

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        update = coordinate_median(updates)
        return AggResult(update, dists_to(updates, update), torch.ones(updates.shape[0], dtype=torch.bool))
