"""A hospital's site policy: what its privacy, data and code rest on, decided on the hospital.

The policy is read on the hospital only -- from its SuperNode's node config
(``flower-supernode --node-config 'hospital="st-mary" epsilon-cap=6 ...'``) and optionally a
``site-policy`` YAML file with the same keys (inline node-config values win). Nothing the
server sends can set, loosen or fill in any of it:

=====================  ======================================================================
key                    meaning (default)
=====================  ======================================================================
``hospital``           its name (required)
``data-path``          its datalist JSON / MedMNIST npz, or ``synthetic:<i>`` for the
                       generated demo site i (required on a real SuperNode)
``state-dir``          where its accountant history, signing key and receipts live; keep it
                       on persistent, backed-up storage (required on a real SuperNode)
``require-dp``         ``true``: it trains only with DP-SGD; a request with
                       ``privacy.enabled=false`` is refused (default ``true``)
``epsilon-cap``        the most epsilon its training set may ever spend, all rounds of all
                       runs (required on a real SuperNode)
``delta``              the delta every epsilon is computed at; must be < 1/N for its N
                       training records (required on a real SuperNode)
``max-local-epochs``   most ``federation.local_epochs`` a round may ask (10)
``max-batch-size``     most ``federation.batch_size`` a round may ask (1024)
``max-rounds``         most ``federation.rounds`` a run may plan (1000)
``allowed-models``     comma-separated ``model.name`` values it trains (any)
``allowed-tasks``      comma-separated ``task.name`` values it trains (any)
``torch-threads``      intra-op threads of its training process (the request's
                       ``federation.torch_threads``)
``data-workers``       DataLoader worker processes that prepare its training batches while
                       the model trains (0: in the training process itself). 1 takes the data
                       step out of a round's time where a core is free (BENCHMARKS.md section 4) (0)
``key-file``           its Ed25519 signing key (``<state-dir>/hospital_key.pem``)
``cache-dir``          where its preprocessed images are kept between rounds and runs
                       (``<state-dir>/data-cache``); it holds patient images: keep it
                       where the data itself may live
``share-data-card``    ``true``: its evaluation replies carry its data card's record counts
                       and label frequencies (:func:`carefl.data.card.shared_figures`),
                       shown in the run's summary (``false``)
``share-gallery``      ``true``: after the last round its evaluation reply carries a small
                       explanation gallery (at most 4 PNG overlays of its own test images,
                       :func:`carefl.hospital.explanation_gallery`) shown in the run's
                       ``report.html``; ``false``: the gallery is written to its state dir
                       only (``<state-dir>/gallery/``) and no image leaves (``false``)
``max-bad-files``      datalist records that may fail to load (unreadable, mismatched
                       geometry, bad label values) and be skipped with a warning; more
                       make it refuse the round (0)
``require-secagg``     ``true``: it sends an update only under secure aggregation; a
                       request with ``strategy.secagg.enabled=false`` is refused (``false``)
``secagg-min-bucket``  the fewest hospitals (itself included) whose sum the server may
                       learn instead of its update: it refuses a smaller bucket (3)
``secagg-min-threshold``  the least fraction of a bucket whose shares must be needed to
                       unmask (t > fraction * s), in [0.5, 1); higher resists more colluders
                       under an active server and tolerates fewer dropouts (0.5)
``secagg-peer-keys``   a YAML/JSON file ``{hospital: base64 Ed25519 public key}`` (what each
                       prints with ``carefl-keygen``): then it joins a secure bucket only if
                       every member is listed and signed its advert with that key, so the
                       server cannot fill its bucket with members it invented (none)
``site-policy``        a YAML file holding any of the keys above
=====================  ======================================================================

A simulated hospital (node config with ``partition-id``, set by Flower's simulation engine)
has no operator: its policy is built from the run's own config (``federation.site_policies``,
``privacy.enabled`` as ``require-dp``, ``privacy.target_epsilon`` / ``target_delta`` as cap /
delta, state under the run directory), which is what "simulation works from ``conf/``" means.

:func:`admit` checks a request against the policy; a request outside it is refused with the
reason, which the server records before going on without this hospital.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from carefl.errors import ConfigError
from carefl.receipts import KEY_FILE, is_b64
from carefl.request import NAME, Request

#: keys Flower's simulation engine sets itself
SIMULATION_KEYS = ("partition-id", "num-partitions")
DEFAULTS = {"require-dp": True, "max-local-epochs": 10, "max-batch-size": 1024, "max-rounds": 1000, "max-bad-files": 0,
            "share-data-card": False, "share-gallery": False, "data-workers": 0, "require-secagg": False, "secagg-min-bucket": 3,
            "secagg-min-threshold": 0.5}
#: the default cache-dir under the state dir
CACHE_DIR = "data-cache"
#: node-config keys a SuperNode may set
NODE_KEYS = (
    "hospital", "data-path", "state-dir", "require-dp", "epsilon-cap", "delta", "max-local-epochs",
    "max-batch-size", "max-rounds", "allowed-models", "allowed-tasks", "torch-threads", "data-workers", "key-file",
    "cache-dir",
    "max-bad-files", "share-data-card", "share-gallery", "require-secagg", "secagg-min-bucket",
    "secagg-min-threshold", "secagg-peer-keys", "site-policy",
)
#: what a real SuperNode must set itself (no default, never from the server)
REQUIRED = ("hospital", "data-path", "state-dir", "epsilon-cap", "delta")
SYNTHETIC = "synthetic:"


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's own decisions (see the module docstring for each key).

    ``epsilon_cap`` and ``delta`` are unit-less DP parameters; ``epsilon_cap`` may be inf only
    for a simulated hospital whose run sets sigma directly. ``data_path`` is None only for a
    simulated hospital on generated data. ``synthetic_site`` is the demo site index when
    ``data-path`` is ``synthetic:<i>`` (or the simulated partition), else None.
    """

    hospital: str
    simulated: bool
    index: int
    state_dir: Path
    data_path: str | None
    synthetic_site: int | None
    require_dp: bool
    epsilon_cap: float
    delta: float
    max_local_epochs: int
    max_batch_size: int
    max_rounds: int
    allowed_models: tuple[str, ...] | None
    allowed_tasks: tuple[str, ...] | None
    torch_threads: int | None
    key_file: Path
    cache_dir: Path
    max_bad_files: int
    share_data_card: bool
    require_secagg: bool
    secagg_min_bucket: int
    secagg_min_threshold: float
    secagg_peer_keys: dict[str, str] | None = None
    share_gallery: bool = False
    data_workers: int = 0


def _policy_file(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"site-policy file {path} cannot be read ({e}); fix the node-config key site-policy") from e
    allowed = set(NODE_KEYS) - {"site-policy"}
    if not isinstance(values, dict) or set(values) - allowed:
        raise ConfigError(f"site-policy file {path} must be a mapping with keys from {sorted(allowed)}; got {values!r:.200}")
    return values


def _number(values: dict, key: str, integer: bool = False) -> float:
    value, source = values[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer and number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{key}={value!r} in {source} is not {kind}") from None
    return int(number) if integer else number


def _flag(values: dict, key: str) -> bool:
    value, source = values[key]
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"{key}={value!r} in {source} must be true or false")


def _peer_keys(values: dict) -> dict[str, str] | None:
    """``secagg-peer-keys``: the file's {hospital: base64 Ed25519 public key}, checked."""
    if "secagg-peer-keys" not in values:
        return None
    path, source = values["secagg-peer-keys"]
    try:
        keys = yaml.safe_load(Path(str(path)).expanduser().read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"secagg-peer-keys={path} in {source} cannot be read ({err}); point it at a YAML/JSON file "
                          "of {hospital: public key}") from None
    if not isinstance(keys, dict) or not keys or any(
            not isinstance(k, str) or NAME.fullmatch(k) is None or not is_b64(v, 32) for k, v in keys.items()):
        raise ConfigError(f"secagg-peer-keys={path} in {source} must map hospital names to base64 Ed25519 public keys "
                          "(44 characters, as carefl-keygen prints them)")
    return dict(keys)


def _names(values: dict, key: str) -> tuple[str, ...] | None:
    if key not in values:
        return None
    value, source = values[key]
    items = value if isinstance(value, list) else str(value).split(",")
    names = tuple(str(v).strip() for v in items if str(v).strip())
    if not names or any(NAME.fullmatch(n) is None for n in names):
        raise ConfigError(f"{key}={value!r} in {source} must list names, e.g. {key}=\"unet,basicunet\"")
    return names


def _simulated_defaults(node_config: Mapping[str, Any], request: Request) -> dict[str, Any]:
    """A simulated hospital's stand-in node config, from the run's own config."""
    sim = request.simulation
    if sim is None:
        raise ConfigError("a simulated hospital needs the request's simulation section; the server sent none")
    hospitals = list(sim["hospitals"])
    pid, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(hospitals)))
    if parts != len(hospitals):
        raise ConfigError(
            f"the simulation has {parts} SuperNodes but federation.hospitals lists {len(hospitals)}; "
            f"run with --federation-config 'num-supernodes={len(hospitals)}' or change federation.hospitals"
        )
    name = str(node_config.get("hospital") or hospitals[pid])
    privacy = request.config.privacy
    stand_in = {
        "hospital": name,
        "state-dir": str(Path(sim["run_dir"]) / "hospitals" / name),
        "require-dp": bool(privacy.enabled),
        "epsilon-cap": float(privacy.target_epsilon) if privacy.target_epsilon is not None else math.inf,
        "delta": float(sim["target_delta"]),
    }
    if name in sim["data_files"]:
        stand_in["data-path"] = str(sim["data_files"][name])
    return {**stand_in, **dict(sim["site_policies"].get(name) or {})}


def read_policy(node_config: Mapping[str, Any], request: Request) -> SitePolicy:
    """The hospital's policy from its node config (and ``site-policy`` file).

    ``request`` matters only for a simulated hospital (its stand-in operator, see the module
    docstring); a real SuperNode's policy never depends on it.

    Raises:
        ConfigError: an unknown key (a typo such as ``epsilon_cap`` must not silently drop a
            budget), a required key missing, a value of the wrong type or out of range; the
            message names the key and where it came from.
    """
    unknown = sorted(set(node_config) - set(NODE_KEYS) - set(SIMULATION_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown SuperNode node-config key(s) {unknown}; valid keys: {', '.join(NODE_KEYS)} "
            "(fix the flower-supernode --node-config of this hospital)"
        )
    simulated = "partition-id" in node_config
    values: dict[str, tuple[Any, str]] = {k: (v, "the default") for k, v in DEFAULTS.items()}
    if simulated:
        stand_in = _simulated_defaults(node_config, request)
        values.update({k: (v, "the simulation's config (federation.site_policies)") for k, v in stand_in.items()})
    if "site-policy" in node_config:
        path = str(node_config["site-policy"])
        values.update({k: (v, f"site-policy file {path}") for k, v in _policy_file(path).items()})
    values.update({k: (v, "the node config") for k, v in node_config.items() if k in NODE_KEYS and k != "site-policy"})
    missing = [k for k in REQUIRED if k not in values and not (simulated and k == "data-path")]
    if missing:
        raise ConfigError(
            f"this hospital's node config lacks {missing}: a real SuperNode sets them itself, e.g. "
            "--node-config 'hospital=\"st-mary\" data-path=\"/data/datalist.json\" state-dir=\"/var/lib/carefl\" "
            "epsilon-cap=6.0 delta=1e-6' (the server can never fill them in)"
        )
    name = str(values["hospital"][0])
    if NAME.fullmatch(name) is None:
        raise ConfigError(f"hospital={name!r} in {values['hospital'][1]} must be a name like st-mary")
    cap, delta = _number(values, "epsilon-cap"), _number(values, "delta")
    if not (0 < cap < math.inf or (simulated and cap == math.inf)):
        raise ConfigError(f"epsilon-cap={cap} in {values['epsilon-cap'][1]} must be a finite number > 0")
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta} in {values['delta'][1]} must be in (0, 1), e.g. 1e-6 (< 1/N)")
    data_path = str(values["data-path"][0]) if "data-path" in values else None
    site = _synthetic_site(data_path, values)
    if simulated:  # its position in federation.hospitals, whatever its data (label flipping reads it)
        index = int(node_config["partition-id"])
        site = index if data_path is None else site
    else:
        index = site if site is not None else -1
    limits = {k: _number(values, k, integer=True) for k in ("max-local-epochs", "max-batch-size", "max-rounds")}
    bad = [k for k, v in limits.items() if v < 1]
    if bad:
        raise ConfigError(f"{bad[0]}={limits[bad[0]]} in {values[bad[0]][1]} must be >= 1")
    max_bad = _number(values, "max-bad-files", integer=True)
    if max_bad < 0:
        raise ConfigError(f"max-bad-files={max_bad} in {values['max-bad-files'][1]} must be >= 0")
    min_bucket = _number(values, "secagg-min-bucket", integer=True)
    if min_bucket < 1:
        raise ConfigError(f"secagg-min-bucket={min_bucket} in {values['secagg-min-bucket'][1]} must be >= 1")
    min_threshold = _number(values, "secagg-min-threshold")
    if not 0.5 <= min_threshold < 1:
        raise ConfigError(f"secagg-min-threshold={min_threshold} in {values['secagg-min-threshold'][1]} must be in "
                          "[0.5, 1), e.g. 0.75")
    threads = _number(values, "torch-threads", integer=True) if "torch-threads" in values else None
    if threads is not None and not 1 <= threads <= 1024:
        raise ConfigError(f"torch-threads={threads} in {values['torch-threads'][1]} must be in 1..1024")
    workers = _number(values, "data-workers", integer=True)
    if not 0 <= workers <= 64:
        raise ConfigError(f"data-workers={workers} in {values['data-workers'][1]} must be in 0..64")
    state_dir = Path(str(values["state-dir"][0])).expanduser()
    key_file = Path(str(values["key-file"][0])).expanduser() if "key-file" in values else state_dir / KEY_FILE
    cache_dir = Path(str(values["cache-dir"][0])).expanduser() if "cache-dir" in values else state_dir / CACHE_DIR
    return SitePolicy(
        hospital=name, simulated=simulated, index=index, state_dir=state_dir, data_path=data_path,
        synthetic_site=site, require_dp=_flag(values, "require-dp"), epsilon_cap=cap, delta=delta,
        max_local_epochs=limits["max-local-epochs"], max_batch_size=limits["max-batch-size"],
        max_rounds=limits["max-rounds"], allowed_models=_names(values, "allowed-models"),
        allowed_tasks=_names(values, "allowed-tasks"), torch_threads=threads, key_file=key_file,
        cache_dir=cache_dir, max_bad_files=max_bad, share_data_card=_flag(values, "share-data-card"),
        require_secagg=_flag(values, "require-secagg"), secagg_min_bucket=min_bucket,
        secagg_min_threshold=min_threshold, secagg_peer_keys=_peer_keys(values),
        share_gallery=_flag(values, "share-gallery"), data_workers=workers,
    )


def _synthetic_site(data_path: str | None, values: dict) -> int | None:
    if data_path is None or not data_path.startswith(SYNTHETIC):
        return None
    index = data_path[len(SYNTHETIC):]
    if not index.isdigit() or int(index) > 10_000:
        raise ConfigError(f"data-path={data_path!r} in {values['data-path'][1]}: use synthetic:<site index>, e.g. synthetic:0")
    return int(index)


def admit(policy: SitePolicy, request: Request) -> None:
    """Go ahead with ``request``, or raise why this hospital refuses it.

    Raises:
        ConfigError: one line for the server naming the request key and the policy key.
    """
    cfg = request.config
    fed, privacy = cfg.federation, cfg.privacy
    if policy.require_dp and not privacy.enabled:
        raise ConfigError("this hospital's policy requires DP-SGD (require-dp=true) but the request has "
                          "privacy.enabled=false; run with privacy=dp")
    if policy.require_secagg and not cfg.strategy.secagg.enabled:
        raise ConfigError("this hospital's policy sends updates only under secure aggregation (require-secagg=true) "
                          "but the request has strategy.secagg.enabled=false; run with strategy/secagg=on")
    checks = (
        (fed.local_epochs <= policy.max_local_epochs, f"federation.local_epochs={fed.local_epochs} exceeds max-local-epochs={policy.max_local_epochs}"),
        (cfg.personalization.epochs <= policy.max_local_epochs,
         f"personalization.epochs={cfg.personalization.epochs} exceeds max-local-epochs={policy.max_local_epochs}"),
        (fed.batch_size <= policy.max_batch_size, f"federation.batch_size={fed.batch_size} exceeds max-batch-size={policy.max_batch_size}"),
        (fed.rounds <= policy.max_rounds, f"federation.rounds={fed.rounds} exceeds max-rounds={policy.max_rounds}"),
        (policy.allowed_models is None or cfg.model.name in policy.allowed_models,
         f"model={cfg.model.name} is not in allowed-models={','.join(policy.allowed_models or ())}"),
        (policy.allowed_tasks is None or cfg.task.name in policy.allowed_tasks,
         f"task={cfg.task.name} is not in allowed-tasks={','.join(policy.allowed_tasks or ())}"),
        ((policy.synthetic_site is not None) == (cfg.data.name == "synthetic") or policy.simulated,
         f"data={cfg.data.name} does not match this hospital's data-path (synthetic:<i> is the demo data, "
         "anything else a datalist or npz)"),
    )
    refusal = next((why for ok, why in checks if not ok), None)
    if refusal:
        raise ConfigError(f"site policy: {refusal}")
