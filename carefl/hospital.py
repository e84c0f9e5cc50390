"""One hospital's side of a round: the request it accepts, its policy, local training, its receipt.

The ClientApp only converts Flower messages to :func:`handle` and back; the in-process
transport of the benchmarks calls :func:`handle` too. A round at the hospital:

1. :func:`carefl.request.parse_request` checks the request against the narrow schema;
2. :func:`carefl.site.read_policy` reads the hospital's own policy (node config / policy file)
   and :func:`carefl.site.admit` refuses a request outside it;
3. under the state-dir lock (:mod:`carefl.budget`): the budget is loaded and checked against
   the hospital's cap, the round's spend is written ahead, DP-SGD trains with sampling and
   noise from OS entropy, the spend is committed;
4. a receipt signed with the hospital's key (:mod:`carefl.receipts`) is appended to its own
   log and sent with the reply.

Any :class:`~carefl.errors.CareFLError` on the way becomes a ``refused`` reply whose reason
names the problem; the hospital's data, budget and key never leave it.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from carefl import attacks, budget, compression, privacy, robust
from carefl.checkpoint import atomic_save, atomic_write_text
from carefl.data import load_hospital
from carefl.data.card import shared_figures
from carefl.errors import CareFLError, ConfigError
from carefl.ledger import hash_state_dict
from carefl.models import build_model, plain_state_dict
from carefl.receipts import LOG_FILE, ReceiptLog, SigningKey, history_hash, make_receipt
from carefl.replies import MAX_GALLERY_IMAGES, png_problem
from carefl.request import Request, parse_request
from carefl.secagg import member
from carefl.site import SitePolicy, admit, read_policy
from carefl.tasks import trivial_metrics
from carefl.training import Progress, evaluate, make_loader, make_optimizer, train_epochs

# The objects torch, MONAI and Opacus create when imported (above) live as long as the process;
# moved out of the cyclic garbage collector's view once, here, they are no longer re-scanned by
# every full collection a hospital's work triggers (measured: load_hospital over 2,000 cached
# records 0.48 s -> 0.19 s, BENCHMARKS.md section 4). Once per process: this module is
# imported once, so nothing created later (a round's models, data) is ever frozen.
gc.freeze()

log = logging.getLogger("carefl.hospital")
TRAIN, EVALUATE = "train", "evaluate"
SECAGG = member.MESSAGE_TYPE  # a secure-aggregation stage


@dataclass
class HospitalReply:
    """What a hospital sends back.

    ``status``: ``"ok"`` or ``"refused"`` (``reason`` says why; ``state`` is None).
    ``metrics``: floats; train: num_examples, steps, train_seconds and, under DP, epsilon,
    delta, noise_multiplier, epsilon_cap (never the unnoised training loss: only without DP
    is train_loss sent); evaluate: the task's metrics, num_examples, eval_seconds.
    ``receipt``: the signed receipt of a training round (:func:`carefl.receipts.make_receipt`),
    None when the hospital could not get as far as its key. ``secagg``: under secure
    aggregation, the signed advert of a training reply, or a stage's reply
    (:mod:`carefl.secagg.member`); its masked input is ``state["masked"]`` (int32, (d,)).
    ``gallery``: the final evaluation's explanation PNGs, only when its site policy says
    ``share-gallery: true`` (:func:`explanation_gallery`).
    """

    hospital: str
    status: str
    reason: str
    state: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    receipt: dict | None = None
    secagg: dict | None = None
    gallery: list[bytes] | None = None

    def status_record(self) -> dict[str, str]:
        """The ``status`` record every transport sends: hospital, status, reason, receipt and
        secagg (JSON text, "" when absent); ``gallery`` (a JSON list of base64 PNGs,
        :func:`carefl.replies.check_gallery`) only when there is one to send."""
        record = {"hospital": self.hospital, "status": self.status, "reason": self.reason,
                  "receipt": json.dumps(self.receipt) if self.receipt is not None else "",
                  "secagg": json.dumps(self.secagg) if self.secagg is not None else ""}
        if self.gallery:
            record["gallery"] = json.dumps([base64.b64encode(png).decode() for png in self.gallery])
        return record


class _FlippedLabels(Dataset):
    """Label-flipping data poisoning (simulation only): wraps a hospital's training set."""

    def __init__(self, base: Dataset, task):
        self.base, self.task = base, task

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return image, attacks.flip_labels(label, self.task.kind, self.task.num_classes)


def _data(cfg, policy: SitePolicy):
    return load_hospital(cfg, policy.hospital, policy.synthetic_site if policy.synthetic_site is not None else -1,
                         None if policy.synthetic_site is not None else policy.data_path, policy.cache_dir,
                         policy.max_bad_files)


def _training_set(request: Request, policy: SitePolicy) -> Dataset:
    data = _data(request.config, policy)
    sim = request.simulation
    if policy.simulated and sim is not None:
        n = len(sim["hospitals"])
        if 0 <= policy.index < n and attacks.flips_labels(sim["attack"], policy.index, n):
            return _FlippedLabels(data.train, request.config.task)
    return data.train


def local_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round: ``epochs * ceil(N / B)``. Under DP the Poisson loader runs
    exactly this many, empty batches included, each accounted at ``privacy.sample_rate(N, B)``
    (:func:`carefl.privacy.make_private`)."""
    return epochs * math.ceil(num_examples / batch_size)


#: calibrated sigmas in a hospital's state dir, keyed by the calibration's arguments
SIGMA_FILE = "noise_multiplier.json"


def planned_noise_multiplier(cfg, num_examples: int, delta: float, epochs: int, state_dir: Path | None = None,
                             cap: float | None = None, history: list | None = None, run_id: str | None = None) -> float:
    """``privacy.noise_multiplier``, or the sigma calibrated ONCE so that ``epochs`` passes
    (all rounds x local epochs) of Poisson-sampled DP-SGD reach ``privacy.target_epsilon``.

    With the hospital's ``cap`` (its ``epsilon-cap``), ``history`` (its accountant history
    when the run started) and the ``run_id``: sigma is the larger of that and the sigma with
    which the whole plan brings the history to the cap (:func:`sigma_for_cap`). So a hospital
    whose cap is below what the consortium's target would make it spend trains in every round
    with more noise, instead of sitting out the rounds past its cap; a cap above it changes
    nothing. Either way the cap check of every round still holds.

    Calibration is a pure function of (target epsilon, delta, q, steps, accountant) and costs
    seconds (a PRV bisection; ~5 s per hospital here, benchmarks/bench_overhead.py). With a
    ``state_dir`` its result is kept in ``<state_dir>/noise_multiplier.json``, so a hospital
    calibrates once per plan, not once per round (every round may land on another worker); the
    cap's sigma is kept per run, fixed by the history of the run's first round.
    """
    if cfg.privacy.noise_multiplier is not None:
        return float(cfg.privacy.noise_multiplier)
    batch = cfg.federation.batch_size
    q, steps = privacy.sample_rate(num_examples, batch), local_steps(num_examples, batch, epochs)
    args = (float(cfg.privacy.target_epsilon), float(delta), q, steps, str(cfg.privacy.accountant))
    path = Path(state_dir) / SIGMA_FILE if state_dir is not None else None
    try:
        known = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except ValueError:  # a torn or edited cache is only a cache: calibrate again
        known = {}
    key = json.dumps(args)
    cap_key = json.dumps(["cap", run_id, cap, *args[1:]]) if cap is not None and math.isfinite(cap) and run_id else None
    missing = key not in known or (cap_key is not None and cap_key not in known)
    if key not in known:
        known[key] = privacy.calibrate_noise(*args)
    if cap_key is not None and cap_key not in known:
        if not history and cap >= args[0]:  # a fresh budget at least the target's: the plan's sigma (no 2nd calibration)
            known[cap_key] = known[key]
        else:
            known[cap_key] = sigma_for_cap(cap, float(delta), list(history), q, steps, str(cfg.privacy.accountant))
    if missing and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known))
    return max(float(known[key]), float(known[cap_key]) if cap_key is not None else 0.0)


def sigma_for_cap(cap: float, delta: float, history: list, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest sigma (within 0.1%) with which ``steps`` more steps at ``sample_rate`` bring
    ``history`` to at most ``cap`` (at ``delta``); Opacus' calibration when the history is
    empty, a bisection on :func:`carefl.privacy.projected_epsilon` otherwise (epsilon falls as
    sigma grows). When even a thousand times that sigma would pass the cap, the cap is spent:
    the fresh calibration is returned and the rounds' cap check refuses, as before."""
    low = privacy.calibrate_noise(cap, delta, sample_rate, steps, accountant)
    if not history:
        return low
    spent = lambda sigma: privacy.projected_epsilon(history, sigma, sample_rate, steps, delta, accountant)  # noqa: E731
    high = low
    while spent(high) > cap:
        high *= 2
        if high > 1000 * low:
            return low
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > cap else (low, middle)
    return high


def make_private(cfg, model, optimizer, loader, sigma: float, history: list):
    """``privacy.make_private`` with the ``cfg.privacy`` recipe (clip bound, accountant, secure
    mode, per-sample-gradient mode): the one place hospitals and baselines set up DP-SGD."""
    return privacy.make_private(
        model,
        optimizer,
        loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
        secure_mode=cfg.privacy.secure_mode,
        history=history,
        grad_sample_mode=cfg.privacy.get("grad_sample_mode", "hooks"),
    )




def _receipt(key: SigningKey, request: Request, policy: SitePolicy, received: str, reply: HospitalReply,
             history: list | None) -> dict:
    return make_receipt(
        key, run_id=request.run_id, round=request.round, hospital=policy.hospital, model_received=received,
        update_hash=hash_state_dict(reply.state) if reply.state is not None else None,
        num_examples=int(reply.metrics.get("num_examples", 0)), epsilon=reply.metrics.get("epsilon"),
        history_hash=history_hash(history) if history is not None else None, ledger_head=request.ledger_head,
    )


def train_round(request: Request, policy: SitePolicy, global_state: dict[str, torch.Tensor]) -> HospitalReply:
    """Train the received global model on this hospital's data for ``federation.local_epochs``,
    with DP-SGD unless the request disables it and the policy allows that; sign a receipt.

    Under DP the hospital checks its own budget first: if this round's steps would push its
    epsilon over its cap it refuses and sends no weights. The whole sequence runs under the
    state-dir lock; the spend is written ahead (a crash can only over-count). A refusal -- the
    policy, the budget, its data -- is signed too, so the server's ledger records it as this
    hospital's and nobody else can refuse in its name.
    """
    start = time.perf_counter()
    received = hash_state_dict(global_state)
    with budget.locked(policy.state_dir):
        key = SigningKey.load_or_create(policy.key_file)
        receipts = ReceiptLog(policy.state_dir / LOG_FILE)
        try:
            admit(policy, request)
            reply, history = _train_locked(request, policy, global_state, key, receipts)
            if reply.status == "ok" and request.config.compression.name != "none":
                _compress(request, policy, reply, global_state)
        except (CareFLError, RuntimeError) as err:  # RuntimeError: load_state_dict of a foreign model
            reply, history = _refusal(policy.hospital, TRAIN, err), None
        reply.metrics["train_seconds"] = time.perf_counter() - start
        reply.receipt = _receipt(key, request, policy, received, reply, history)
        receipts.append(reply.receipt)
        if request.config.strategy.secagg.enabled and reply.status == "ok":
            _advertise(request, policy, key, reply, global_state)
    return reply


def _compress(request: Request, policy: SitePolicy, reply: HospitalReply, global_state) -> None:
    """Replace the reply's weights by the compressed update (``compression``); top-k's error
    feedback (what it did not send) stays in ``<state-dir>/compression/``, added to the next
    round's update of this run. The receipt then signs the payload sent."""
    spec = request.config.compression
    update = robust.flatten_updates([reply.state], global_state)[0]
    path = budget.run_file(policy.state_dir, "compression", request.run_id)
    residual = torch.load(path, weights_only=True) if spec.name == "topk" and path.is_file() else None
    if residual is not None and residual.shape != update.shape:
        residual = None  # another model under the same run id cannot happen; a stale file is dropped
    try:
        reply.state, residual = compression.encode(update, spec.name, int(spec.block), float(spec.fraction), residual)
    except ValueError as err:
        raise ConfigError(f"compression={spec.name}: {err}") from None
    if residual is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(residual, path)


def _advertise(request: Request, policy: SitePolicy, key: SigningKey, reply: HospitalReply, global_state) -> None:
    """Under secure aggregation the update stays here (its state dir) until the masked stage:
    the reply carries the signed advert of this round's keys instead of the weights (the
    receipt still signs the weights' hash, a commitment the hospital can show an auditor)."""
    secagg = request.config.strategy.secagg
    update = robust.flatten_updates([reply.state], global_state)[0]
    pending, reply.secagg = member.advertise(key, request.run_id, request.round, policy.hospital, update,
                                             float(secagg.clip), int(secagg.bits))
    pending.save(member.pending_path(policy.state_dir, request.run_id))
    reply.state = None


def secagg_stage(request: Request, policy: SitePolicy, payload_text: Any) -> HospitalReply:
    """One stage of secure aggregation (:mod:`carefl.secagg.member`) for the round this
    hospital trained and advertised; its own ``secagg-min-bucket`` and ``secagg-min-threshold``
    bound the bucket.

    Raises:
        CareFLError: the stage is refused (a bad payload, a bucket outside its policy, no
            round in progress); the round's secrets are then forgotten, so no later stage runs.
    """
    path = member.pending_path(policy.state_dir, request.run_id)
    with budget.locked(policy.state_dir):
        if not request.config.strategy.secagg.enabled or not path.is_file():
            raise member.SecAggRefused("no securely aggregated round of this run is in progress here")
        pending = member.Pending.load(path)
        try:
            payload = json.loads(payload_text) if isinstance(payload_text, str) and len(payload_text) <= member.MAX_PAYLOAD_CHARS else None
            stage = payload.get("stage") if isinstance(payload, dict) else None
            if pending.round != request.round or stage not in ("share", "mask", "unmask"):
                raise member.SecAggRefused(f"expected a share, mask or unmask stage of round {pending.round}")
            reply = HospitalReply(policy.hospital, "ok", "")
            if stage == "share":
                reply.secagg = member.share(pending, payload, policy.secagg_min_bucket, int(request.config.strategy.secagg.bits),
                                            policy.secagg_min_threshold, policy.secagg_peer_keys)
            elif stage == "mask":
                reply.state = {"masked": torch.from_numpy(member.mask(pending, payload).view(np.int32))}
                reply.secagg = {}
            else:
                reply.secagg = member.unmask(pending, payload)
        except (CareFLError, ValueError) as err:  # ValueError: a payload the crypto refuses
            path.unlink()
            raise err if isinstance(err, CareFLError) else member.SecAggRefused(f"secure aggregation: {err}") from None
        if pending.stage == "done":
            path.unlink()
        else:
            pending.save(path)
    return reply


def _refusal(name: str, kind: str, err: Exception) -> HospitalReply:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:1000]
    log.warning("hospital %s refused a %s request: %s", name, kind, reason)
    return HospitalReply(name, "refused", reason, metrics={"num_examples": 0.0})


def _train_locked(request: Request, policy: SitePolicy, global_state, key: SigningKey, receipts: ReceiptLog):
    """:func:`train_round` under the lock: (reply without receipt, history after the round or
    None without DP)."""
    cfg, fed = request.config, request.config.federation
    train_set = _training_set(request, policy)
    model = build_model(cfg)
    model.load_state_dict(_with_local_norms(cfg, policy, request, global_state))
    seed = cfg.seed * 100_003 + request.round * 101 + policy.index
    # this round's cap check keeps in reserve the personal training still to come: finetune's
    # epochs after the last round (until done), ditto's personal step of this very round
    mode = personalization(cfg)
    reserve = {"finetune": 0 if _personal_path(policy, request).exists() else personal_epochs(cfg),
               "ditto": int(cfg.personalization.epochs)}.get(mode, 0)
    trained, metrics, history = _local_training(cfg, policy, key, receipts, model, train_set, fed.local_epochs, seed,
                                                request.run_id, reserve)
    if trained is None:
        return HospitalReply(policy.hospital, "refused", metrics.pop("reason"), None, metrics), history
    state = plain_state_dict(trained)  # the global update: all the reply ever carries
    if mode == "ditto":
        history = ditto_step(request, policy, key, receipts, global_state, train_set, metrics, history)
    if _fedbn(cfg):  # its normalisation stays here; the received global values go back in their place
        norms = norm_keys(model)
        path = _norm_path(policy, request)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({k: state[k] for k in norms}, path)
        state.update({k: global_state[k].detach().clone() for k in norms})
    return HospitalReply(policy.hospital, "ok", "", state, metrics), history


def personalization(cfg) -> str:
    """``personalization.name`` of a config (``none`` for one from before personalization)."""
    personal = cfg.get("personalization")
    return str(personal.name) if personal is not None else "none"


def _fedbn(cfg) -> bool:
    return personalization(cfg) == "fedbn"


def norm_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of ``model``'s normalisation layers (GroupNorm / any ``_NormBase`` affine)."""
    kinds = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase)
    return [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, kinds)
            for p, _ in m.named_parameters(recurse=False)]


def _with_local_norms(cfg, policy: SitePolicy, request: Request, global_state) -> dict:
    """``global_state`` with this hospital's own normalisation parameters over it (fedbn, once it
    has trained in this run); otherwise ``global_state`` itself."""
    path = _norm_path(policy, request)
    if not _fedbn(cfg) or not path.exists():
        return global_state
    return {**global_state, **torch.load(path, weights_only=True)}


def personal_epochs(cfg) -> int:
    """Epochs of personal training a run plans beyond its rounds' local epochs, all rounds
    together: finetune's ``personalization.epochs`` after the last round, ditto's in every round
    (``federation.rounds`` x ``personalization.epochs``); 0 otherwise. The noise plan
    (:func:`planned_noise_multiplier`) and the baselines' epochs count them."""
    mode = personalization(cfg)
    if mode == "finetune":
        return int(cfg.personalization.epochs)
    if mode == "ditto":
        return int(cfg.federation.rounds) * int(cfg.personalization.epochs)
    return 0


def personal_lr(cfg) -> float:
    """The learning rate of personal training (finetune's epochs, Ditto's personal steps):
    ``personalization.lr``, or ``federation.lr`` when it is null or absent. The privacy cost of a
    step does not depend on it (DP-SGD's noise and sampling do not see the learning rate)."""
    lr = cfg.personalization.get("lr") if cfg.get("personalization") is not None else None
    return float(cfg.federation.lr if lr is None else lr)


def planned_epochs(cfg) -> int:
    """Epochs a hospital trains in a whole run: every round's local epochs plus its personal
    ones (the noise plan's horizon, and a baseline's training)."""
    return int(cfg.federation.rounds) * int(cfg.federation.local_epochs) + personal_epochs(cfg)


def _progress(policy: SitePolicy, n: int, batch_size: int, epochs: int) -> Progress:
    """Progress lines of this hospital's local training, on its own console."""
    return Progress(log, f"hospital {policy.hospital} training {epochs} epoch(s) of {n} records",
                    local_steps(n, batch_size, epochs))


def _local_training(cfg, policy: SitePolicy, key: SigningKey, receipts: ReceiptLog, model, train_set: Dataset,
                    epochs: int, seed: int, run_id: str, reserve_epochs: int = 0, history: list | None = None,
                    prox_mu: float | None = None, anchor: list[torch.Tensor] | None = None,
                    lr: float | None = None):
    """Train ``model`` on ``train_set`` for ``epochs`` (DP-SGD unless the request disables it and
    the policy allows that); the one local-training path of federated rounds, personal
    fine-tuning and Ditto's personal steps, so all are accounted alike.

    ``history``: the accountant history the caller committed a moment ago under the same lock
    (Ditto's personal step right after the round's global step), used instead of loading it
    again (its receipt is not written yet). ``prox_mu`` / ``anchor``: the proximal term of
    :func:`carefl.training.train_epochs` (default ``strategy.prox_mu`` towards the entry point).
    ``lr``: the optimizer's learning rate (default ``federation.lr``; personal training passes
    :func:`personal_lr`).

    Under DP: sigma is the plan's (:func:`planned_noise_multiplier` over all rounds' local epochs
    plus the personal epochs, never below what keeps the whole run within the hospital's cap);
    the cap check projects this call's steps plus
    ``reserve_epochs`` more (personal fine-tuning still to come); the spend is written ahead of
    training and committed after it. Returns ``(trained model or None if the budget refuses,
    metrics, history or None without DP)``; a refusal's metrics hold ``reason``.
    """
    fed = cfg.federation
    n = len(train_set)
    prox_mu = float(cfg.strategy.prox_mu) if prox_mu is None else prox_mu
    optimizer = make_optimizer(model, fed.optimizer, fed.lr if lr is None else lr)
    metrics: dict[str, float] = {"num_examples": float(n)}
    if not cfg.privacy.enabled:  # admitted only when the policy says require-dp=false
        loader = make_loader(train_set, fed.batch_size, seed=seed, workers=policy.data_workers)
        result = train_epochs(model, optimizer, loader, cfg.task, epochs,
                              prox_mu, _progress(policy, n, fed.batch_size, epochs), anchor)
        metrics.update(train_loss=result.loss, steps=float(result.steps))
        return model, metrics, None
    if not policy.delta < 1.0 / n:
        raise ConfigError(f"delta={policy.delta:g} of hospital {policy.hospital} is not below 1/N = 1/{n} for its "
                          f"{n} training records; set a smaller delta in its site policy (e.g. {0.1 / n:.1e})")
    sample_rate = privacy.sample_rate(n, fed.batch_size)
    steps = local_steps(n, fed.batch_size, epochs)
    reserve = local_steps(n, fed.batch_size, reserve_epochs) if reserve_epochs else 0
    history = budget.load(policy.state_dir, key, receipts) if history is None else history
    sigma = planned_noise_multiplier(cfg, n, policy.delta, planned_epochs(cfg),
                                     policy.state_dir, policy.epsilon_cap, history, run_id)
    ok, projected, reason = privacy.budget_check(policy.epsilon_cap, policy.delta, history, sigma, sample_rate,
                                                 steps + reserve, cfg.privacy.accountant)
    metrics.update(epsilon_cap=policy.epsilon_cap, delta=policy.delta, noise_multiplier=float(sigma))
    if not ok:
        metrics["epsilon"] = privacy.epsilon(history, policy.delta, cfg.privacy.accountant)
        if reserve:
            what = "Ditto personal" if personalization(cfg) == "ditto" else "personal fine-tuning"
            reason += f" (keeping {reserve_epochs} {what} epoch(s) in reserve)"
        return None, {**metrics, "reason": f"{policy.hospital}: {reason}"}, history
    # set up first (a request it cannot serve, e.g. secure_mode, fails here and spends nothing),
    # then write the spend ahead of training: from here a crash can only over-count
    loader = make_loader(train_set, fed.batch_size, seed=0, workers=policy.data_workers)
    dp_model, dp_optimizer, dp_loader, engine = make_private(cfg, model, optimizer, loader, sigma, history)
    budget.save(policy.state_dir, key, privacy.extended(history, sigma, sample_rate, steps), base=history)
    result = train_epochs(dp_model, dp_optimizer, dp_loader, cfg.task, epochs, prox_mu,
                          _progress(policy, n, fed.batch_size, epochs), anchor)
    history = list(engine.accountant.history)
    budget.save(policy.state_dir, key, history)
    # the planned steps at (sigma, q) were taken: without a reserve the history is the one
    # budget_check projected, so its epsilon is known (a PRV epsilon costs ~0.4 s)
    exact = result.steps == steps and not reserve
    spent = projected if exact else privacy.epsilon(history, policy.delta, cfg.privacy.accountant)
    metrics.update(steps=float(result.steps), epsilon=spent)  # no train_loss: it is not noised
    return dp_model, metrics, history


#: where a hospital keeps its personal model of a run (under its state dir)
PERSONAL_DIR = "personal"
#: the run_id of a personal fine-tuning receipt is the run's + this: the receipt belongs to the
#: hospital's own log (its budget on disk must match its last receipt) and to no ledger entry,
#: so carefl-verify --receipts skips it as another run's
PERSONAL_SUFFIX = ".personal"


def _personal_path(policy: SitePolicy, request: Request) -> Path:
    return policy.state_dir / PERSONAL_DIR / f"{request.run_id}.pt"


def _norm_path(policy: SitePolicy, request: Request) -> Path:
    """Where fedbn keeps this hospital's own normalisation parameters of the run."""
    return policy.state_dir / PERSONAL_DIR / f"{request.run_id}.norm.pt"


def personalize(request: Request, policy: SitePolicy, global_state, train_set: Dataset) -> dict | None:
    """The hospital's personal model of this run: the final global model fine-tuned on its own
    training split for ``personalization.epochs`` (:func:`_local_training`, so DP-SGD in the
    same accountant, under the same lock and cap, with a receipt in its own log).

    Kept in ``<state-dir>/personal/<run-id>.pt`` and never sent; a second evaluation of the
    final round (a resumed run) reuses it instead of spending again. Returns its state dict,
    or None when the budget cannot pay for it (logged; the global model is then the one to use).
    """
    path = _personal_path(policy, request)
    with budget.locked(policy.state_dir):
        if path.exists():
            return torch.load(path, weights_only=True)
        key = SigningKey.load_or_create(policy.key_file)
        receipts = ReceiptLog(policy.state_dir / LOG_FILE)
        cfg = request.config
        model = build_model(cfg)
        model.load_state_dict(global_state)
        seed = cfg.seed * 100_003 + (cfg.federation.rounds + 1) * 101 + policy.index
        trained, metrics, history = _local_training(cfg, policy, key, receipts, model, train_set,
                                                    personal_epochs(cfg), seed, request.run_id, lr=personal_lr(cfg))
        state = plain_state_dict(trained) if trained is not None else None
        receipt = make_receipt(  # for "<run>.personal": never mistaken for a round's receipt the
            key, run_id=request.run_id + PERSONAL_SUFFIX, round=request.round,  # server's ledger holds
            hospital=policy.hospital,
            model_received=hash_state_dict(global_state), update_hash=hash_state_dict(state) if state else None,
            num_examples=len(train_set), epsilon=metrics.get("epsilon"),
            history_hash=history_hash(history) if history is not None else None, ledger_head=request.ledger_head,
        )
        receipts.append(receipt)  # its own log: the budget on disk must match its last receipt
        if state is None:
            log.warning("hospital %s: no personal fine-tuning: %s", policy.hospital, metrics["reason"])
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(state, path)
        return state


def ditto_step(request: Request, policy: SitePolicy, key: SigningKey, receipts: ReceiptLog, global_state,
               train_set: Dataset, metrics: dict, history: list | None) -> list | None:
    """Ditto's personal update of this round (Li et al., ICML 2021), right after the global one
    and under the same lock: ``personalization.epochs`` epochs of

        v <- v - lr * (grad F_k(v) + lambda * (v - w_global))

    on this hospital's training split, ``w_global`` the model received this round and ``v``
    its personal model (``<state-dir>/personal/<run-id>.pt``; the received model the first
    time), ``lambda`` = ``personalization.lambda``, with ``federation.optimizer`` and ``lr``.

    Under DP every step is DP-SGD through :func:`_local_training`: the hospital's own engine,
    sigma and accountant, so the steps land in the same history and under the same cap as the
    federated ones (the noise plan counts them, :func:`personal_epochs`, and the round's cap
    check kept them in reserve). ``lambda * (v - w_global)`` is added AFTER privatisation
    (:func:`carefl.training.train_epochs`' proximal term with ``anchor=w_global``): it depends
    only on the public global model and on v, itself a DP output, so it is post-processing and
    costs no epsilon.

    v never leaves the hospital: it is saved (atomically) to its state dir, a receipt signing
    its hash goes to the hospital's own log under ``<run>`` + :data:`PERSONAL_SUFFIX` (as
    finetune's, so ``carefl-predict --personal`` can check it), and nothing of it is in the
    reply. ``metrics["epsilon"]`` becomes the epsilon after both steps (what the round's receipt
    signs). Returns the history after both (None without DP). If the cap refuses the personal
    step (it cannot, once the reserve passed, unless the state dir changed under it) v stays
    as it was and a warning is logged.
    """
    cfg = request.config
    path = _personal_path(policy, request)
    model = build_model(cfg)
    model.load_state_dict(torch.load(path, weights_only=True) if path.exists() else global_state)
    anchor = [global_state[name].detach().clone() for name, p in model.named_parameters() if p.requires_grad]
    seed = cfg.seed * 100_003 + request.round * 101 + policy.index + 50_021  # its own batches (without DP)
    trained, personal, history_after = _local_training(
        cfg, policy, key, receipts, model, train_set, int(cfg.personalization.epochs), seed, request.run_id,
        history=history, prox_mu=float(cfg.personalization["lambda"]), anchor=anchor, lr=personal_lr(cfg))
    if trained is None:
        log.warning("hospital %s: no Ditto personal step in round %d: %s", policy.hospital, request.round,
                    personal["reason"])
        return history
    state = plain_state_dict(trained)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path)
    if "epsilon" in personal:
        metrics["epsilon"] = personal["epsilon"]
    receipts.append(make_receipt(
        key, run_id=request.run_id + PERSONAL_SUFFIX, round=request.round, hospital=policy.hospital,
        model_received=hash_state_dict(global_state), update_hash=hash_state_dict(state),
        num_examples=len(train_set), epsilon=personal.get("epsilon"),
        history_hash=history_hash(history_after) if history_after is not None else None,
        ledger_head=request.ledger_head,
    ))
    return history_after


#: test images in a hospital's explanation gallery (at most replies.MAX_GALLERY_IMAGES)
GALLERY_IMAGES = 3
#: where a hospital keeps its galleries (under its state dir): gallery/<16 hex of the run id>/<i>.png
GALLERY_DIR = "gallery"


def explanation_gallery(request: Request, policy: SitePolicy, model: torch.nn.Module, data) -> list[bytes]:
    """A small explanation gallery of ``model`` (the final global model) on this hospital's own
    test split, computed here with :mod:`carefl.explain`: for its first :data:`GALLERY_IMAGES`
    test images, segmentation: the foreground probability and its flip-TTA variance over the
    image; classification: occlusion sensitivity and GradCAM of the predicted class.

    Always written to ``<state-dir>/gallery/<16 hex of the run id>/<i>.png`` (the hospital's to
    look at, whatever its policy). Returns the PNGs that pass the server's bounds
    (:func:`carefl.replies.png_problem`; one that does not is logged and left out) --
    :func:`evaluate_round` sends them only when the site policy says ``share-gallery: true``.
    """
    from carefl.data.decathlon import SlidingWindow
    from carefl.explain import classification_maps, save_overlay, segmentation_maps

    task = request.config.task
    folder = policy.state_dir / GALLERY_DIR / request.run_id[:16]
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i in range(min(GALLERY_IMAGES, MAX_GALLERY_IMAGES, len(data.test))):
        image = torch.as_tensor(data.test[i][0]).float()
        if task.kind == "segmentation":
            window = data.window or SlidingWindow(tuple(image.shape[1:]), 0.0, 1)
            maps = segmentation_maps(model, image, window, int(task.num_classes))
            what = "foreground probability, flip-TTA variance"
        else:
            with torch.no_grad():
                target = int(model.eval()(image[None]).argmax())
            maps = classification_maps(model, image, target)
            what = f"evidence for predicted class {target}"
        path = save_overlay(image, maps, folder / f"{i + 1}.png",
                            f"{policy.hospital}, test image {i + 1}, final model: {what}")
        png = path.read_bytes()
        problem = png_problem(png)
        if problem:
            log.warning("hospital %s: gallery image %s is not sent: %s", policy.hospital, path, problem)
        else:
            pngs.append(png)
    return pngs


def evaluate_round(request: Request, policy: SitePolicy, global_state: dict[str, torch.Tensor]) -> HospitalReply:
    """Metrics of the global model on this hospital's held-out split, with ``trivial_<m>``: the
    same metric of a rule that needs no model (:func:`carefl.tasks.trivial_metrics`), so the
    server can say when a model is no better than it. Also ``personal_<m>`` of its personal
    model (the model itself stays here): every round with ``fedbn`` (global weights + its own
    normalisation) and ``ditto`` (its v, :func:`ditto_step`), after the last round with
    ``finetune`` (:func:`personalize`). After the last round: the explanation gallery of the
    final model (:func:`explanation_gallery`), kept in its state dir and sent only when its
    site policy says ``share-gallery: true``. Plus ``num_examples`` and
    ``eval_seconds`` (wall time of loading, building, fine-tuning and evaluating)."""
    start = time.perf_counter()
    cfg = request.config
    data = _data(cfg, policy)
    model = build_model(cfg)
    model.load_state_dict(global_state)
    metrics = evaluate(model, data.test, cfg.task, window=data.window)
    metrics.update({f"trivial_{k}": v for k, v in trivial_metrics(cfg.task, data.test).items()})
    if policy.share_data_card and data.card is not None:  # its own decision; counts and label frequencies only
        metrics.update(shared_figures(data.card))
    gallery = None
    if request.round == cfg.federation.rounds:  # images leave only by its own policy
        try:
            pngs = explanation_gallery(request, policy, model, data)
        except Exception as err:  # noqa: BLE001 -- a figure that cannot be drawn must not cost the evaluation
            log.warning("hospital %s: no explanation gallery: %s: %s", policy.hospital, type(err).__name__, err)
            pngs = []
        gallery = pngs if policy.share_gallery and pngs else None
    mode, personal = personalization(cfg), None
    if mode == "fedbn" and _norm_path(policy, request).exists():  # global weights + its own normalisation
        personal = _with_local_norms(cfg, policy, request, global_state)
    elif mode == "ditto" and _personal_path(policy, request).exists():
        personal = torch.load(_personal_path(policy, request), weights_only=True)
    elif mode == "finetune" and request.round == cfg.federation.rounds:
        personal = personalize(request, policy, global_state, _training_set(request, policy))
    if personal is not None:
        model.load_state_dict(personal)
        metrics.update({f"personal_{k}": v for k, v in evaluate(model, data.test, cfg.task, window=data.window).items()})
    metrics.update(num_examples=float(len(data.test)), eval_seconds=time.perf_counter() - start)
    return HospitalReply(policy.hospital, "ok", "", None, metrics, gallery=gallery)


def handle(kind: str, request_text: str, global_state: Mapping[str, torch.Tensor], node_config: Mapping,
           secagg: Any = None) -> HospitalReply:
    """One request at this hospital, end to end: schema, policy, work, receipt.

    Args:
        kind: :data:`TRAIN`, :data:`EVALUATE` or :data:`SECAGG` (the message type).
        request_text: the request JSON as received (:mod:`carefl.request`).
        global_state: the global model as received (checked by ``load_state_dict``).
        node_config: this SuperNode's node config (its operator's, never the server's).
        secagg: a secure-aggregation stage's payload (JSON text), for :data:`SECAGG`.
    Returns:
        the reply; a request the hospital will not serve is a ``refused`` reply with the reason
        (also logged here). The name is ``node config hospital`` when known.
    """
    name = str(node_config.get("hospital", "?"))
    try:
        request = parse_request(request_text, simulated="partition-id" in node_config)
        policy = read_policy(node_config, request)
        name = policy.hospital
        # the hospital's own torch-threads wins; a request may not ask for more than its cores
        torch.set_num_threads(policy.torch_threads or min(int(request.config.federation.torch_threads), os.cpu_count() or 1))
        if kind == TRAIN:
            return train_round(request, policy, dict(global_state))
        admit(policy, request)
        if kind == SECAGG:
            return secagg_stage(request, policy, secagg)
        return evaluate_round(request, policy, dict(global_state))
    except (CareFLError, RuntimeError) as err:  # before the key is at hand: refused, unsigned
        return _refusal(name, kind, err)
