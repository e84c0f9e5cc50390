"""Bucketing pre-aggregator (Karimireddy, He, Jaggi 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from carefl.robust.base import PreAggregator


class Bucketing(PreAggregator):
    """Shuffle the n updates with a seeded permutation, cut them into ``ceil(n / s)`` buckets
    of ``s`` consecutive updates (the last may be smaller) and return the bucket means
    (uniform). The rule then sees ``ceil(n / s)`` rows; ``f`` Byzantine hospitals still spoil
    at most ``f`` buckets.

    s: bucket size. seed: seeds the permutation generator; its state advances every round and
    is saved by ``state_dict()`` so a resumed run draws the same permutations.
    """

    def __init__(self, s: int = 2, seed: int = 0):
        self.s = s
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, updates: Tensor) -> tuple[Tensor, Tensor]:
        n = updates.shape[0]
        perm = torch.randperm(n, generator=self.generator)
        owner = torch.empty(n, dtype=torch.long)
        owner[perm] = torch.arange(n) // self.s
        buckets = math.ceil(n / self.s)
        sums = torch.zeros(buckets, updates.shape[1], dtype=updates.dtype).index_add_(0, owner, updates)
        sizes = torch.bincount(owner, minlength=buckets).to(updates.dtype)
        return sums / sizes[:, None], owner

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
