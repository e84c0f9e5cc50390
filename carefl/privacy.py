"""Differential privacy for each hospital: Opacus DP-SGD, accountant persistence, site budget.

The guarantee
-------------
Each hospital h trains with DP-SGD (Abadi et al. 2016) as implemented by Opacus:

- every local step draws a batch by **Poisson sampling**: each record of h's training set
  (size N) joins the batch independently with probability at most q = 1 / ceil(N / batch_size)
  (:func:`sample_rate`; exactly floor(q * 2^24) / 2^24, torch.rand's grid); one epoch is
  exactly ceil(N / batch_size) steps, each accounted at q;
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

Against whom
------------
The guarantee holds against everyone who sees what h sends: the coordinator (server), the
other hospitals (they see only post-processed aggregates), and the network. It rests only on
what h decides itself (:mod:`carefl.site`): whether it trains with DP at all, its epsilon cap
and delta, its state dir, and the randomness below. A hostile server can request a smaller
sigma or more steps; h then refuses the round (:func:`budget_check`), it never trains past
its cap.

Randomness the server cannot predict. Subsampling amplification (the small q in the
accounting) holds only if the adversary does not know which records are in each batch, and
the Gaussian mechanism only if it does not know the noise. :func:`make_private` therefore
draws Poisson sampling and noise from two ``torch.Generator`` seeded with 64 bits of OS
entropy (``secrets``) on the hospital, fresh every round; no seed is ever sent or derived
from the run config (``seed`` only initialises the model and the synthetic demo data).
What this gives: two runs with identical configs draw different batches and noise, and
nobody outside the hospital process can reproduce them. What it does not give: torch's CPU
generator is Mersenne Twister, not a cryptographic generator (its outputs are not meant to
resist an adversary who sees many of them -- here nobody sees them, only the noised sums),
and ``torch.normal`` in float32/64 is not hardened against floating-point attacks on
Gaussian sampling (Mironov 2012; Jin et al. 2021). Opacus' ``secure_mode`` addresses both
with the ``torchcsprng`` package, which is unmaintained and has no wheel for torch 2.13:
``privacy.secure_mode=true`` is refused with that reason rather than silently downgraded.

Budget
------
Noise is calibrated ONCE for the whole planned federation (rounds x local steps,
:func:`calibrate_noise`), never per round. Each hospital keeps its accountant history in its
own state dir (:mod:`carefl.budget`: locked, written ahead, signed), restores it into every
round's fresh PrivacyEngine (:func:`make_private`) so epsilon never restarts, and refuses a
round that would push its epsilon over its own cap (:func:`budget_check`).
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Sequence

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from carefl.choices import ACCOUNTANTS, GRAD_SAMPLE_MODES
from carefl.dp_bk import BKPrivacyEngine
from carefl.errors import ConfigError

# Opacus' per-sample-gradient hooks fire on module outputs when the input needs no grad (the
# first layer); torch warns on every backward although nothing is wrong. Keep logs readable.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")

#: One accountant history entry: (noise_multiplier sigma, sample_rate q, number of steps).
Step = tuple[float, float, int]

#: ``torch.rand`` (float32, CPU) draws ``j * 2**-24`` with j uniform in [0, 2**24): ``rand < t``
#: holds with probability exactly t only for t on that grid, and with up to 2**-24 more otherwise.
RAND_GRID = 2**24


def _eps_error(eps: float) -> float:
    """PRV's absolute epsilon tolerance: Opacus' 0.01 is 2% at epsilon=0.5; keep it <= 0.5%."""
    return min(0.01, max(1e-3, 0.005 * eps))


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={accountant} is unknown; choose one of {ACCOUNTANTS}")


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q that a hospital plans, calibrates and accounts with.

    ``q = 1 / k`` with ``k = ceil(num_examples / batch_size)``, the number of steps per epoch.
    :func:`make_private`'s loader runs exactly k steps per epoch and its accountant records q
    for each (Opacus' own loader would run ``int(1 / q)`` steps: k - 1 for k = 93, 99, 105, ...);
    each record joins a batch with probability ``floor(q * 2**24) / 2**24``, in (q - 2**-24, q]
    (see :func:`make_private`), so accounting at q is exact up to that conservative rounding.
    """
    if num_examples < 1 or batch_size < 1:
        raise ConfigError(f"{num_examples} training records / federation.batch_size={batch_size}: both must be >= 1")
    steps = math.ceil(num_examples / batch_size)
    if steps > RAND_GRID:
        raise ConfigError(f"federation.batch_size={batch_size} over {num_examples} records gives q = 1/{steps}, below "
                          f"torch's sampling resolution 2**-24; raise federation.batch_size")
    return 1.0 / steps


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier sigma whose epsilon after ``steps`` steps is <= target.

    Call it once for the whole planned federation: ``steps = rounds * local_epochs * k`` with
    ``q = 1 / k`` from :func:`sample_rate` -- the steps and rate :func:`make_private`'s loader
    really runs and its accountant records.

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


def extended(history: list[Step], noise_multiplier: float, sample_rate: float, steps: int) -> list[Step]:
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
    return epsilon(extended(history, noise_multiplier, sample_rate, steps), delta, accountant)


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
        loader: plain DataLoader over the training set with the planned batch size; only its
            dataset, batch size and collate function are used: it is replaced by a Poisson
            loader (below) whose generator is :func:`entropy_generator`.
        noise_multiplier: sigma (from :func:`calibrate_noise` or privacy.noise_multiplier).
        max_grad_norm: per-sample clipping bound C (L2, same units as the gradients).
        accountant: "prv" | "rdp".
        secure_mode: Opacus' CSPRNG noise and sampling (needs the torchcsprng package, which
            has no wheel for our torch: refused, see the module docstring).
        history: this hospital's saved history (:func:`carefl.budget.load`); restored into
            the engine's accountant.
        grad_sample_mode: privacy.grad_sample_mode, one of GRAD_SAMPLE_MODES.
    Returns:
        (model, optimizer, loader, engine): train with these; after training save
        ``engine.accountant.history`` with :func:`carefl.budget.save`. Sampling and noise
        come from two fresh :func:`entropy_generator` (unknown to the server).

    The Poisson loader, for N records and batch size B, with ``q = sample_rate(N, B) = 1 / k``:
    exactly k batches per epoch (``len(loader) == k``); each record joins each batch on its own
    with probability ``floor(q * 2**24) / 2**24`` (``loader.sample_rate``; torch.rand's float32
    grid, see :data:`RAND_GRID`), at most q; a batch may be empty (train_epochs then takes a
    noise-only step). The accountant records (sigma, q) for every step, so the history after
    e epochs is exactly ``extended(history, sigma, q, e * k)``: what :func:`budget_check`
    projected.
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
        engine = (BKPrivacyEngine if grad_sample_mode == "bk" else PrivacyEngine)(
            accountant=accountant, secure_mode=secure_mode)
    except ImportError as e:
        raise ConfigError(
            "privacy.secure_mode=true needs the torchcsprng package; install it on the "
            "hospital node or set privacy.secure_mode=false"
        ) from e
    engine.accountant.load_state_dict({"history": list(history), "mechanism": accountant})
    # Our own Poisson loader, not Opacus' (poisson_sampling=True): that one runs int(1 / q) steps
    # per epoch, k - 1 where 1 / (1 / k) rounds below k, and samples at a threshold that torch.rand
    # exceeds with up to 2**-24 extra probability. Opacus accounts at 1 / len(loader) = q.
    q = sample_rate(len(loader.dataset), loader.batch_size)
    steps = round(1 / q)  # = ceil(N / B), exactly
    poisson = DPDataLoader(loader.dataset, sample_rate=math.floor(q * RAND_GRID) / RAND_GRID,
                           collate_fn=loader.collate_fn, generator=entropy_generator(),
                           num_workers=loader.num_workers, persistent_workers=loader.persistent_workers)
    poisson.batch_sampler.steps = steps  # the sampler's own step count (its constructor argument)
    model, optimizer, poisson = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader above already samples; Opacus keeps it as it is
        grad_sample_mode=grad_sample_mode,
        noise_generator=None if secure_mode else entropy_generator(),
    )
    model.forbid_grad_accumulation()  # what Opacus does with poisson_sampling=True
    if len(poisson) != steps:  # the plan, the accountant's q = 1 / len(poisson) and the loader agree
        raise RuntimeError(f"the Poisson loader runs {len(poisson)} steps per epoch, {steps} were planned")
    return model, optimizer, poisson, engine


def entropy_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with 64 bits from the OS (``secrets.randbits``): the
    source of a hospital's DP sampling and noise; see "Randomness" in the module docstring."""
    return torch.Generator().manual_seed(secrets.randbits(64))


# ---- budget -------------------------------------------------------------------------


def budget_check(
    epsilon_cap: float,
    delta: float,
    history: list[Step],
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> tuple[bool, float, str]:
    """May this hospital train ``steps`` more steps at (sigma, q) within its cap?

    Returns:
        (ok, projected_epsilon, reason): ok is False exactly when the projected epsilon (at
        ``delta``, the hospital's) exceeds ``epsilon_cap`` (the hospital's site policy); reason is "" when ok, else one line to send
        back to the server instead of weights.
    """
    projected = projected_epsilon(history, noise_multiplier, sample_rate, steps, delta, accountant)
    if projected <= epsilon_cap:
        return True, projected, ""
    return False, projected, (
        f"privacy budget: this round would bring epsilon to {projected:.3f} > site cap "
        f"{epsilon_cap:g} (delta={delta:g}); the hospital sits this round out"
    )
