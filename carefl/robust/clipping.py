"""Norm clipping pre-aggregator."""

from __future__ import annotations

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
