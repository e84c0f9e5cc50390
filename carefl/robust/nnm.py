"""Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing")."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import PreAggregator
from carefl.robust.linalg import pairwise_sq_dists


class NearestNeighbourMixing(PreAggregator):
    """Replace each update by the mean of its ``n - f`` nearest updates (itself included,
    squared L2 distance, ties by index). Needs f < n/2. Row i still belongs to hospital i."""

    def __init__(self, f: int = 0):
        self.f = f

    def __call__(self, updates: Tensor) -> tuple[Tensor, Tensor]:
        n = updates.shape[0]
        dist = pairwise_sq_dists(updates)
        dist.fill_diagonal_(-1.0)  # itself first, whatever the round-off
        near = torch.argsort(dist, dim=1, stable=True)[:, : n - self.f]
        mix = torch.zeros(n, n, dtype=updates.dtype)
        mix.scatter_(1, near, 1.0 / (n - self.f))
        return mix @ updates, torch.arange(n)
