"""Centered clipping (Karimireddy, He, Jaggi 2021, "Learning from History")."""

from __future__ import annotations

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import dists_to


class CenteredClipping(Rule):
    """``iters`` steps of ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``,
    starting from the previous round's aggregate (the rule's momentum; zeros in the first
    round). Uniform weights (claims ignored). Tolerates f < n/2 for a suitable ``tau``.

    tau: clipping radius (L2 norm, unit of the updates). The centre is carried across rounds
    and saved by ``state_dict()`` (``{"center": Tensor (d,)}``), so a resumed run continues
    where it stopped.

    scores: L2 distance to the final aggregate. selected: not clipped in the last step
    (``||x_i - v|| <= tau``).
    """

    def __init__(self, tau: float = 1.0, iters: int = 3):
        self.tau, self.iters = tau, iters
        self.center: Tensor | None = None

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n, d = updates.shape
        v = torch.zeros(d, dtype=updates.dtype) if self.center is None else self.center.clone()
        if v.shape != (d,):
            raise ValueError(f"centered_clip centre has shape {tuple(v.shape)} but updates have d={d}")
        for _ in range(self.iters):
            dist = dists_to(updates, v)
            scale = (self.tau / dist.clamp_min(1e-12)).clamp_max(1.0)
            # v + mean_i s_i (x_i - v) = v (1 - mean s) + (s/n) @ X
            v = v * (1.0 - scale.mean().item()) + (scale / n).to(updates.dtype) @ updates
        self.center = v.clone()
        selected = dist <= self.tau
        return AggResult(v, dists_to(updates, v), selected)

    def state_dict(self) -> dict:
        return {} if self.center is None else {"center": self.center.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.center = state["center"].clone() if "center" in state else None
