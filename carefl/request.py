"""The request a hospital receives: one narrow schema, built on the server, checked on the hospital.

A hospital must never run what a hostile coordinator puts into a message, so a request carries
only an allow-listed set of literal values -- the round, the training recipe, the model and
task choice -- under the same names as ``conf/`` (``federation.batch_size`` stays
``federation.batch_size`` from the config file to the hospital's training loop):

========================  ==================================================================
``round``                 int, 1..``federation.rounds``
``run_id``                str, 64 hex: the hash of the run's first ledger entry
``ledger_head``           the server-signed ledger head (``carefl.receipts.sign_head``) or null
``config.seed``           int >= 0 (model init and the synthetic demo data; never DP randomness)
``config.task``           name, kind, spatial_dims, in_channels, num_classes, loss
``config.model``          name and the net's literal hyperparameters (channels, strides, ...)
``config.data``           name and literal sizes (image_size, n_train, spatial_size, ...);
                          real data: the preprocessing preset's name and digest
                          (:mod:`carefl.data.presets`), sliding-window settings
``config.federation``     rounds, local_epochs, batch_size, optimizer, lr, torch_threads
``config.privacy``        enabled, target_epsilon, noise_multiplier, max_grad_norm,
                          accountant, secure_mode, grad_sample_mode
``config.strategy``       prox_mu
``config.personalization`` name (none | finetune | fedbn | ditto), epochs, ditto's lambda, lr
``simulation``            simulated hospitals only: see :data:`SIMULATION_SCHEMA`
========================  ==================================================================

What is never in a request: a path, an interpolation (``${...}``), a class to instantiate, a
delta or an epsilon cap (the hospital's own, :mod:`carefl.site`), a seed for DP sampling or
noise (drawn from OS entropy on the hospital, :func:`carefl.training.entropy_generator`).
Strings are short names (``[A-Za-z0-9_.-]``), so none can hold a path or ``${``. A key the
schema does not know, a value of the wrong type or out of range is refused by
:func:`parse_request` with one line naming the key; the hospital answers ``refused``.

The ``simulation`` section stands in for what a real SuperNode's operator would have set
(its name, state and data location, its policy, the simulated attack). A real SuperNode
(no ``partition-id`` in its node config) refuses any request that carries it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carefl.config import SAFE_NAME
from carefl.errors import CareFLError
from carefl.receipts import head_problem

#: a name: model, task, loss, optimizer, hospital ... (no path separator, no ``$``): the same
#: rule as the server's config edge
NAME = SAFE_NAME
HEX64 = re.compile(r"[0-9a-f]{64}")
#: a request larger than this (JSON text, characters) is refused before it is parsed
MAX_REQUEST_CHARS = 65536


class RequestError(CareFLError):
    """A request breaks the schema (the message names the key)."""


@dataclass(frozen=True)
class Field:
    """One allowed value: its type (``int``, ``float``, ``bool``, ``name``, ``ints``, ``path``,
    ``hex64``, ``any``), inclusive bounds for numbers (and list lengths), whether null is allowed and
    whether it may be left out."""

    kind: str
    low: float = -math.inf
    high: float = math.inf
    nullable: bool = False
    required: bool = True


def _opt(kind: str, low: float = -math.inf, high: float = math.inf, nullable: bool = False) -> Field:
    return Field(kind, low, high, nullable, required=False)


#: config sections a hospital receives, with every key it may contain
CONFIG_SCHEMA: dict[str, Any] = {
    "seed": Field("int", 0, 2**63 - 1),
    "task": {
        "name": Field("name"), "kind": Field("name"), "spatial_dims": Field("int", 2, 3),
        "in_channels": Field("int", 1, 64), "num_classes": Field("int", 1, 1000), "loss": Field("name"),
    },
    "model": {
        "name": Field("name"), "channels": _opt("ints", 1, 4096), "strides": _opt("ints", 1, 8),
        "num_res_units": _opt("int", 0, 16), "norm_groups": _opt("int", 1, 512), "features": _opt("ints", 1, 4096),
    },
    "data": {
        "name": Field("name"), "image_size": _opt("int", 4, 4096), "image_size_3d": _opt("int", 4, 1024),
        "n_train": _opt("int", 1, 10**7), "n_test": _opt("int", 1, 10**7),
        "spatial_size": _opt("ints", 4, 4096), "test_fraction": _opt("float", 0.0, 1.0),
        "site_mix_alpha": _opt("float", 1e-6, 1e6, nullable=True), "site_mix_sites": _opt("int", 1, 1000),
        "preprocess": _opt("name"), "preprocess_digest": _opt("hex64"), "sw_overlap": _opt("float", 0.0, 0.99),
        "sw_batch_size": _opt("int", 1, 4096),
    },
    "federation": {
        "rounds": Field("int", 1, 10**6), "local_epochs": Field("int", 1, 10**4),
        "batch_size": Field("int", 1, 10**6), "optimizer": Field("name"),
        "lr": Field("float", 1e-12, 1e3), "torch_threads": Field("int", 1, 1024),
    },
    "privacy": {
        "enabled": Field("bool"), "target_epsilon": Field("float", 1e-6, 1e6, nullable=True),
        "noise_multiplier": Field("float", 1e-6, 1e6, nullable=True), "max_grad_norm": Field("float", 1e-12, 1e12),
        "accountant": Field("name"), "secure_mode": Field("bool"), "grad_sample_mode": Field("name"),
    },
    "strategy": {"prox_mu": Field("float", 0.0, 1e6),
                 # what a hospital needs of secure aggregation (the buckets are the server's)
                 "secagg": {"enabled": Field("bool"), "clip": Field("float", 1e-12, 1e6), "bits": Field("int", 8, 24)}},
    "personalization": {"name": Field("name"), "epochs": Field("int", 0, 10**4), "lambda": _opt("float", 0.0, 1e6),
                        "lr": _opt("float", 1e-12, 1e3, nullable=True)},
    "compression": {"name": Field("name"), "block": Field("int", 16, 65536), "fraction": Field("float", 1e-9, 1.0)},
}

#: what only a simulated hospital accepts (the simulation's stand-in for its operator)
SIMULATION_SCHEMA: dict[str, Any] = {
    "hospitals": Field("any"),        # federation.hospitals: partition-id i -> hospitals[i]
    "run_dir": Field("path"),         # state dirs default to <run_dir>/hospitals/<name>
    "target_delta": Field("float", 1e-300, 1.0),  # a simulated hospital's delta unless its policy sets one
    "site_policies": Field("any"),    # federation.site_policies: node config per hospital
    "data_files": Field("any"),       # data.datalists / data.files: hospital -> file
    "attack": Field("any"),           # cfg.attack (label flipping acts on a hospital's data)
}


def _check(value: Any, field: Field, key: str) -> None:
    """Raise :class:`RequestError` unless ``value`` fits ``field`` (``key`` names it)."""
    if value is None:
        if field.nullable:
            return
        raise RequestError(f"request key {key} is null; it needs a value")
    kind = field.kind
    if kind == "any":
        return
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "hex64":
        ok = isinstance(value, str) and HEX64.fullmatch(value) is not None
    elif kind in ("name", "path"):
        ok = isinstance(value, str) and (NAME.fullmatch(value) is not None if kind == "name" else
                                         0 < len(value) <= 4096 and "${" not in value and "\0" not in value)
    elif kind == "ints":
        ok = (isinstance(value, list) and 1 <= len(value) <= 16
              and all(isinstance(v, int) and not isinstance(v, bool) and field.low <= v <= field.high for v in value))
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and field.low <= value <= field.high
    else:  # float: JSON may write a whole number without a point
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and field.low <= value <= field.high)
    if not ok:
        bounds = f" in [{field.low:g}, {field.high:g}]" if kind in ("int", "float", "ints") else ""
        raise RequestError(f"request key {key}={value!r:.80} is not a valid {kind}{bounds}")


def _check_section(values: Any, schema: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        raise RequestError(f"request key {prefix or 'config'} must be a mapping")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise RequestError(f"request key {prefix}{unknown[0]} is not allowed (a hospital accepts only "
                           f"{sorted(schema)} there)")
    for key, spec in schema.items():
        if key not in values:
            if isinstance(spec, dict) or spec.required:
                raise RequestError(f"request key {prefix}{key} is missing")
            continue
        if isinstance(spec, dict):
            _check_section(values[key], spec, f"{prefix}{key}.")
        else:
            _check(values[key], spec, f"{prefix}{key}")


@dataclass(frozen=True)
class Request:
    """A checked request: ``config`` is a read-only ``DictConfig`` of :data:`CONFIG_SCHEMA`'s
    sections (what ``carefl.hospital`` reads as ``cfg``); ``simulation`` is None for a real
    SuperNode."""

    round: int
    run_id: str
    ledger_head: dict | None
    config: DictConfig
    simulation: dict | None


def build_request(cfg, server_round: int, run_id: str, ledger_head: dict | None, simulation: dict | None) -> str:
    """The request JSON for ``server_round``: the allow-listed part of ``cfg`` and nothing else.

    ``cfg``: the validated run config; ``simulation``: :func:`simulation_section` when the
    nodes are simulated, else None.
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    config = {"seed": plain["seed"]}
    def allowed(values: dict, schema: dict) -> dict:  # the schema's keys only, nested sections too
        return {k: allowed(values[k], schema[k]) if isinstance(schema[k], dict) else values[k]
                for k in schema if k in values}

    for section, schema in CONFIG_SCHEMA.items():
        if isinstance(schema, dict):
            config[section] = allowed(plain[section], schema)
    if "preprocess" in config["data"]:  # the digest of the preset file the server planned with
        from carefl.data.presets import load_preset

        config["data"]["preprocess_digest"] = load_preset(config["data"]["preprocess"]).digest
    request = {"round": server_round, "run_id": run_id, "ledger_head": ledger_head, "config": config}
    if simulation is not None:
        request["simulation"] = simulation
    text = json.dumps(request, sort_keys=True, allow_nan=False)
    parse_request(text, simulated=simulation is not None)  # the server never sends what a hospital refuses
    return text


def simulation_section(cfg, run_dir: str) -> dict:
    """What simulated hospitals need besides the request: names, state root, policies, data
    files, the attack (``cfg``: the run config)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    data = plain["data"]
    return {
        "hospitals": list(plain["federation"]["hospitals"]),
        "run_dir": str(run_dir),
        "target_delta": float(plain["privacy"]["target_delta"]),
        "site_policies": dict(plain["federation"].get("site_policies") or {}),
        "data_files": dict(data.get("datalists") or data.get("files") or {}),
        "attack": plain["attack"],
    }


def parse_request(text: Any, simulated: bool) -> Request:
    """Check a request against the schema; the one validator of this edge.

    Args:
        text: the JSON text the server sent.
        simulated: whether this hospital runs under Flower's simulation engine (its own node
            config says so, never the request).
    Raises:
        RequestError: one line naming the offending key.
    """
    if not isinstance(text, str) or len(text) > MAX_REQUEST_CHARS:
        raise RequestError(f"request must be JSON text of at most {MAX_REQUEST_CHARS} characters")
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except ValueError as err:
        raise RequestError(f"request is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise RequestError("request must be a JSON object")
    allowed = {"round", "run_id", "ledger_head", "config"} | ({"simulation"} if simulated else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        why = " (only simulated hospitals accept it)" if unknown[0] == "simulation" else ""
        raise RequestError(f"request key {unknown[0]} is not allowed{why}")
    for key in ("round", "run_id", "config"):
        if key not in raw:
            raise RequestError(f"request key {key} is missing")
    _check_section(raw["config"], CONFIG_SCHEMA, "")
    _check(raw["round"], Field("int", 1, raw["config"]["federation"]["rounds"]), "round")
    if not (isinstance(raw["run_id"], str) and HEX64.fullmatch(raw["run_id"])):
        raise RequestError("request key run_id must be 64 lowercase hex characters")
    head = raw.get("ledger_head")
    if head is not None and (problem := head_problem(head)):
        raise RequestError(f"request key ledger_head is not a server-signed ledger head: {problem}")
    simulation = raw.get("simulation")
    if simulation is not None:
        _check_section(simulation, SIMULATION_SCHEMA, "simulation.")
    config = OmegaConf.create(raw["config"], flags={"allow_objects": False})
    OmegaConf.set_readonly(config, True)
    return Request(raw["round"], raw["run_id"], head, config, simulation)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")
