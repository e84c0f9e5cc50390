"""Compose and validate the Hydra config: the one edge where every setting enters.

The ServerApp composes ``conf/config.yaml`` with the overrides it received
(``flwr run . --run-config "overrides='strategy=median federation.rounds=3'"``), validates
it once here, and sends hospitals the resolved tree as JSON. Hospitals never read ``conf/``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from carefl.errors import ConfigError

#: ``conf/`` next to the package (repo checkout, editable install, or a Flower FAB)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: str | list[str] = "", conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate it.

    ``overrides`` is a list of Hydra override strings or one space-separated string
    (shell quoting allowed). Unknown groups/keys and bad values raise one ``ConfigError``.
    """
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
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


def validate(cfg: DictConfig) -> None:
    """Check values the code cannot work with; each failure names the key and the fix."""
    fed = cfg.federation
    n = len(fed.hospitals)
    _require(n >= 1, "federation.hospitals is empty; list at least one hospital name")
    _require(len(set(fed.hospitals)) == n, f"federation.hospitals has duplicate names: {list(fed.hospitals)}")
    _require(fed.rounds >= 1, f"federation.rounds={fed.rounds} must be >= 1")
    _require(fed.local_epochs >= 1, f"federation.local_epochs={fed.local_epochs} must be >= 1")
    _require(fed.batch_size >= 1, f"federation.batch_size={fed.batch_size} must be >= 1")
    _require(
        1 <= fed.min_hospitals <= n,
        f"federation.min_hospitals={fed.min_hospitals} must be between 1 and the {n} hospitals listed",
    )
    _require(fed.torch_threads >= 1, f"federation.torch_threads={fed.torch_threads} must be >= 1")
    _require(fed.round_timeout_s > 0, f"federation.round_timeout_s={fed.round_timeout_s} must be > 0")
    priv = cfg.privacy
    if priv.enabled:
        if priv.noise_multiplier is None:
            _require(
                priv.target_epsilon is not None and priv.target_epsilon > 0,
                f"privacy.target_epsilon={priv.target_epsilon} must be > 0 (or set privacy.noise_multiplier)",
            )
        else:
            _require(priv.noise_multiplier > 0, f"privacy.noise_multiplier={priv.noise_multiplier} must be > 0")
        _require(0 < priv.target_delta < 1, f"privacy.target_delta={priv.target_delta} must be in (0, 1)")
        _require(priv.max_grad_norm > 0, f"privacy.max_grad_norm={priv.max_grad_norm} must be > 0")
    from carefl.robust import check_assumptions  # local: robust imports torch-heavy code

    check_assumptions(cfg.strategy, n)
    from carefl.attacks import byzantine_indices

    byzantine_indices(cfg.attack, n)


def to_json(cfg: DictConfig) -> str:
    """The resolved config as JSON (what hospitals receive)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    """Inverse of :func:`to_json`."""
    return OmegaConf.create(json.loads(text))
