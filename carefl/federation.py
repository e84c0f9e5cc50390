"""The server's side of a federation, without Flower: state, rounds, audit, checkpoints.

The round loop (:mod:`carefl.rounds`) checks every reply at the edge (:mod:`carefl.replies`)
and hands the checked replies to :class:`Federation`, which

1. leaves out refusals, invalid replies and updates whose norm is absurd -- above
   ``federation.max_update_norm`` (absolute, null = none) or above
   ``federation.max_update_norm_ratio`` times the round's median norm -- naming the hospital,
   and stops cleanly when fewer than ``federation.min_hospitals`` remain;
2. flattens accepted updates (local - global) to an ``(n, d)`` float32 matrix, applies the
   simulated omniscient attack (simulation only), aggregates with the configured robust
   rule, steps the server optimiser and updates the global model;
3. records per-hospital anomaly signals and reputation, appends a hash-chained ledger entry,
   and checkpoints atomically so a killed run resumes from its last completed round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from carefl import attacks, checkpoint, robust
from carefl.errors import CareFLError, ConfigError
from carefl.ledger import Ledger, hash_config, hash_file, hash_state_dict
from carefl.replies import TrainReply
from carefl.report import Report

log = logging.getLogger("carefl")


class FederationStopped(CareFLError):
    """Too few usable hospitals remain: the run ends cleanly with the last global model."""


@dataclass
class RoundSummary:
    """What one aggregation did (for the progress line)."""

    round: int
    accepted: list[str]
    rejected: dict[str, str]
    train_loss: dict[str, float]


@dataclass
class SecureBucket:
    """One bucket of a securely aggregated round: its ``members``, the ``survivors`` whose
    masked inputs the sum holds, and ``mean`` (float32 (d,), the survivors' mean update) or
    None with ``reason`` (the bucket failed: too few left, bad shares, a sum out of range)."""

    members: list[str]
    survivors: list[str]
    mean: torch.Tensor | None
    reason: str


def _not_aggregated(reply: TrainReply, reason: str) -> dict:
    """Ledger record of a hospital whose update did not enter the aggregate."""
    return {"accepted": False, "reason": reason, "epsilon": reply.metrics.get("epsilon"),
            "update_hash": reply.receipt["update_hash"] if reply.receipt else None, "norm": None,
            "receipt": reply.receipt}


class Federation:
    """Global model + aggregation state of one run, persisted in ``run_dir``.

    ``initial_state`` is the freshly built model's state dict; on resume it is replaced by
    the last checkpoint's global model and the round counter continues from there.
    ``simulated``: the round loop's transport runs Flower's simulation engine (or the
    in-process one); only then do the configured attacks apply.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, initial_state: dict[str, torch.Tensor], resume: bool = False,
                 simulated: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.aggregator = robust.build_aggregator(cfg.strategy)
        self.server_opt = robust.build_server_optimizer(cfg.strategy)
        self.reputation = robust.Reputation()
        self.config_hash = hash_config(OmegaConf.to_container(cfg, resolve=True))
        self.byzantine = set(attacks.byzantine_indices(cfg.attack, len(cfg.federation.hospitals))) if simulated else set()
        self.generator = torch.Generator().manual_seed(int(cfg.seed) + 7919)
        self.report = Report(self.run_dir, cfg)
        self.global_state = {k: v.detach().clone() for k, v in initial_state.items()}
        #: hospital -> the public key its receipts must verify under: registered in
        #: federation.hospital_keys, or pinned at its first authenticated reply (checkpointed)
        self.hospital_keys: dict[str, str] = dict(cfg.federation.get("hospital_keys") or {})
        self.next_round = 1
        if resume:  # the ledger must contain the checkpoint's head; the chain continues from it
            state = checkpoint.load_latest_checkpoint(self.run_dir)
            self._restore(state)
            self.ledger = Ledger(self.run_dir / "ledger.jsonl", expect_head=state["ledger_head"])
        else:
            self.ledger = Ledger(self.run_dir / "ledger.jsonl")
            self.ledger.append("start", round=0, config_hash=self.config_hash, model_after=self.model_hash)
        #: what hospitals sign receipts for: the hash of the ledger's first entry
        self.run_id = self.ledger.first

    @property
    def update_dim(self) -> int:
        """d: the float elements of the model, the length of one update row."""
        return robust.update_dim(self.global_state)

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model's state dict; :attr:`model_hash` is its ``hash_state_dict``,
        computed once per new model (the ledger, the round's receipts and checks read it)."""
        return self._global_state

    @global_state.setter
    def global_state(self, state: dict[str, torch.Tensor]) -> None:
        self._global_state = state
        self.model_hash = hash_state_dict(state)

    # ---- rounds -------------------------------------------------------------------------
    def _rows(self, replies: list[TrainReply], rejected: dict[str, str], buckets: list[SecureBucket] | None):
        """The rows the rule aggregates: ``(rows (m, d) float32, row names, members of each row)``.

        In the clear a row is one hospital's update (after the simulated attack); under secure
        aggregation a row is one bucket's mean, its members the bucket's survivors, and the
        members of a failed bucket (and its dropouts) join ``rejected``."""
        accepted = [r for r in replies if r.status == "ok"]
        if buckets is None:
            hospitals = list(self.cfg.federation.hospitals)
            updates = (torch.stack([r.update for r in accepted]) if accepted and accepted[0].update is not None
                       else robust.flatten_updates([r.state for r in accepted], self.global_state))
            if self.byzantine and accepted:
                rows = [i for i, r in enumerate(accepted) if r.hospital in hospitals and hospitals.index(r.hospital) in self.byzantine]
                updates = attacks.apply_update_attack(self.cfg.attack, updates, rows, self.generator)
            return updates, [r.hospital for r in accepted], [[r.hospital] for r in accepted]
        means, labels, members = [], [], []
        for i, bucket in enumerate(buckets, 1):
            label = f"bucket {i} ({', '.join(bucket.members)})"
            for name in bucket.members:
                if bucket.mean is None:
                    rejected[name] = f"{name}: secure {label} failed: {bucket.reason}"
                elif name not in bucket.survivors:
                    rejected[name] = f"{name}: dropped out of secure {label} before sending its masked input"
            if bucket.mean is not None:
                means.append(bucket.mean)
                labels.append(f"bucket {i}")
                members.append(list(bucket.survivors))
        rows = torch.stack(means) if means else torch.empty(0, self.update_dim)
        return rows, labels, members

    def aggregate(self, server_round: int, replies: list[TrainReply], buckets: list[SecureBucket] | None = None) -> RoundSummary:
        """Aggregate one round's training replies into a new global model: their updates in
        the clear, or -- with ``buckets`` (secure aggregation) -- the buckets' means, one row
        each (the rule's ``f`` then counts Byzantine buckets: f hospitals spoil at most f)."""
        fed = self.cfg.federation
        rejected = {r.hospital: r.reason or r.status for r in replies if r.status != "ok"}
        updates, labels, members = self._rows(replies, rejected, buckets)
        too_large = robust.norm_outliers(updates, fed.max_update_norm, fed.max_update_norm_ratio)
        if too_large:
            # in the clear a row's label is its hospital's name: said once; a bucket's is added
            rejected.update({name: f"{name}: {why}" if labels[i] == name else f"{name}: {labels[i]}: {why}"
                             for i, why in too_large.items() for name in members[i]})
            keep = [i for i in range(len(labels)) if i not in too_large]
            updates, labels, members = updates[keep], [labels[i] for i in keep], [members[i] for i in keep]
        for name, reason in rejected.items():  # a reason names its hospital first, except a refusal's own text
            log.warning("round %d: left out %s", server_round,
                        reason if reason.startswith(f"{name}:") else f"{name}: {reason}")
        model_before = self.model_hash
        by_name = {r.hospital: r for r in replies}
        accepted = [by_name[name] for row in members for name in row]
        per_hospital = {r.hospital: _not_aggregated(r, rejected[r.hospital]) for r in replies if r.hospital in rejected}
        if len(accepted) < fed.min_hospitals:
            self._record_stop(server_round, replies, rejected, per_hospital, model_before, buckets)
            raise FederationStopped(
                f"round {server_round}: only {len(accepted)} usable update(s) "
                f"({', '.join(r.hospital for r in accepted) or 'none'}) but federation.min_hospitals="
                f"{fed.min_hospitals}; stopping with the model of round {server_round - 1}"
            )
        claimed = torch.tensor([sum(by_name[n].metrics["num_examples"] for n in row) for row in members], dtype=torch.float32)
        try:  # the rule re-checks its assumption (e.g. Krum n > 2f+2) on the rows that came
            result = self.aggregator(updates, claimed)
        except ConfigError as err:
            self._record_stop(server_round, replies, rejected, per_hospital, model_before, buckets)
            rows = "secure bucket means" if buckets is not None else "updates"
            raise FederationStopped(f"round {server_round}: {len(labels)} usable {rows} are too few: {err}") from None
        step = self.server_opt.step(result.update)
        self.global_state = robust.apply_update(self.global_state, step)
        signals = robust.round_signals(labels, updates, result)
        # reputation follows hospitals across rounds; a bucket is a new group every round
        reputation = self.reputation.update(signals) if buckets is None else {}
        for label, row in zip(labels, members):
            for name in row:
                r = by_name[name]
                per_hospital[name] = {
                    "accepted": True, "reason": None, "epsilon": r.metrics.get("epsilon"),
                    "update_hash": r.receipt["update_hash"], "norm": signals[label]["norm"] if buckets is None else None,
                    "receipt": r.receipt,
                }
        robust_record = {n: {**signals[n], **({"reputation": reputation[n]} if n in reputation else {"members": row})}
                         for n, row in zip(labels, members)}
        self.report.add_round(server_round, replies, robust_record, rejected)
        self.ledger.append("round", round=server_round, config_hash=self.config_hash,
                           model_before=model_before, model_after=self.model_hash,
                           hospitals=per_hospital, **self._bucket_record(buckets))
        return RoundSummary(server_round, [r.hospital for r in accepted], rejected,
                            {r.hospital: r.metrics["train_loss"] for r in accepted if "train_loss" in r.metrics})

    @staticmethod
    def _bucket_record(buckets: list[SecureBucket] | None) -> dict:
        """The ledger's record of a securely aggregated round: who was summed with whom."""
        if buckets is None:
            return {}
        return {"secure_buckets": [{"members": b.members, "survivors": b.survivors if b.mean is not None else [],
                                    "failed": b.reason or None} for b in buckets]}

    def _record_stop(self, server_round, replies, rejected, per_hospital, model_before, buckets) -> None:
        """Audit a round that could not aggregate: the global model stays as it was."""
        for reply in replies:
            per_hospital.setdefault(reply.hospital, _not_aggregated(reply, "round not aggregated"))
        self.report.add_round(server_round, replies, {}, rejected)
        self.ledger.append("round", round=server_round, config_hash=self.config_hash,
                           model_before=model_before, model_after=model_before, hospitals=per_hospital,
                           **self._bucket_record(buckets))

    def record_evaluation(self, server_round: int, evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
        """Store per-hospital test metrics of the new global model; return the aggregate."""
        return self.report.add_evaluation(server_round, evaluations)

    def checkpoint(self, server_round: int) -> None:
        """Atomically save everything needed to continue after ``server_round``."""
        self.next_round = server_round + 1
        checkpoint.save_round_checkpoint(self.run_dir, server_round, {
            "round": server_round,
            "global_model": self.global_state,
            "server_opt": self.server_opt.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "reputation": self.reputation.state_dict(),
            "hospital_keys": dict(self.hospital_keys),
            "ledger_head": self.ledger.head,
            "metrics": self.report.state_dict(),
            "config_hash": self.config_hash,
            "time": time.time(),
        })
        self.report.save()

    def _restore(self, state: dict) -> None:
        self.global_state = state["global_model"]
        self.server_opt.load_state_dict(state["server_opt"])
        self.aggregator.load_state_dict(state["aggregator"])
        self.reputation.load_state_dict(state["reputation"])
        self.hospital_keys = {**state.get("hospital_keys", {}), **self.hospital_keys}
        self.report.load_state_dict(state["metrics"])
        self.next_round = int(state["round"]) + 1

    def finish(self, status: str, message: str = "") -> Path:
        """Write ``model_final.pt``, metrics, ``summary.md``, plots, ``report.html`` and then the end
        ledger entry (which records the hashes of those files); return the model path."""
        final = self.run_dir / "model_final.pt"
        checkpoint.atomic_save(self.global_state, final)
        summary = self.report.finish(status, message)
        self.report.write_html({"entries": len(self.ledger), "head": self.ledger.head}, self.config_hash)
        outputs = {name: hash_file(self.run_dir / name) for name in ("metrics.json", "summary.md", "report.html")}
        self.ledger.append("end", round=self.next_round - 1, config_hash=self.config_hash,
                           model_after=self.model_hash, outputs=outputs)
        log.info("results:\n%s", summary)
        return final
