"""Preprocessing presets: MONAI dictionary transforms per modality, from ``conf/preprocess/<name>.yaml``.

    preset = load_preset("ct")                 # the hospital's own copy, checked
    preset.digest                              # sha256 of its canonical JSON (what a request carries)
    steps, augment = build_transforms(preset)  # monai Compose objects (Hydra instantiate)

A preset file holds ``name``, ``steps`` (deterministic transforms, run once per file and cached),
``augment`` (random transforms, training only) and the segmentation patch sampler's
``crop_pos``/``crop_neg`` weights. The trust argument: the transforms a hospital runs are built
from its own file, never from a message. The server sends the name and the digest of the copy
it planned with (``data.preprocess``, ``data.preprocess_digest``); a hospital whose copy differs
refuses the round, so a consortium cannot silently train on two preprocessings. Every
``_target_`` must name a class of ``monai.transforms`` (checked before anything is
instantiated), so even an edited preset file cannot make Hydra import arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carefl.config import CONF_DIR
from carefl.errors import ConfigError

#: where the preset files live (the checkout's / app's ``conf/preprocess``)
PRESET_DIR = CONF_DIR / "preprocess"
_TARGET = re.compile(r"monai\.transforms\.[A-Za-z][A-Za-z0-9_]*")
_KEYS = {"name", "steps", "augment", "crop_pos", "crop_neg"}


@dataclass(frozen=True)
class Preset:
    """A checked preset: its file's content (``spec``) and the sha256 hex ``digest`` of it."""

    name: str
    spec: dict[str, Any]
    digest: str


def available() -> list[str]:
    """Names of the preset files in :data:`PRESET_DIR`."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, expected_digest: str | None = None, directory: Path = PRESET_DIR) -> Preset:
    """Read and check ``<directory>/<name>.yaml``.

    Args:
        name: ``data.preprocess``.
        expected_digest: the digest the server planned with (a request's
            ``data.preprocess_digest``); None skips the comparison.
    Raises:
        ConfigError: unknown preset, malformed file, a ``_target_`` outside ``monai.transforms``,
            or a digest that differs from this copy's (the message says what to do).
    """
    path = Path(directory) / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or not path.is_file():
        raise ConfigError(f"data.preprocess={name!r} is not a preset; choose one of {available()} "
                          f"(files in {directory}) or add conf/preprocess/{name}.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"preset file {path} is not valid YAML ({e})") from e
    if not isinstance(spec, dict) or set(spec) != _KEYS or spec["name"] != name:
        raise ConfigError(f"preset file {path} must hold exactly {sorted(_KEYS)} with name: {name}")
    for part in ("steps", "augment"):
        if not isinstance(spec[part], list):
            raise ConfigError(f"preset file {path}: {part} must be a list of transforms")
        for i, step in enumerate(spec[part]):
            target = step.get("_target_") if isinstance(step, dict) else None
            if not isinstance(target, str) or not _TARGET.fullmatch(target):
                raise ConfigError(f"preset file {path}: {part}[{i}] has _target_={target!r}; only "
                                  "monai.transforms.<Class> may be instantiated")
    for key in ("crop_pos", "crop_neg"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], (int, float)) or spec[key] < 0:
            raise ConfigError(f"preset file {path}: {key}={spec[key]!r} must be a number >= 0")
    if spec["crop_pos"] + spec["crop_neg"] <= 0:
        raise ConfigError(f"preset file {path}: crop_pos + crop_neg must be > 0")
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise ConfigError(
            f"preprocessing preset {name!r}: this hospital's copy ({path}, digest {digest[:12]}) differs from the "
            f"one the server planned with (digest {expected_digest[:12]}); the consortium must ship one preset file "
            "to every hospital"
        )
    return Preset(name, spec, digest)


def build_transforms(preset: Preset):
    """``(steps, augment)`` as ``monai.transforms.Compose`` built by ``hydra.utils.instantiate``."""
    from hydra.utils import instantiate
    from monai.transforms import Compose

    try:
        return tuple(Compose([instantiate(s) for s in preset.spec[part]]) for part in ("steps", "augment"))
    except Exception as e:  # Hydra wraps constructor errors; all mean "this preset cannot be built"
        raise ConfigError(f"preprocessing preset {preset.name!r} cannot be built: {e}") from e
