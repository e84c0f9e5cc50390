"""One hospital's side of a round: who it is, its site policy, local training, evaluation.

The ClientApp only converts Flower messages to the calls below and back. Everything a
hospital decides for itself lives here: its identity and data location (node config), its
privacy budget (site policy: the server can request, never raise), and whether it trains.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import Dataset

from carefl import attacks, privacy
from carefl.checkpoint import atomic_write_text
from carefl.data import load_hospital
from carefl.errors import ConfigError
from carefl.models import build_model, plain_state_dict
from carefl.training import evaluate, make_loader, make_optimizer, train_epochs

#: node-config keys a SuperNode may set (``flower-supernode --node-config 'k=v ...'``)
NODE_KEYS = ("hospital", "data-path", "state-dir", "epsilon-cap", "delta", "site-policy", "torch-threads")
#: keys Flower's simulation engine sets itself
SIMULATION_KEYS = ("partition-id", "num-partitions")


@dataclass
class Hospital:
    """A hospital as its SuperNode describes it.

    ``index`` is its position in ``federation.hospitals`` (simulation; -1 in deployment when
    the name is not listed). ``simulated`` is true only under Flower's simulation engine
    (node config carries ``partition-id``); simulated attacks are unreachable otherwise.
    """

    name: str
    index: int
    state_dir: Path
    data_path: str | None = None
    simulated: bool = False
    node_config: Mapping = field(default_factory=dict)


def identify(cfg, node_config: Mapping, run_dir: str) -> Hospital:
    """Build the :class:`Hospital` from a SuperNode's node config.

    Deployment: ``hospital`` (name), ``data-path``, ``state-dir`` come from the node config.
    Simulation: ``partition-id`` i selects ``federation.hospitals[i]``; state defaults to
    ``<run_dir>/hospitals/<name>``.
    """
    unknown = sorted(set(node_config) - set(NODE_KEYS) - set(SIMULATION_KEYS))
    if unknown:  # a typo such as epsilon_cap must not silently drop a hospital's budget
        raise ConfigError(
            f"unknown SuperNode node-config key(s) {unknown}; valid keys: {', '.join(NODE_KEYS)} "
            "(fix the flower-supernode --node-config of this hospital)"
        )
    hospitals = list(cfg.federation.hospitals)
    simulated = "partition-id" in node_config
    if "hospital" in node_config:
        name = str(node_config["hospital"])
    elif simulated:
        pid, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(hospitals)))
        if parts != len(hospitals):
            raise ConfigError(
                f"the simulation has {parts} SuperNodes but federation.hospitals lists {len(hospitals)}; "
                f"run with --federation-config 'num-supernodes={len(hospitals)}' or change federation.hospitals"
            )
        name = hospitals[pid]
    else:
        raise ConfigError("this SuperNode has no hospital name: start it with --node-config 'hospital=\"<name>\"'")
    index = hospitals.index(name) if name in hospitals else -1
    if simulated:  # stands in for the node config each simulated SuperNode would have
        node_config = {**dict(cfg.federation.get("site_policies", {}).get(name, {})), **dict(node_config)}
    state_dir = Path(str(node_config.get("state-dir") or Path(run_dir) / "hospitals" / name))
    data_path = node_config.get("data-path")
    return Hospital(name, index, state_dir, str(data_path) if data_path else None, simulated, dict(node_config))


class _FlippedLabels(Dataset):
    """Label-flipping data poisoning (simulation only): wraps a hospital's training set."""

    def __init__(self, base: Dataset, task):
        self.base, self.task = base, task

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return image, attacks.flip_labels(label, self.task.kind, self.task.num_classes)


def _training_set(cfg, hospital: Hospital) -> Dataset:
    data = load_hospital(cfg, hospital.name, hospital.index, hospital.data_path)
    n = len(cfg.federation.hospitals)
    if hospital.simulated and hospital.index >= 0 and attacks.flips_labels(cfg.attack, hospital.index, n):
        return _FlippedLabels(data.train, cfg.task)
    return data.train


def local_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round: ``epochs * ceil(N / B)`` (Poisson: expected batches)."""
    return epochs * math.ceil(num_examples / batch_size)


def _requested_cap(privacy_cfg) -> float:
    """The epsilon cap a hospital falls back to when its site policy sets none: the server's
    target (or unlimited when the server gives sigma directly). A hospital's own cap wins."""
    return float(privacy_cfg.target_epsilon) if privacy_cfg.target_epsilon else float("inf")


#: calibrated sigmas in a hospital's state dir, keyed by the calibration's arguments
SIGMA_FILE = "noise_multiplier.json"


def planned_noise_multiplier(cfg, num_examples: int, delta: float, epochs: int, state_dir: Path | None = None) -> float:
    """``privacy.noise_multiplier``, or the sigma calibrated ONCE so that ``epochs`` passes
    (all rounds x local epochs) of Poisson-sampled DP-SGD reach ``privacy.target_epsilon``.

    Calibration is a pure function of (target epsilon, delta, q, steps, accountant) and costs
    seconds (a PRV bisection; ~5 s per hospital here, benchmarks/bench_overhead.py). With a
    ``state_dir`` its result is kept in ``<state_dir>/noise_multiplier.json``, so a hospital
    calibrates once per plan, not once per round (every round may land on another worker).
    """
    if cfg.privacy.noise_multiplier is not None:
        return float(cfg.privacy.noise_multiplier)
    batch = cfg.federation.batch_size
    args = (float(cfg.privacy.target_epsilon), float(delta), privacy.sample_rate(num_examples, batch),
            local_steps(num_examples, batch, epochs), str(cfg.privacy.accountant))
    path = Path(state_dir) / SIGMA_FILE if state_dir is not None else None
    try:
        known = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except ValueError:  # a torn or edited cache is only a cache: calibrate again
        known = {}
    key = json.dumps(args)
    if key not in known:
        known[key] = privacy.calibrate_noise(*args)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known))
    return float(known[key])


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


@dataclass
class TrainReply:
    """A hospital's answer to a training request.

    ``status`` is ``"ok"`` or ``"refused"`` (budget would be exceeded; ``state`` is None).
    ``metrics``: train_loss, num_examples, steps, train_seconds (wall time of the whole local
    round: data, model, calibration, training, accounting) and, under DP, epsilon, delta,
    noise_multiplier, epsilon_cap.
    """

    hospital: str
    status: str
    reason: str
    state: dict[str, torch.Tensor] | None
    metrics: dict[str, float]


def train_round(cfg, hospital: Hospital, global_state: dict[str, torch.Tensor], server_round: int) -> TrainReply:
    """Train the global model on this hospital's data for ``federation.local_epochs``.

    Under DP the hospital first checks its own budget: if this round's steps would push its
    epsilon over its cap it refuses and sends no weights.
    """
    start = time.perf_counter()
    fed = cfg.federation
    train_set = _training_set(cfg, hospital)
    model = build_model(cfg)
    model.load_state_dict(global_state)
    optimizer = make_optimizer(model, fed.optimizer, fed.lr)
    loader = make_loader(train_set, fed.batch_size, seed=cfg.seed * 100_003 + server_round * 101 + hospital.index)
    n = len(train_set)
    metrics: dict[str, float] = {"num_examples": float(n)}
    if not cfg.privacy.enabled:
        result = train_epochs(model, optimizer, loader, cfg.task, fed.local_epochs, cfg.strategy.prox_mu)
        metrics.update(train_loss=result.loss, steps=float(result.steps), train_seconds=time.perf_counter() - start)
        return TrainReply(hospital.name, "ok", "", model.state_dict(), metrics)

    policy = privacy.site_policy(
        hospital.node_config,
        requested_epsilon=_requested_cap(cfg.privacy),
        requested_delta=cfg.privacy.target_delta,
    )
    sample_rate = privacy.sample_rate(n, fed.batch_size)
    steps = local_steps(n, fed.batch_size, fed.local_epochs)
    sigma = planned_noise_multiplier(cfg, n, policy.delta, fed.rounds * fed.local_epochs, hospital.state_dir)
    history = privacy.load_history(hospital.state_dir)
    ok, projected, reason = privacy.budget_check(policy, history, sigma, sample_rate, steps, cfg.privacy.accountant)
    metrics.update(epsilon_cap=policy.epsilon_cap, delta=policy.delta, noise_multiplier=float(sigma))
    if not ok:
        metrics["epsilon"] = privacy.epsilon(history, policy.delta, cfg.privacy.accountant) if history else 0.0
        metrics["train_seconds"] = time.perf_counter() - start
        return TrainReply(hospital.name, "refused", f"{hospital.name}: {reason}", None, metrics)
    dp_model, dp_optimizer, dp_loader, engine = make_private(cfg, model, optimizer, loader, sigma, history)
    result = train_epochs(dp_model, dp_optimizer, dp_loader, cfg.task, fed.local_epochs, cfg.strategy.prox_mu)
    history = list(engine.accountant.history)
    privacy.save_history(hospital.state_dir, history)
    # the planned steps at (sigma, q) were taken: the history is the one budget_check projected,
    # so its epsilon is known (a PRV epsilon costs ~0.4 s; benchmarks/bench_overhead.py)
    spent = projected if result.steps == steps else privacy.epsilon(history, policy.delta, cfg.privacy.accountant)
    metrics.update(
        train_loss=result.loss,
        steps=float(result.steps),
        epsilon=spent,
        train_seconds=time.perf_counter() - start,
    )
    return TrainReply(hospital.name, "ok", "", plain_state_dict(dp_model), metrics)


def evaluate_round(cfg, hospital: Hospital, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of the global model on this hospital's held-out split (+ ``num_examples``,
    ``eval_seconds``: wall time of loading, building and evaluating)."""
    start = time.perf_counter()
    test = load_hospital(cfg, hospital.name, hospital.index, hospital.data_path).test
    model = build_model(cfg)
    model.load_state_dict(global_state)
    metrics = evaluate(model, test, cfg.task)
    return {**metrics, "num_examples": float(len(test)), "eval_seconds": time.perf_counter() - start}
