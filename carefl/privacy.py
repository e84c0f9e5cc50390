"""Differential privacy for each hospital: Opacus DP-SGD, accountant persistence, site budget.

The guarantee
-------------
Each hospital h trains with DP-SGD (Abadi et al. 2016) as implemented by Opacus:

- every local step draws a batch by **Poisson sampling**: each record of h's training set
  (size N) joins the batch independently with probability q. Opacus sets
  ``q = 1 / len(loader) = 1 / ceil(N / batch_size)`` (= batch_size / N when batch_size
  divides N); :func:`sample_rate` returns exactly that q;
- every per-sample gradient is **clipped** to L2 norm at most ``C = max_grad_norm``;
- the clipped sum gets **Gaussian noise** N(0, (sigma * C)^2 I), sigma = ``noise_multiplier``.

Every step is a Poisson-subsampled Gaussian mechanism with sensitivity C under add/remove of
one record. The accountant (PRV by default, RDP as an alternative) composes all steps h has
ever taken on this training set -- every local step of every round of every run whose
accountant history lives in h's state dir -- into one (epsilon, delta). Hence:

    The sequence of everything h sends that is computed from its training set (the model
    weights after each round, for all rounds) is (epsilon, delta)-DP with respect to adding
    or removing one record of h's training set, with epsilon = :func:`epsilon` of the saved
    history and delta = the site's delta.

One record = one image with its label (record level). A patient who contributes several
images (slices, visits, both sides) is protected only at group level: k records give roughly
k*epsilon. Patient-level DP needs one record per patient (or per-patient sampling), which
this module does not do. The label is part of the record: label-level privacy is implied.

The server sees the trained weights; they ARE covered. Anything computed from the weights
without touching the private data again is post-processing and keeps the same guarantee:
FedAvg, median, Krum, trimmed mean, server optimisers, anomaly scores, the published global
model. That is why DP-SGD composes with ANY aggregation rule -- robust rules need no privacy
argument of their own, and Byzantine hospitals cannot weaken h's guarantee (they only see
post-processed weights too).

NOT protected:

- the training set size N: it is sent as ``num-examples`` and also follows from q (and so
  from the epsilon a hospital reports);
- the test set and everything computed from it. CareFL's evaluate replies with test-set loss
  and metrics (Dice / AUC / accuracy) and the test-set size, computed without noise: they are
  outside this guarantee. Privatise them (or do not send them) if the test set is sensitive;
- any statistic of the training set other than the DP-SGD weights (e.g. a plain training
  loss): a ClientApp must not send one, or it falls outside the guarantee;
- h's data against h's own staff, and membership of h in the consortium.

Budget
------
Noise is calibrated ONCE for the whole planned federation (rounds x local steps,
:func:`calibrate_noise`), never per round. Each hospital keeps its accountant history in its
own state dir (:func:`load_history`, :func:`save_history`, atomic), restores it into every
round's fresh PrivacyEngine (:func:`make_private`) so epsilon never restarts, and refuses a
round that would push its epsilon over its own cap (:func:`site_policy`, :func:`budget_check`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from carefl.checkpoint import atomic_write_text
from carefl.errors import ConfigError

# Opacus' per-sample-gradient hooks fire on module outputs when the input needs no grad (the
# first layer); torch warns on every backward although nothing is wrong. Keep logs readable.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")

#: One accountant history entry: (noise_multiplier sigma, sample_rate q, number of steps).
Step = tuple[float, float, int]

HISTORY_FILE = "privacy_history.json"
ACCOUNTANTS = ("prv", "rdp")
#: Opacus per-sample gradient modes that train all our nets (privacy.grad_sample_mode).
#: benchmarks/bench_dp.py: "ew" (ExpandedWeights) fails on PReLU, ConvTranspose and DenseNet's
#: strided views; "ghost" needs a per-sample loss of shape (N,) and is slower for conv nets.
GRAD_SAMPLE_MODES = ("hooks", "functorch")


def _eps_error(eps: float) -> float:
    """PRV's absolute epsilon tolerance: Opacus' 0.01 is 2% at epsilon=0.5; keep it <= 0.5%."""
    return min(0.01, max(1e-3, 0.005 * eps))


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={accountant} is unknown; choose one of {ACCOUNTANTS}")


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q that Opacus uses for a loader over ``num_examples`` records.

    ``q = 1 / ceil(num_examples / batch_size)``; one epoch is ``1 / q`` steps.
    """
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier sigma whose epsilon after ``steps`` steps is <= target.

    Call it once for the whole planned federation: ``steps = rounds * local_epochs / q``.

    Args:
        target_epsilon: privacy.target_epsilon (> 0).
        delta: the hospital's delta, in (0, 1).
        sample_rate: q of :func:`sample_rate`, in (0, 1].
        steps: all local steps of all planned rounds (>= 1).
        accountant: "prv" | "rdp".
    Returns:
        sigma (dimensionless; the noise std is sigma * max_grad_norm). The reached epsilon
        lies in [0.999 * target, target].
    """
    _check_accountant(accountant)
    if not target_epsilon > 0:
        raise ConfigError(f"privacy.target_epsilon={target_epsilon} must be > 0")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.target_delta={delta} must be in (0, 1)")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ConfigError(
            f"sample rate {sample_rate} / steps {steps} impossible: check federation.batch_size, "
            "federation.rounds and federation.local_epochs"
        )
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        epsilon_tolerance=1e-3 * target_epsilon,
        eps_error=_eps_error(target_epsilon),  # PRV only; RDP ignores it
    )


def _extended(history: list[Step], noise_multiplier: float, sample_rate: float, steps: int) -> list[Step]:
    """``history`` plus ``steps`` steps at (sigma, q), merged the way Opacus' accountants do."""
    out = list(history)
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        sigma, q, n = out.pop()
        out.append((sigma, q, n + steps))
    elif steps > 0:
        out.append((noise_multiplier, sample_rate, steps))
    return out


def epsilon(history: list[Step], delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history)."""
    _check_accountant(accountant)
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    eps = acc.get_epsilon(delta=delta)
    if accountant == "prv" and _eps_error(eps) < 0.01:  # small epsilon: tighten the estimate
        eps = acc.get_epsilon(delta=delta, eps_error=_eps_error(eps))
    return float(eps)


def projected_epsilon(
    history: list[Step],
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
) -> float:
    """Epsilon the hospital would have spent after ``steps`` more steps at (sigma, q)."""
    return epsilon(_extended(history, noise_multiplier, sample_rate, steps), delta, accountant)


# ---- accountant persistence -----------------------------------------------------------


def load_history(state_dir: str | os.PathLike, *, expect_existing: bool = False) -> list[Step]:
    """The accountant history saved in ``<state_dir>/privacy_history.json``.

    Args:
        state_dir: the hospital's own state directory (one per training set, kept across rounds
            AND runs: epsilon is spent on the data, not on a run).
        expect_existing: True when this hospital has trained before (e.g. the ClientApp
            recorded a save in its context state); a missing file is then an error, not a
            silent restart of epsilon at 0.
    Returns:
        list of (sigma, q, steps); empty when nothing was saved yet and none was expected.
    Raises:
        ConfigError: the file is missing though expected, or unreadable / malformed.
    """
    path = Path(state_dir) / HISTORY_FILE
    if not path.exists():
        if expect_existing:
            raise ConfigError(
                f"privacy accountant history {path} is missing but this hospital trained before; "
                "restore the file from backup (training on would restart epsilon at 0)"
            )
        return []
    try:
        raw = json.loads(path.read_text())
        history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"privacy accountant history {path} is corrupt ({type(e).__name__}: {e}); "
            "restore it from backup -- deleting it would restart epsilon at 0"
        ) from e
    if any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
        raise ConfigError(
            f"privacy accountant history {path} has an entry outside sigma>0, 0<q<=1, steps>=1; "
            "restore it from backup"
        )
    return history


def save_history(state_dir: str | os.PathLike, history: list[Step]) -> Path:
    """Write ``history`` to ``<state_dir>/privacy_history.json`` atomically (tmp + os.replace).

    A crash leaves either the old or the new file, never a torn one. Returns the path.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HISTORY_FILE
    payload = json.dumps({"history": [[float(s), float(q), int(n)] for s, q, n in history]})
    atomic_write_text(path, payload)
    return path


# ---- DP-SGD setup --------------------------------------------------------------------


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = "prv",
    secure_mode: bool = False,
    history: Sequence[Step] = (),
    grad_sample_mode: str = "hooks",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Wrap one round's model, optimizer and loader for DP-SGD, continuing ``history``.

    Args:
        model: a DP-ready net (carefl.models.build_model).
        optimizer: over ``model.parameters()``.
        loader: plain DataLoader over the training set with the planned batch size; it is
            replaced by a Poisson-sampling loader at rate :func:`sample_rate`.
        noise_multiplier: sigma (from :func:`calibrate_noise` or privacy.noise_multiplier).
        max_grad_norm: per-sample clipping bound C (L2, same units as the gradients).
        accountant: "prv" | "rdp".
        secure_mode: Opacus' CSPRNG noise and sampling (needs the torchcsprng package).
        history: :func:`load_history` of this hospital; restored into the engine's accountant.
        grad_sample_mode: privacy.grad_sample_mode, one of GRAD_SAMPLE_MODES.
    Returns:
        (model, optimizer, loader, engine): train with these; after training save
        ``engine.accountant.history`` with :func:`save_history`.
    """
    _check_accountant(accountant)
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy.grad_sample_mode={grad_sample_mode} is unsupported; choose one of "
            f"{GRAD_SAMPLE_MODES}"
        )
    if not noise_multiplier > 0:
        raise ConfigError(f"privacy.noise_multiplier={noise_multiplier} must be > 0")
    if not max_grad_norm > 0:
        raise ConfigError(f"privacy.max_grad_norm={max_grad_norm} must be > 0")
    try:
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    except ImportError as e:
        raise ConfigError(
            "privacy.secure_mode=true needs the torchcsprng package; install it on the "
            "hospital node or set privacy.secure_mode=false"
        ) from e
    engine.accountant.load_state_dict({"history": list(history), "mechanism": accountant})
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
    )
    return model, optimizer, loader, engine


# ---- site policy and budget ----------------------------------------------------------


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's own privacy limits; the server's request can never loosen them.

    epsilon_cap: the most epsilon this training set may ever spend (all rounds, all runs).
    delta: the delta every epsilon of this hospital is computed at.
    """

    epsilon_cap: float
    delta: float


_POLICY_KEYS = ("epsilon-cap", "delta")


def _policy_file(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"site-policy file {path} cannot be read ({e}); fix the node-config key site-policy") from e
    if not isinstance(values, dict) or set(values) - set(_POLICY_KEYS):
        raise ConfigError(
            f"site-policy file {path} must be a mapping with only the keys {_POLICY_KEYS}; got {values!r}"
        )
    return values


def _number(value: Any, key: str, source: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} in {source} is not a number") from None


def site_policy(
    node_config: Mapping[str, Any], *, requested_epsilon: float, requested_delta: float
) -> SitePolicy:
    """The hospital's policy from its node config, falling back to the server's request.

    Node-config keys (``flower-supernode --node-config 'epsilon-cap=3.0 delta=1e-6'``):
    ``epsilon-cap``, ``delta`` and optionally ``site-policy`` = path to a YAML/JSON file with
    the same keys (inline node-config values override the file). A key the hospital sets
    always wins: the server's privacy.target_epsilon / target_delta only fill in keys the
    hospital left unset, so no request can raise a cap the hospital chose.

    Raises:
        ConfigError: epsilon-cap not > 0, delta not in (0, 1), unreadable policy file; the
            message names the key and where it came from.
    """
    values: dict[str, tuple[Any, str]] = {
        "epsilon-cap": (requested_epsilon, "the server's request (privacy.target_epsilon)"),
        "delta": (requested_delta, "the server's request (privacy.target_delta)"),
    }
    if "site-policy" in node_config:
        path = str(node_config["site-policy"])
        values.update({k: (v, f"site-policy file {path}") for k, v in _policy_file(path).items()})
    values.update({k: (node_config[k], "the hospital's node config") for k in _POLICY_KEYS if k in node_config})

    eps_value, eps_source = values["epsilon-cap"]
    cap = _number(eps_value, "epsilon-cap", eps_source)
    if not 0 < cap < math.inf:
        raise ConfigError(f"epsilon-cap={eps_value} in {eps_source} must be a finite number > 0")
    delta_value, delta_source = values["delta"]
    delta = _number(delta_value, "delta", delta_source)
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta_value} in {delta_source} must be in (0, 1), e.g. 1e-5 (< 1/N)")
    return SitePolicy(epsilon_cap=cap, delta=delta)


def budget_check(
    policy: SitePolicy,
    history: list[Step],
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> tuple[bool, float, str]:
    """May this hospital train ``steps`` more steps at (sigma, q) within its cap?

    Returns:
        (ok, projected_epsilon, reason): ok is False exactly when the projected epsilon (at
        policy.delta) exceeds policy.epsilon_cap; reason is "" when ok, else one line to send
        back to the server instead of weights.
    """
    projected = projected_epsilon(history, noise_multiplier, sample_rate, steps, policy.delta, accountant)
    if projected <= policy.epsilon_cap:
        return True, projected, ""
    return False, projected, (
        f"privacy budget: this round would bring epsilon to {projected:.3f} > site cap "
        f"{policy.epsilon_cap:g} (delta={policy.delta:g}); the hospital sits this round out"
    )
