"""Check, before the first round, that the strategy can work with the hospitals it will get.

Every violated assumption raises :class:`carefl.errors.ConfigError` with one line naming the
key and the fix — no rule silently clamps a parameter or skips a round (unlike Flower's
Krum, which clamps its neighbour count, and Bulyan, which returns None when n < 4f + 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from carefl.errors import ConfigError
from carefl.robust.config import resolve
from carefl.robust.registry import PRE, RULES
from carefl.robust.server_opt import SERVER_OPTS
from carefl.robust.trimmed_mean import trim_count


def _positive(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number")


def _fraction(value, key: str) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{key}={value!r} must be in [0, 1)")


def _check_pre(pre: list, f: int, n: int) -> int:
    """Validate ``strategy.pre`` for ``n`` hospitals; return the row count the rule will see."""
    for i, spec in enumerate(pre):
        key = f"strategy.pre[{i}]"
        cls, params = resolve(PRE, spec, key)
        name = spec["name"]
        if name == "clip":
            _positive(params.get("tau"), f"{key}.tau", allow_none=True)
        elif name in ("nnm", "arc") and not 2 * f < n:
            raise ConfigError(
                f"{key} ({name}) needs strategy.f < n/2 but f={f} with n={n} rows; "
                f"lower strategy.f to {(n - 1) // 2} or remove {name}"
            )
        elif name == "bucketing":
            s = params.get("s", 2)
            if not isinstance(s, int) or s < 1:
                raise ConfigError(f"{key}.s={s!r} must be an integer >= 1 (bucket size)")
            n = math.ceil(n / s)
    return n


def _check_rule(spec: Mapping, f: int, n: int, rows_note: str) -> None:
    cls, params = resolve(RULES, spec, "strategy.rule")
    name = spec["name"]
    have = f"n={n}{rows_note}"
    if name in ("krum", "multikrum") and not n > 2 * f + 2:
        raise ConfigError(
            f"strategy.rule.name={name} needs n > 2*strategy.f+2 = {2 * f + 2} but {have}; "
            f"lower strategy.f to {max((n - 3) // 2, 0)} or add hospitals"
        )
    if name == "multikrum" and params.get("m") is not None:
        m = params["m"]
        if not isinstance(m, int) or not 1 <= m <= n - f:
            raise ConfigError(f"strategy.rule.m={m!r} must be an integer in [1, n - f] = [1, {n - f}] ({have}); or null for n - f")
    if name == "bulyan" and not n >= 4 * f + 3:
        raise ConfigError(
            f"strategy.rule.name=bulyan needs n >= 4*strategy.f+3 = {4 * f + 3} but {have}; "
            f"lower strategy.f to {max((n - 3) // 4, 0)} or add hospitals"
        )
    if name == "trimmed_mean":
        beta = params.get("beta")
        if beta is not None:
            _fraction(beta, "strategy.rule.beta")
        k = trim_count(n, f, beta)
        if k < f:
            raise ConfigError(
                f"strategy.rule.beta={beta} trims {k} per side at {have} but strategy.f={f} needs "
                f"at least {f}; set beta >= {f}/{n} or null (trims exactly f)"
            )
        if not 2 * k < n:
            raise ConfigError(
                f"strategy.rule (trimmed_mean) trims {k} per side, nothing left at {have}; "
                f"lower strategy.f / strategy.rule.beta or add hospitals"
            )
    if name in ("median", "geomed", "centered_clip", "cosine_filter") and not 2 * f < n:
        raise ConfigError(
            f"strategy.rule.name={name} tolerates strategy.f < n/2 but f={f} with {have}; "
            f"lower strategy.f to {(n - 1) // 2} or add hospitals"
        )
    if name == "centered_clip":
        _positive(params.get("tau", 1.0), "strategy.rule.tau")
        if not isinstance(params.get("iters", 3), int) or params.get("iters", 3) < 1:
            raise ConfigError(f"strategy.rule.iters={params.get('iters')!r} must be an integer >= 1")
    if name == "geomed":
        _positive(params.get("eps", 1e-6), "strategy.rule.eps")
        _positive(params.get("max_iter", 100), "strategy.rule.max_iter")


def _check_server_opt(spec: Mapping) -> None:
    cls, params = resolve(SERVER_OPTS, spec, "strategy.server_opt")
    for k, v in params.items():
        key = f"strategy.server_opt.{k}"
        if k in ("lr", "tau"):
            _positive(v, key)
        else:  # momentum, beta1, beta2
            _fraction(v, key)


def check_assumptions(strategy_cfg: Mapping, n_hospitals: int, unit: str = "hospitals") -> None:
    """Raise ConfigError unless ``strategy_cfg`` is usable with ``n_hospitals`` updates a round.

    Checks names and settings of rule / pre / server_opt (unknown ones list the valid
    choices), ``f`` and ``prox_mu`` ranges, and each rule's requirement on the number of rows
    it sees (after bucketing, if any): Krum/Multi-Krum n > 2f+2, Bulyan n >= 4f+3, trimmed
    mean trims >= f per side and keeps something, median / geomed / centered clipping /
    cosine filter / NNM f < n/2, and a clip in front of the cosine filter. The aggregator
    re-checks every round with the hospitals that actually replied.
    ``unit``: what a row is, for the message (``secure buckets`` under secure aggregation).
    """
    f = strategy_cfg.get("f", 0)
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ConfigError(f"strategy.f={f!r} must be an integer >= 0 (Byzantine hospitals to tolerate)")
    prox_mu = strategy_cfg.get("prox_mu", 0.0)
    if not isinstance(prox_mu, (int, float)) or prox_mu < 0:
        raise ConfigError(f"strategy.prox_mu={prox_mu!r} must be >= 0 (0 = FedProx off)")
    if n_hospitals < 1:
        raise ConfigError(f"no hospital updates to aggregate (n={n_hospitals}); check federation.hospitals")
    pre = list(strategy_cfg.get("pre") or [])
    rows = _check_pre(pre, f, n_hospitals)
    note = f" rows after bucketing ({n_hospitals} {unit})" if rows != n_hospitals else f" {unit}"
    _check_rule(strategy_cfg["rule"], f, rows, note)
    if strategy_cfg["rule"].get("name") == "cosine_filter" and f and not any(
        spec.get("name") in ("arc", "clip") for spec in pre
    ):
        raise ConfigError(
            "strategy.pre needs a clip in front of strategy.rule.name=cosine_filter, which bounds "
            "an attacker's influence only through the rows' norms; use strategy.pre=[{name:arc}] "
            "(as conf/strategy/cosine_filter.yaml does) or {name:clip}"
        )
    _check_server_opt(strategy_cfg["server_opt"])
