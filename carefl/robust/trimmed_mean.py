"""Coordinate-wise trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import ordered_blocks, sort_block


def trim_count(n: int, f: int, beta: float | None) -> int:
    """Values dropped per side: ``f`` if ``beta`` is None, else ``floor(beta * n)``."""
    return f if beta is None else math.floor(beta * n + 1e-9)


class TrimmedMean(Rule):
    """Per coordinate, drop the ``k`` smallest and ``k`` largest values and average the
    remaining ``n - 2k``. ``k = f`` by default, or ``floor(beta * n)`` when ``beta`` is set
    (then ``check_assumptions`` insists ``k >= f``). Ignores claimed example counts.

    scores: fraction of coordinates in which the hospital's value was trimmed (an honest
    hospital expects about ``2k/n``; an outlier is trimmed nearly everywhere).
    selected: trimmed in at most half of the coordinates.
    """

    def __init__(self, f: int = 0, beta: float | None = None):
        self.f, self.beta = f, beta

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n, d = updates.shape
        k = trim_count(n, self.f, self.beta)
        update = torch.empty(d, dtype=updates.dtype)
        trimmed = torch.zeros(n, dtype=torch.float64)
        flags = torch.empty(n, sort_block(d), dtype=updates.dtype)  # 0./1.: float ops beat bool ones
        # wires k..n-k-1 end up holding the kept values; wires k and n-k-1 the extreme kept ones
        for cols, wires in ordered_blocks(updates, ranks=(k, n - k - 1), splits=(k, n - k)):
            kept = update[cols].copy_(wires[k])
            for wire in wires[k + 1 : n - k]:
                kept.add_(wire)
            kept.div_(n - 2 * k)
            if k:
                block, flag = updates[:, cols], flags[:, : cols.stop - cols.start]
                trimmed += torch.lt(block, wires[k], out=flag).sum(dim=1)
                trimmed += torch.gt(block, wires[n - k - 1], out=flag).sum(dim=1)
        frac = trimmed / d
        return AggResult(update, frac, frac <= 0.5)
