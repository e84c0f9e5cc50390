"""Norm clipping pre-aggregators: a fixed or median radius, and adaptive robust clipping (ARC)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from carefl.robust.base import PreAggregator


class NormClip(PreAggregator):
    """Rescale each update to L2 norm at most ``tau``: ``x_i * min(1, tau / ||x_i||)``.

    tau: radius (unit of the updates); ``None`` = the median update norm of the round
    (adaptive: at least half of the hospitals pass unchanged, whatever the update scale).
    """

    def __init__(self, tau: float | None = None):
        self.tau = tau

    def __call__(self, updates: Tensor) -> tuple[Tensor, Tensor]:
        n = updates.shape[0]
        norms = updates.norm(dim=1).double()
        tau = norms.median().item() if self.tau is None else self.tau
        scale = (tau / norms.clamp_min(1e-12)).clamp_max(1.0)
        return updates * scale.to(updates.dtype)[:, None], torch.arange(n)


class AdaptiveRobustClip(PreAggregator):
    """Adaptive robust clipping, ARC (Allouah, Guerraoui, Gupta, Pinot, Rizk 2024, "Boosting
    Robustness by Clipping Gradients in Distributed Learning", Algorithm 1).

    With ``k = floor(2 (f / n) (n - f))``, the k largest-norm updates are scaled down to the
    norm of the (k+1)-th largest, ``C``: ``x_i * min(1, C / ||x_i||)``; the others pass as they
    are (k = 0: nothing changes). For f <= n/2, k >= f (k >= f iff 2(n - f) >= n), so among
    the k + 1 largest norms at least one is honest: C is at most the largest honest norm and
    every row after ARC is no longer than the longest honest update, whatever the attackers
    send. Unlike :class:`NormClip` with the median it needs no guess of the
    scale and leaves the n - k smallest updates (most honest ones) untouched. Ties in norm are
    broken by index (stable sort), so the output is a function of the input rows.
    """

    def __init__(self, f: int = 0):
        self.f = f

    def __call__(self, updates: Tensor) -> tuple[Tensor, Tensor]:
        n = updates.shape[0]
        k = math.floor(2 * self.f * (n - self.f) / n) if n else 0
        if k == 0 or k >= n:
            return updates, torch.arange(n)
        norms = updates.norm(dim=1).double()
        threshold = torch.sort(norms, descending=True, stable=True).values[k].item()
        scale = (threshold / norms.clamp_min(1e-300)).clamp_max(1.0)
        return updates * scale.to(updates.dtype)[:, None], torch.arange(n)
