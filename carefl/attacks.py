"""Simulated Byzantine hospitals — simulation only, unreachable in deployment.

Two places an attack can act:

* **on the update matrix** (omniscient attacks): the server replaces the Byzantine rows of
  ``updates: Tensor (n, d) float32`` (one row per hospital, ``local - global`` flattened)
  before aggregation, knowing every honest row. :func:`apply_update_attack`.
* **inside a hospital's data** (label flipping): the hospital trains on corrupted labels and
  sends an honest-looking update. :func:`flips_labels` / :func:`flip_labels`.

``attack_cfg`` is ``cfg.attack`` (``conf/attack/<name>.yaml``), any mapping with:

========== =========================================================================
name       none | labelflip | signflip | gaussian | scaling | alie | ipm
byzantine  list of hospital indices, or null to use ``fraction``
fraction   the last ``round(fraction * n)`` hospitals (half up) are Byzantine
scale      signflip: rows become ``-scale * u``
sigma      gaussian: rows become ``N(0, sigma^2)`` noise (fresh per row and coordinate)
factor     scaling: rows become ``factor * u``; null -> ``n`` (model replacement,
           Bagdasaryan et al. 2020, with a server step of 1)
z          alie: rows become ``mu - z * sigma``; null -> ``z_max`` from n and f (Baruch et al.)
epsilon    ipm: rows become ``-epsilon * mean(honest rows)`` (Xie et al. 2020)
========== =========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import torch
from torch import Tensor

from carefl.errors import ConfigError

#: attack name -> its parameter keys (each documented in the module docstring)
ATTACK_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "labelflip": (),
    "signflip": ("scale",),
    "gaussian": ("sigma",),
    "scaling": ("factor",),
    "alie": ("z",),
    "ipm": ("epsilon",),
}
#: parameters that may be null (the attack then derives them from n and f)
_NULLABLE = {"factor", "z"}


def _params(attack_cfg: Mapping) -> dict[str, float | None]:
    """The named attack's parameters, validated (each error names the ``attack.`` key)."""
    name = attack_cfg.get("name")
    if name not in ATTACK_PARAMS:
        raise ConfigError(f"attack.name={name!r} is unknown; choose one of {sorted(ATTACK_PARAMS)}")
    params: dict[str, float | None] = {}
    for key in ATTACK_PARAMS[name]:
        if key not in attack_cfg:
            raise ConfigError(f"attack.{key} is missing for attack {name!r}; set it (see conf/attack/{name}.yaml)")
        value = attack_cfg[key]
        if value is None and key in _NULLABLE:
            params[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"attack.{key}={value!r} must be a finite number")
        if key != "z" and value <= 0:
            raise ConfigError(f"attack.{key}={value!r} must be > 0")
        params[key] = float(value)
    return params


def byzantine_indices(attack_cfg: Mapping, n_hospitals: int) -> list[int]:
    """Sorted indices (into ``federation.hospitals``) of the Byzantine hospitals.

    ``attack.byzantine`` (a list) wins; when it is null or absent, ``attack.fraction``
    picks the last ``round(fraction * n)`` hospitals (rounded half up, deterministic).
    Also validates the attack's name and parameters, so a composed config fails early.
    """
    _params(attack_cfg)
    chosen = attack_cfg.get("byzantine")
    if chosen is None:
        fraction = attack_cfg.get("fraction")
        if fraction is None:
            return []
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError(f"attack.fraction={fraction!r} must be a number in [0, 1)")
        count = math.floor(fraction * n_hospitals + 0.5)
        return list(range(n_hospitals - count, n_hospitals))
    return _checked_indices(chosen, n_hospitals)


def _checked_indices(chosen: object, n_hospitals: int) -> list[int]:
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence):
        raise ConfigError(f"attack.byzantine={chosen!r} must be a list of hospital indices, e.g. [0, 2]")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_hospitals:
            raise ConfigError(
                f"attack.byzantine contains {i!r}: indices must be integers in [0, {n_hospitals - 1}] "
                f"(positions in federation.hospitals, {n_hospitals} hospitals)"
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"attack.byzantine={list(chosen)} lists a hospital twice")
    return sorted(chosen)


def alie_z(n: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch et al. 2019, Algorithm 1).

    ``s = floor(n/2 + 1) - f`` honest "supporters" are needed; ``z_max = Phi^-1((n - s) / n)``
    with ``Phi`` the standard normal CDF. E.g. n=10, f=2 -> s=4 -> z = Phi^-1(0.6) = 0.2533.
    """
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ConfigError(f"attack.z: ALIE's z_max is undefined for n={n}, f={f}; set attack.z to a number")
    return NormalDist().inv_cdf(p)


# Each rule maps (honest rows (h, d), Byzantine rows' own updates (f, d), params, n, generator)
# to the Byzantine rows' replacement (f, d).
_Rule = Callable[[Tensor, Tensor, dict, int, torch.Generator], Tensor]


def _signflip(honest: Tensor, own: Tensor, p: dict, n: int, gen: torch.Generator) -> Tensor:
    return -p["scale"] * own


def _gaussian(honest: Tensor, own: Tensor, p: dict, n: int, gen: torch.Generator) -> Tensor:
    noise = torch.randn(own.shape, generator=gen, dtype=own.dtype, device=gen.device)
    return p["sigma"] * noise.to(own.device)


def _scaling(honest: Tensor, own: Tensor, p: dict, n: int, gen: torch.Generator) -> Tensor:
    factor = float(n) if p["factor"] is None else p["factor"]
    return factor * own


def _alie(honest: Tensor, own: Tensor, p: dict, n: int, gen: torch.Generator) -> Tensor:
    z = alie_z(n, own.shape[0]) if p["z"] is None else p["z"]
    # population std (correction=0): defined even for one honest row
    mu, sigma = honest.mean(dim=0), honest.std(dim=0, correction=0)
    return (mu - z * sigma).expand_as(own)


def _ipm(honest: Tensor, own: Tensor, p: dict, n: int, gen: torch.Generator) -> Tensor:
    return (-p["epsilon"] * honest.mean(dim=0)).expand_as(own)


_RULES: dict[str, _Rule] = {
    "signflip": _signflip,
    "gaussian": _gaussian,
    "scaling": _scaling,
    "alie": _alie,
    "ipm": _ipm,
}
_NEEDS_HONEST = {"alie", "ipm"}


def apply_update_attack(
    attack_cfg: Mapping, updates: Tensor, byzantine: list[int], generator: torch.Generator
) -> Tensor:
    """Replace the Byzantine rows of ``updates`` by the configured omniscient attack.

    Args:
        attack_cfg: ``cfg.attack``.
        updates: ``(n, d)`` float32, one row per hospital (local - global), not modified.
        byzantine: row indices of the attackers (from :func:`byzantine_indices`).
        generator: seeds the random attacks (gaussian); same seed -> same output.

    Returns:
        a new ``(n, d)`` tensor; honest rows are equal to the input's. ``none`` and
        ``labelflip`` (which acts on data, not updates) return an unchanged copy.
    """
    if updates.dim() != 2 or not updates.is_floating_point():
        raise ValueError(f"updates must be a floating (n, d) tensor, got {tuple(updates.shape)} {updates.dtype}")
    params = _params(attack_cfg)
    n = updates.shape[0]
    rows = _checked_indices(byzantine, n)
    out = updates.clone()
    rule = _RULES.get(attack_cfg["name"])
    if rule is None or not rows:
        return out
    is_byz = torch.zeros(n, dtype=torch.bool)
    is_byz[rows] = True
    honest = updates[~is_byz]
    if attack_cfg["name"] in _NEEDS_HONEST and honest.shape[0] == 0:
        raise ConfigError(
            f"attack.byzantine: all {n} hospitals are Byzantine, but {attack_cfg['name']} "
            "needs honest updates to imitate; leave at least one honest hospital"
        )
    out[rows] = rule(honest, updates[rows], params, n, generator)
    return out


def flips_labels(attack_cfg: Mapping, index: int, n_hospitals: int) -> bool:
    """Whether hospital ``index`` trains on flipped labels (``attack.name == labelflip``)."""
    return attack_cfg.get("name") == "labelflip" and index in byzantine_indices(attack_cfg, n_hospitals)


def flip_labels(label: Tensor, task_kind: str, num_classes: int) -> Tensor:
    """The corrupted label a label-flipping hospital trains on.

    Args:
        label: segmentation mask ``float32 (1, *spatial)`` ({0, 1}, or class indices when
            ``num_classes >= 2``), or a classification label ``int64`` of any shape (``()`` per
            sample, ``(N,)`` per batch).
        task_kind: ``cfg.task.kind``: ``segmentation`` | ``classification``.
        num_classes: ``cfg.task.num_classes`` (classification: >= 2).

    Returns:
        binary segmentation: ``1 - mask`` (foreground <-> background); K-class segmentation and
        classification: ``(c + 1) % K`` (for 2 classes, the binary flip ``1 - c``).
    """
    if task_kind == "segmentation" and num_classes == 1:
        return 1 - label
    if task_kind == "segmentation":
        return (label + 1) % num_classes
    if task_kind == "classification":
        if num_classes < 2:
            raise ConfigError(f"task.num_classes={num_classes}: label flipping needs at least 2 classes")
        return (label + 1) % num_classes
    raise ConfigError(f"task.kind={task_kind!r} must be 'segmentation' or 'classification'")
