"""Per-round anomaly signals per hospital and a reputation carried across rounds.

Everything returned is plain Python (float / bool), ready for ``json.dumps``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from carefl.robust.base import AggResult


def round_signals(hospitals: Sequence[str], updates: Tensor, result: AggResult) -> dict[str, dict]:
    """``{hospital: {"norm", "cosine", "score", "selected"}}`` for one round.

    updates: float32 ``(n, d)`` as given to the aggregator; result: its AggResult.
    norm: L2 norm of the update. cosine: cosine similarity to the aggregated update (0 when
    either is zero). score: the rule's own score (see the rule's docstring). selected: used
    by the rule (not trimmed / among the selected).
    """
    norms = updates.norm(dim=1).double()
    agg_norm = result.update.norm().double()
    dots = (updates @ result.update).double()
    denom = norms * agg_norm
    cosine = (dots / denom.clamp_min(1e-30)).where(denom > 0, dots.new_zeros(()))
    return {
        h: {
            "norm": float(norms[i]),
            "cosine": float(cosine[i]),
            "score": float(result.scores[i]),
            "selected": bool(result.selected[i]),
        }
        for i, h in enumerate(hospitals)
    }


class Reputation:
    """Exponential moving average of each hospital's round evidence
    ``e = (selected + max(cosine, 0)) / 2`` in [0, 1]:
    ``r <- decay * r + (1 - decay) * e``; a hospital's first round sets ``r = e``.
    Hospitals absent from a round keep their value. State: ``{"decay", "values"}``.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, signals: dict[str, dict]) -> dict[str, float]:
        """Fold one round's :func:`round_signals` in; return all reputations (a copy)."""
        for h, s in signals.items():
            evidence = (float(s["selected"]) + max(s["cosine"], 0.0)) / 2
            old = self.values.get(h)
            self.values[h] = evidence if old is None else self.decay * old + (1 - self.decay) * evidence
        return dict(self.values)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.values = dict(state["values"])
