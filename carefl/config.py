"""Compose and validate the Hydra config: the one edge where every setting enters.

The ServerApp composes ``conf/config.yaml`` with the overrides it received
(``flwr run . --run-config "overrides='strategy=median federation.rounds=3'"``), validates
it once here. Hospitals never receive this tree: they get the narrow request of
:mod:`carefl.request`, built from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from carefl.choices import ACCOUNTANTS, GRAD_SAMPLE_MODES, LOSSES, NET_KINDS, TASK_KINDS
from carefl.errors import ConfigError

#: ``conf/`` next to the package (repo checkout, editable install, or a Flower FAB)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def split_overrides(text: str) -> list[str]:
    """One string of overrides as Hydra's list, split at spaces outside quotes, as a shell would
    split it, except that quotes inside an override stay for Hydra: ``key="a/b=="`` (how
    ``carefl-keygen`` says to register a key) keeps its quotes, so Hydra reads a string, where
    ``shlex.split`` dropped them and Hydra refused the bare ``/`` and ``=``. An override quoted
    whole, ``'federation.hospitals=[a,b]'``, loses its outer quotes, as in a shell."""
    items, current, quote = [], "", None
    for char in text:  # shlex cannot keep the quotes it groups by: a few lines of scanning
        if quote is None and char.isspace():
            if current:
                items.append(current)
            current = ""
            continue
        if char in "'\"" and quote in (None, char):
            quote = char if quote is None else None
        current += char
    if quote is not None:
        raise ConfigError(f"overrides {text!r}: a {quote} is never closed; close it, e.g. key=\"a b\"")
    items += [current] if current else []
    return [item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]


def compose_config(overrides: str | list[str] = "", conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate it.

    ``overrides`` is a list of Hydra override strings or one space-separated string
    (shell quoting allowed). Unknown groups/keys and bad values raise one ``ConfigError``.
    An override may not contain an interpolation (``${...}``): a resolver such as
    ``${oc.env:HOME}`` would read the server's environment into the run's config (and
    into the request every hospital receives), so only literal values come in from outside.
    """
    items = split_overrides(overrides) if isinstance(overrides, str) else list(overrides)
    for item in items:
        _require(
            "${" not in str(item),
            f"override {str(item)!r} contains an interpolation (${{...}}); overrides take literal "
            "values only, e.g. run_id=my-run privacy.target_delta=1e-5",
        )
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"Hydra config not found at {conf_dir}/config.yaml; run from a CareFL checkout")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=items)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"bad config override in {items}: {first} "
            "(see conf/ for the groups and keys; e.g. strategy=median federation.rounds=3)"
        ) from None
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: a name that becomes a file or directory name (hospital state dirs, ledger keys, run dirs):
#: no path separator, no leading dot (so neither "." nor ".."), no "$"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SAFE_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters"

#: federation.optimizer values carefl.training.make_optimizer builds (it has no public tuple)
_OPTIMIZERS = ("adam", "sgd")

_ABSENT = object()


def _show(value: Any) -> str:
    """A value as an override writes it (null, true, 'abc', [2, 2]), cut to 80 characters."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    _require(value is not _ABSENT, f"{key} is missing from the config; add it (conf/ lists every key with its default)")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(cfg: DictConfig, key: str, low: int, high: int, example: int) -> int:
    value = _get(cfg, key)
    _require(
        _is_int(value) and low <= value <= high,
        f"{key}={_show(value)} must be a whole number from {low} to {high}, e.g. {key}={example}",
    )
    return value


def _number(
    cfg: DictConfig, key: str, low: float, high: float | None, example: float, *,
    low_open: bool = True, high_open: bool = False, nullable: bool = False,
) -> float | None:
    """A finite number in the interval from ``low`` to ``high`` (None: no upper bound)."""
    value = _get(cfg, key)
    if value is None and nullable:
        return None
    ok = _is_number(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    rule = f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        rule += f" and {'<' if high_open else '<='} {high:g}"
    _require(ok, f"{key}={_show(value)} must be {rule} (a finite number), e.g. {key}={example:g}")
    return value


def _flag(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    _require(isinstance(value, bool), f"{key}={_show(value)} must be true or false")
    return value


def _choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    value = _get(cfg, key)
    _require(
        isinstance(value, str) and value in choices,
        f"{key}={_show(value)} is unknown; choose one of {list(choices)}, e.g. {key}={choices[0]}",
    )
    return value


def _safe_name(value: Any, key: str, example: str) -> None:
    _require(
        isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None,
        f"{key}={_show(value)} is not a safe name; use {_SAFE_RULE}, e.g. {key}={example}",
    )


def _integers(cfg: DictConfig, key: str, low: int, high: int, example: str) -> list[int]:
    """A non-empty list of whole numbers in [low, high] (at most 16 of them)."""
    value = _get(cfg, key)
    items = list(value) if isinstance(value, (ListConfig, list, tuple)) else None
    _require(
        items is not None and 1 <= len(items) <= 16 and all(_is_int(v) and low <= v <= high for v in items),
        f"{key}={_show(value)} must be a list of whole numbers from {low} to {high}, e.g. {key}={example}",
    )
    return items


def _no_interpolation(cfg: DictConfig) -> None:
    """No value outside ``hydra:`` may be an interpolation: reading it would run a resolver
    (``${oc.env:...}`` reads the environment) whose result would then travel in messages and
    run directories. The error names the key only, never the value."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not (path == "" and k == "hydra"):  # Hydra's own bookkeeping (run dirs)
                    walk(v, f"{path}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}{i}.")
        elif isinstance(node, str) and "${" in node:
            raise ConfigError(
                f"{path[:-1]} is an interpolation (${{...}}); CareFL takes literal values only, "
                "write the value itself"
            )

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _check_federation(cfg: DictConfig) -> int:
    """``federation.*`` (the trust keys: :func:`_check_trust`); returns n."""
    hospitals = _get(cfg, "federation.hospitals")
    _require(
        isinstance(hospitals, (ListConfig, list, tuple)),
        f"federation.hospitals={_show(hospitals)} must be a list of hospital names, e.g. [st-mary,riverside]",
    )
    n = len(hospitals)
    _require(n >= 1, "federation.hospitals is empty; list at least one hospital name")
    for name in hospitals:  # each names a state directory and the hospital's ledger entries
        _require(
            isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None,
            f"federation.hospitals has {_show(name)}, not a safe name (it names the hospital's state "
            f"directory and ledger entries); use {_SAFE_RULE}, e.g. st-mary",
        )
    _require(len(set(hospitals)) == n, f"federation.hospitals has duplicate names: {list(hospitals)}")
    _integer(cfg, "federation.rounds", 1, 10_000, 6)
    _integer(cfg, "federation.local_epochs", 1, 1000, 1)
    _integer(cfg, "federation.batch_size", 1, 4096, 32)
    _choice(cfg, "federation.optimizer", _OPTIMIZERS)
    _number(cfg, "federation.lr", 0, 1000, 0.005)
    min_hospitals = _get(cfg, "federation.min_hospitals")
    _require(
        _is_int(min_hospitals) and 1 <= min_hospitals <= n,
        f"federation.min_hospitals={_show(min_hospitals)} must be between 1 and the {n} hospitals listed",
    )
    _number(cfg, "federation.round_timeout_s", 0, None, 600)
    _flag(cfg, "federation.baselines")
    _integer(cfg, "federation.torch_threads", 1, 256, 1)
    return n


def _check_trust(cfg: DictConfig) -> None:
    """Update-norm bounds, simulated site policies, registered hospital keys, the server key."""
    from carefl.receipts import is_b64  # local: cryptography is only needed here
    from carefl.site import NODE_KEYS

    _number(cfg, "federation.max_update_norm", 0, None, 100.0, nullable=True)
    _number(cfg, "federation.max_update_norm_ratio", 1, None, 10.0, low_open=False, nullable=True)
    hospitals = set(_get(cfg, "federation.hospitals"))
    policies = _get(cfg, "federation.site_policies")
    _require(isinstance(policies, (DictConfig, dict)), "federation.site_policies must be a mapping hospital -> node config")
    for name, policy in policies.items():
        _require(name in hospitals, f"federation.site_policies.{name}: {name} is not in federation.hospitals")
        unknown = sorted(set(policy) - set(NODE_KEYS)) if isinstance(policy, (DictConfig, dict)) else ["(not a mapping)"]
        _require(not unknown, f"federation.site_policies.{name} has unknown keys {unknown}; use {', '.join(NODE_KEYS)}")
    keys = _get(cfg, "federation.hospital_keys")
    _require(isinstance(keys, (DictConfig, dict)), "federation.hospital_keys must be a mapping hospital -> public key")
    for name, key in keys.items():
        _require(name in hospitals, f"federation.hospital_keys.{name}: {name} is not in federation.hospitals")
        _require(is_b64(key, 32), f"federation.hospital_keys.{name}={_show(key)} is not a base64 Ed25519 public key; "
                 "register what `carefl-keygen STATE_DIR` prints on the hospital")
    server_key = _get(cfg, "federation.server_key")
    _require(server_key is None or isinstance(server_key, str),
             f"federation.server_key={_show(server_key)} must be null or the path of the server's signing key")


def _check_privacy(cfg: DictConfig) -> None:
    if not _flag(cfg, "privacy.enabled"):
        return
    epsilon = _number(cfg, "privacy.target_epsilon", 0, 1e6, 8.0, nullable=True)
    sigma = _number(cfg, "privacy.noise_multiplier", 0, 1e6, 1.0, nullable=True)
    _require(
        epsilon is not None or sigma is not None,
        "privacy.target_epsilon=null must be > 0 (noise is calibrated to reach it) or set "
        "privacy.noise_multiplier, e.g. privacy.target_epsilon=8",
    )
    _number(cfg, "privacy.target_delta", 0, 1, 1e-5, high_open=True)
    _number(cfg, "privacy.max_grad_norm", 0, 1e6, 0.1)
    _choice(cfg, "privacy.accountant", ACCOUNTANTS)
    _flag(cfg, "privacy.secure_mode")
    if "grad_sample_mode" in cfg.privacy:  # runs saved before it existed train with hooks
        _choice(cfg, "privacy.grad_sample_mode", GRAD_SAMPLE_MODES)


def _check_task_and_model(cfg: DictConfig) -> tuple[int, int]:
    """``task.*`` and ``model.*``; returns the input side (multiple, minimum) the net needs."""
    _safe_name(_get(cfg, "task.name"), "task.name", "seg2d")
    kind = _choice(cfg, "task.kind", TASK_KINDS)
    _integer(cfg, "task.spatial_dims", 2, 3, 2)
    _integer(cfg, "task.in_channels", 1, 64, 1)
    # segmentation: 1 = binary (one sigmoid logit), K >= 2 = K classes with background (softmax);
    # classification: one logit per class
    _integer(cfg, "task.num_classes", 1 if kind == "segmentation" else 2, 1000, 3 if kind == "segmentation" else 2)
    loss = _get(cfg, "task.loss")
    _require(loss in LOSSES[kind], f"task.loss={_show(loss)} is not a {kind} loss; use task.loss={' | '.join(LOSSES[kind])}")

    name = _get(cfg, "model.name")
    _require(
        isinstance(name, str) and name in NET_KINDS,
        f"model.name={_show(name)} is unknown; choose model= one of {sorted(NET_KINDS)}",
    )
    if NET_KINDS[name] != kind:
        valid = sorted(n for n, k in NET_KINDS.items() if k == kind)
        raise ConfigError(
            f"model={name} builds a {NET_KINDS[name]} net but task={cfg.task.name} is {kind}; "
            f"choose model= one of {valid}"
        )
    _integer(cfg, "model.norm_groups", 1, 512, 8)
    return _input_side(cfg, name)


def _input_side(cfg: DictConfig, name: str) -> tuple[int, int]:
    """Check the net's own keys; return (multiple, minimum) for every spatial side of its input.

    Found by building each net (carefl.models.build_model, default conf/model files and other
    strides) and running a forward pass over every side 1..69 (2D) and 1..39 (3D):

    - unet: a multiple of the product of ``model.strides``, at least that product (strides
      [2, 2]: 4, 8, 12, ...; [2, 3]: 12, 18, ...). Each stride-s convolution rounds its side up
      and the transposed one multiplies it by s, so any other side fails at the skip
      concatenation ("Sizes of tensors must match").
    - basicunet: any side >= 16. It max-pools 4 times by 2 and pads the up-sampled map to its
      skip, so 17 works too; below 16 a pool reaches a side of 0.
    - densenet121: any side >= 29. The stride-2 stem and the stride-2 max-pool give
      ceil(side / 4), which 3 transitions halve (rounding down) and must keep >= 1.
    - classifier: any side (stride-s convolutions round up, the head pools adaptively).
    """
    if name == "unet":
        channels = _integers(cfg, "model.channels", 1, 4096, "[16,32,64]")
        strides = _integers(cfg, "model.strides", 1, 8, "[2,2]")
        _require(
            len(channels) >= 2 and len(strides) == len(channels) - 1,
            f"model.strides={strides} and model.channels={channels}: UNet needs at least 2 channels "
            "and one stride fewer than channels, e.g. model.channels=[16,32,64] model.strides=[2,2]",
        )
        _integer(cfg, "model.num_res_units", 0, 16, 1)
        return math.prod(strides), math.prod(strides)
    if name == "classifier":
        channels = _integers(cfg, "model.channels", 1, 4096, "[8,16,32]")
        strides = _integers(cfg, "model.strides", 1, 8, "[2,2,2]")
        _require(
            len(strides) == len(channels),
            f"model.strides={strides} and model.channels={channels}: the classifier needs one stride "
            "per channel width, e.g. model.channels=[8,16,32] model.strides=[2,2,2]",
        )
        _integer(cfg, "model.num_res_units", 0, 16, 1)
        return 1, 1
    if name == "basicunet":
        features = _integers(cfg, "model.features", 1, 4096, "[8,8,16,32,64,8]")
        _require(
            len(features) == 6,
            f"model.features={features} must list 6 widths (BasicUNet's 5 levels and its last "
            "up-sampling block), e.g. model.features=[8,8,16,32,64,8]",
        )
        return 1, 16
    if name == "densenet121":
        return 1, 29
    return 1, 1  # a net without a rule here: a bad input size fails when the net first runs


def _check_data(cfg: DictConfig, side: tuple[int, int]) -> None:
    """``data.*``: the keys each data source has (conf/data/*.yaml); input sizes against the net."""
    data = cfg.data
    _safe_name(_get(cfg, "data.name"), "data.name", "synthetic")
    dims = cfg.task.spatial_dims
    for key, high, example in (("image_size", 1024, 48), ("image_size_3d", 256, 32)):
        if key in data:
            _integer(cfg, f"data.{key}", 8, high, example)
    for key in ("n_train", "n_test"):
        if key in data:
            _integer(cfg, f"data.{key}", 1, 100_000, 300 if key == "n_train" else 32)
    if "test_fraction" in data:
        _number(cfg, "data.test_fraction", 0, 1, 0.25, high_open=True)
    if "site_mix_alpha" in data:  # synthetic: Dirichlet scanner mix per hospital
        _number(cfg, "data.site_mix_alpha", 0, 1e6, 0.5, nullable=True)
    if "site_mix_sites" in data:
        _integer(cfg, "data.site_mix_sites", 1, 1000, 10)
    if "preprocess" in data:  # decathlon: a preset file every hospital holds (carefl.data.presets)
        from carefl.data.presets import load_preset

        load_preset(_get(cfg, "data.preprocess"))
    if "sw_overlap" in data:
        _number(cfg, "data.sw_overlap", 0, 0.99, 0.25, low_open=False)
    if "sw_batch_size" in data:
        _integer(cfg, "data.sw_batch_size", 1, 4096, 4)
    if "spatial_size" in data:  # decathlon: the network's input (patches / sliding windows / resize)
        sizes = _integers(cfg, "data.spatial_size", 8, 1024, "[64,64]")
        _require(
            len(sizes) == dims,
            f"data.spatial_size={sizes} has {len(sizes)} values but task.spatial_dims={dims}; "
            f"give one size per spatial dimension, e.g. data.spatial_size={[64] * dims}",
        )
        sides = {"data.spatial_size": sizes}
    elif f"image_size{'_3d' if dims == 3 else ''}" in data:  # synthetic: square / cubic images
        key = f"data.image_size{'_3d' if dims == 3 else ''}"
        sides = {key: [_get(cfg, key)]}
    else:  # medmnist: the size is the file's, known only on the hospital
        return
    multiple, minimum = side
    for key, values in sides.items():
        if any(v % multiple or v < minimum for v in values):
            fits = [max(minimum, multiple * round(v / multiple)) for v in values]
            rule = f"a multiple of {multiple} (the product of model.strides)" if multiple > 1 else f"at least {minimum}"
            shown = values if key == "data.spatial_size" else values[0]
            fit = "[" + ",".join(map(str, fits)) + "]" if key == "data.spatial_size" else fits[0]
            raise ConfigError(
                f"{key}={_show(shown)} does not fit model={cfg.model.name}: every side must be {rule}, "
                f"e.g. {key}={fit}"
            )


def _check_compression(cfg: DictConfig) -> None:
    """``compression`` (conf/compression/): what a hospital sends (carefl/compression.py)."""
    from carefl.compression import METHODS

    if "compression" not in cfg:
        raise ConfigError("compression is missing; compose the config from conf/ (compression=none)")
    _choice(cfg, "compression.name", METHODS)
    _integer(cfg, "compression.block", 16, 65536, 256)
    _number(cfg, "compression.fraction", 0, 1, 0.1)


def _check_secagg(cfg: DictConfig, n: int) -> int:
    """``strategy.secagg`` (conf/secagg/); returns the rows the robust rule sees a round: the
    number of secure buckets, or ``n`` without secure aggregation."""
    from carefl.secagg.coordinator import buckets_needed
    from carefl.secagg.quantize import max_bucket

    if "secagg" not in cfg.strategy:
        raise ConfigError("strategy.secagg is missing; compose the config from conf/ (secagg=off or secagg=on)")
    enabled = _flag(cfg, "strategy.secagg.enabled")
    size = _get(cfg, "strategy.secagg.bucket_size")
    if size is not None:
        _integer(cfg, "strategy.secagg.bucket_size", 1, n, min(3, n))
    _number(cfg, "strategy.secagg.clip", 0, 1e6, 10.0)
    bits = _integer(cfg, "strategy.secagg.bits", 8, 24, 22)
    _number(cfg, "strategy.secagg.threshold", 0.5, 1, 0.5, low_open=False, high_open=True)
    if not enabled:
        return n
    largest = n if size is None else min(n, 2 * size - 1)
    _require(largest <= max_bucket(bits),
             f"strategy.secagg.bits={bits} lets a bucket hold at most {max_bucket(bits)} hospitals (the 32-bit sum must "
             f"not wrap) but one may hold {largest}; lower strategy.secagg.bits or set strategy.secagg.bucket_size")
    _require(_get(cfg, "compression.name") == "none",
             f"compression={_get(cfg, 'compression.name')} cannot be used with secagg=on: masks are added in a ring, "
             "so per-hospital float16 values, int8 scales or top-k indices do not add up inside a masked sum "
             "(secure aggregation quantises updates itself); drop one of the two")
    attack = str(cfg.attack.get("name", "none"))
    _require(attack in ("none", "labelflip"),
             f"attack={attack} replaces updates on the server, which under secure aggregation never sees one; "
             "simulate it without secagg (bucketing, strategy.pre=[{name: bucketing, s: ...}], is the same rule "
             "over bucket means) or use attack=labelflip, which acts on a hospital's data")
    return buckets_needed(n, size)


def _check_tracking(cfg: DictConfig) -> None:
    """``tracking`` (conf/tracking/): the viewers a run also writes to (carefl/tracking.py).
    A config saved before the group existed means TensorBoard."""
    if OmegaConf.select(cfg, "tracking") is None:
        return
    if _choice(cfg, "tracking.name", ("tensorboard", "mlflow")) != "mlflow":
        return
    uri = _get(cfg, "tracking.uri")
    _require(uri is None or (isinstance(uri, str) and uri.strip() != ""),
             f"tracking.uri={_show(uri)} is not a URI; use e.g. http://mlflow.example.org:5000 or "
             "sqlite:////abs/path/mlflow.db, or null for a SQLite file beside the run directories")
    _require(isinstance(_get(cfg, "tracking.experiment"), str) and cfg.tracking.experiment.strip() != "",
             f"tracking.experiment={_show(cfg.tracking.experiment)} must name an MLflow experiment, e.g. carefl")
    import importlib.util

    _require(importlib.util.find_spec("mlflow") is not None,
             "tracking=mlflow needs MLflow, which is not installed here: pip install -e \".[mlflow]\" "
             "(mlflow-skinny and its SQLite store), or use tracking=tensorboard")


def validate(cfg: DictConfig) -> None:
    """Check every value a run reads before anything is written; each failure is one line
    naming the key, the bad value and the fix.

    Called on the composed config (:func:`compose_config`), on a resumed run's saved
    ``config.yaml`` and by ``carefl-sim``. Types are checked too: a Hydra override
    ``federation.rounds=abc`` or ``=2.5`` is refused here, not deep inside a round. Fast: no
    network is built (the input-size rule per net is arithmetic, see :func:`_input_side`).
    """
    _no_interpolation(cfg)  # first: reading an interpolated value would run its resolver
    _integer(cfg, "seed", 0, 2**31 - 1, 0)
    run_id = _get(cfg, "run_id")
    if run_id is not None:  # names the run directory <output_dir>/<run_id>
        _safe_name(str(run_id) if _is_int(run_id) else run_id, "run_id", "my-run")
    n = _check_federation(cfg)
    _check_trust(cfg)
    _check_privacy(cfg)
    side = _check_task_and_model(cfg)
    _check_data(cfg, side)
    _number(cfg, "strategy.prox_mu", 0, 1e6, 0.01, low_open=False)
    mode = _choice(cfg, "personalization.name", ("none", "finetune", "fedbn", "ditto"))
    if mode in ("finetune", "ditto"):
        _integer(cfg, "personalization.epochs", 1, 1000, 4 if mode == "finetune" else 1)
        if "lr" in cfg.personalization:  # null: federation.lr
            _number(cfg, "personalization.lr", 0, 1000, 0.01, nullable=True)
    if mode == "ditto":
        _number(cfg, "personalization.lambda", 0, 1e6, 0.1, low_open=False)
    from carefl.robust import check_assumptions  # local: robust imports torch-heavy code

    _check_compression(cfg)
    _check_tracking(cfg)
    rows = _check_secagg(cfg, n)
    check_assumptions(cfg.strategy, rows, "hospitals" if rows == n and not cfg.strategy.secagg.enabled else
                      f"secure buckets of strategy.secagg.bucket_size={cfg.strategy.secagg.bucket_size} among {n} hospitals")
    from carefl.attacks import byzantine_indices

    byzantine_indices(cfg.attack, n)
