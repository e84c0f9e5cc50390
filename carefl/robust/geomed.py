"""Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla, Kakade, Harchaoui 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import dists_to


class GeometricMedian(Rule):
    """``argmin_v sum_i max(eps, ||v - x_i||)`` — the smoothed geometric median, uniform
    weights (claimed example counts ignored). Tolerates f < n/2.

    Weiszfeld step: ``b_i = 1 / max(eps, ||v - x_i||)``, ``v <- sum_i b_i x_i / sum_i b_i``,
    from the mean, until the objective improves by less than ``tol`` (relative) or after
    ``max_iter`` steps. Each step is two passes over the update matrix.

    eps: smoothing (same unit as the updates: L2 norm). scores: L2 distance to the
    geometric median. selected: all True (every hospital keeps a weight, inversely
    proportional to its distance).
    """

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-6):
        self.eps, self.max_iter, self.tol = eps, max_iter, tol

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n = updates.shape[0]
        v = updates.mean(dim=0)
        dist = dists_to(updates, v)
        objective = dist.sum().item()
        for _ in range(self.max_iter):
            b = 1.0 / dist.clamp_min(self.eps)
            v = (b / b.sum()).to(updates.dtype) @ updates
            dist = dists_to(updates, v)
            previous, objective = objective, dist.sum().item()
            if previous - objective <= self.tol * previous:
                break
        return AggResult(v, dist, torch.ones(n, dtype=torch.bool))
