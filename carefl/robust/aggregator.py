"""The aggregator the server calls each round: pre-aggregators, then the rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from carefl.robust.assumptions import check_assumptions
from carefl.robust.base import AggResult
from carefl.robust.config import instantiate, resolve
from carefl.robust.registry import PRE, RULES


class Aggregator:
    """``aggregator(updates (n, d) float32, claimed_examples (n,)) -> AggResult`` over hospitals.

    Runs ``strategy.pre`` in order, then ``strategy.rule``. Per-hospital ``scores`` and
    ``selected`` are the rule's values for the row carrying that hospital (after bucketing: its
    bucket's). Claimed example counts reach only the rule (summed per bucket); robust rules
    ignore them, the mean caps them. Every call re-checks the strategy's assumptions for the
    number of updates actually received and raises ConfigError rather than skip a round.
    State (centered clipping's centre, bucketing's generator): ``state_dict()`` /
    ``load_state_dict()``.
    """

    def __init__(self, strategy_cfg: Mapping):
        self.cfg = strategy_cfg
        f = strategy_cfg.get("f", 0)
        self.pre = [
            instantiate(*resolve(PRE, spec, f"strategy.pre[{i}]"), f=f)
            for i, spec in enumerate(strategy_cfg.get("pre") or [])
        ]
        self.rule = instantiate(*resolve(RULES, strategy_cfg["rule"], "strategy.rule"), f=f)

    def __call__(self, updates: Tensor, claimed_examples: Sequence[float] | Tensor) -> AggResult:
        n = updates.shape[0]
        check_assumptions(self.cfg, n)
        claims = torch.as_tensor(claimed_examples, dtype=torch.float64)
        if claims.shape != (n,):
            raise ValueError(f"{n} updates but {tuple(claims.shape)} claimed example counts")
        owner = torch.arange(n)
        rows = updates
        for pre in self.pre:
            rows, row_owner = pre(rows)
            owner = row_owner[owner]
        weights = torch.zeros(rows.shape[0], dtype=torch.float64).index_add_(0, owner, claims)
        result = self.rule(rows, weights)
        return AggResult(result.update, result.scores[owner], result.selected[owner])

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict(), "pre": [p.state_dict() for p in self.pre]}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
        for pre, pre_state in zip(self.pre, state["pre"], strict=True):
            pre.load_state_dict(pre_state)


def build_aggregator(strategy_cfg: Mapping) -> Aggregator:
    """The aggregator described by ``conf/strategy/<name>.yaml`` (a dict or DictConfig)."""
    return Aggregator(strategy_cfg)
