"""Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla, Kakade, Harchaoui 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import dists_to


class GeometricMedian(Rule):
    """The smoothed geometric median ``argmin_v sum_i g(||v - x_i||)``, ``g(r) = r`` for
    ``r >= eps`` and ``r^2 / (2 eps) + eps / 2`` below (RFA's smoothing), uniform weights
    (claimed example counts ignored). Tolerates f < n/2.

    Weiszfeld step: ``b_i = 1 / max(eps, ||v - x_i||)``, ``v <- sum_i b_i x_i / sum_i b_i``,
    from the mean. Each step is two passes over the update matrix.

    Stopping rule: after the first step that moves ``v`` by at most ``tol * s``, where ``s``
    is the median distance from the new ``v`` to the updates, or after ``max_iter`` steps.
    With f < n/2 the median distance is set by honest rows, so the rule is relative to the
    honest spread and a few huge-norm rows cannot loosen it (a rule relative to the objective
    can: rows at norm 1e6 make every honest-scale gain look negligible, and the old rule stopped
    2 to 200 honest spreads from the median). What a stop certifies: the gradient of the
    smoothed objective at the previous iterate is ``sum_i b_i * (v_prev - v)``, so its norm is
    at most ``tol * s * sum_i b_i``. Not guaranteed: a distance bound to the exact median
    (the objective is not strongly convex in general, e.g. collinear rows), nor convergence
    within ``max_iter`` steps -- tests/test_metrics_geomed.py measures the distance against a
    long float64 run with outliers at 1e3 to 1e9.

    eps: smoothing (same unit as the updates: L2 norm). tol: dimensionless, relative to the
    honest spread. scores: L2 distance to the geometric median. selected: all True (every
    hospital keeps a weight, inversely proportional to its distance).
    """

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-6):
        self.eps, self.max_iter, self.tol = eps, max_iter, tol

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n = updates.shape[0]
        v = updates.mean(dim=0)
        dist = dists_to(updates, v)
        for _ in range(self.max_iter):
            b = 1.0 / dist.clamp_min(self.eps)
            previous, v = v, (b / b.sum()).to(updates.dtype) @ updates
            dist = dists_to(updates, v)
            moved = torch.linalg.vector_norm(v - previous, dtype=torch.float64)
            if moved <= self.tol * dist.median():
                break
        return AggResult(v, dist, torch.ones(n, dtype=torch.bool))
