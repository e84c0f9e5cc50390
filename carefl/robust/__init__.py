"""Byzantine-robust aggregation, pure torch on the update matrix (n hospitals, d floats).

Per round, the server does::

    reason = validate_update(hospital, local_state, global_state)  # at the reply edge
    X = flatten_updates(local_states, global_state)          # float32 (n, d)
    drop = norm_outliers(X, max_update_norm, max_update_norm_ratio)  # absurd norms left out
    result = aggregator(X, claimed_examples)                 # AggResult(update, scores, selected)
    new_global = apply_update(global_state, server_opt.step(result.update))
    signals = round_signals(hospitals, X, result); reputation.update(signals)

with ``aggregator = build_aggregator(cfg.strategy)``, ``server_opt =
build_server_optimizer(cfg.strategy)`` and ``check_assumptions(cfg.strategy, n)`` called once
at start. Aggregator, server optimiser and reputation each have ``state_dict()`` /
``load_state_dict()`` for checkpoints.
"""

from carefl.robust.aggregator import Aggregator, build_aggregator
from carefl.robust.assumptions import check_assumptions
from carefl.robust.base import AggResult, PreAggregator, Rule
from carefl.robust.checks import norm_outliers, validate_update
from carefl.robust.registry import PRE, RULES
from carefl.robust.server_opt import SERVER_OPTS, build_server_optimizer
from carefl.robust.signals import Reputation, round_signals
from carefl.robust.updates import apply_update, flatten_updates, float_keys, update_dim

__all__ = [
    "AggResult",
    "Aggregator",
    "PRE",
    "PreAggregator",
    "RULES",
    "Reputation",
    "Rule",
    "SERVER_OPTS",
    "apply_update",
    "build_aggregator",
    "build_server_optimizer",
    "check_assumptions",
    "flatten_updates",
    "float_keys",
    "update_dim",
    "norm_outliers",
    "round_signals",
    "validate_update",
]
