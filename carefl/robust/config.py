"""Reading ``{name: ..., <setting>: ...}`` entries of ``conf/strategy/*.yaml`` into classes.

Works on plain dicts and on Hydra ``DictConfig`` nodes alike (both are Mappings).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from carefl.errors import ConfigError


def resolve(registry: Mapping[str, type], spec: Mapping, key: str) -> tuple[type, dict]:
    """The class named by ``spec["name"]`` in ``registry`` and the other settings of ``spec``.

    ``key`` is the config path of ``spec`` (e.g. ``strategy.rule``), used in the error when the
    name is unknown or a setting is not an argument of the class.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{key} must be a mapping with a 'name' (one of {sorted(registry)}); got {spec!r}")
    name = spec["name"]
    if name not in registry:
        raise ConfigError(f"{key}.name={name!r} is unknown; choose one of {sorted(registry)}")
    cls = registry[name]
    params = {k: v for k, v in spec.items() if k != "name"}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "f")]
    for p in params:
        if p not in allowed:
            raise ConfigError(f"{key}.{p} is not a setting of {name!r}; its settings are {allowed}")
    return cls, params


def instantiate(cls: type, params: dict, f: int):
    """``cls(**params)``, passing the strategy's ``f`` when the class takes one."""
    if "f" in inspect.signature(cls.__init__).parameters:
        return cls(f=f, **params)
    return cls(**params)
