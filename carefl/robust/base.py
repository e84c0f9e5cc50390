"""The one interface every aggregation rule shares, and its result.

A rule is called as ``rule(updates, weights) -> AggResult`` where

* ``updates``: float32 ``(n, d)``, one row per hospital (local model - global model, flattened
  by :func:`carefl.robust.updates.flatten_updates`);
* ``weights``: float ``(n,)``, the example counts the hospitals *claim*. Only the mean may use
  them (capped, see :class:`carefl.robust.mean.WeightedMean`); robust rules ignore them, so a
  hospital cannot buy influence by lying about its size.

Pre-aggregators (clipping, NNM, bucketing) share a second small interface,
:class:`PreAggregator`. Parts with memory across rounds (centered clipping, bucketing's
generator) override ``state_dict`` / ``load_state_dict``; the others are stateless.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AggResult:
    """What a rule returns for one round.

    update:   float32 ``(d,)`` aggregated update (to add to the global model, after the
              server optimiser).
    scores:   float ``(n,)`` the rule's own per-hospital score (its docstring says which;
              e.g. the Krum score or the L2 distance to the aggregate). Lower = more central.
    selected: bool ``(n,)`` whether the hospital's update was used (selected / not trimmed).
    """

    update: Tensor
    scores: Tensor
    selected: Tensor


class Stateless:
    """Default (no) round-to-round state; stateful parts override both methods."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")


class Rule(Stateless):
    """An aggregation rule: ``rule(updates (n, d), weights (n,)) -> AggResult``."""

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        raise NotImplementedError


class PreAggregator(Stateless):
    """Runs in front of a rule: ``pre(updates (n, d)) -> (mixed (m, d), owner (n,) long)``.

    ``owner[i]`` is the output row that carries hospital i (identity unless rows are merged,
    as bucketing does); the aggregator uses it to map the rule's per-row scores back to
    hospitals and to sum claimed example counts per output row.
    """

    def __call__(self, updates: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
