"""Secure aggregation in whole federations (in-process transport, real hospitals' code): the
server receives no hospital's update, gets the exact mean of the clipped updates, DP is
unchanged, dropouts mid-protocol are survived, and below the threshold the round is refused
and ledgered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carefl.config import compose_config
from carefl.local_transport import LocalTransport
from carefl.replies import RawReply
from carefl.rounds import run_federation
from carefl.secagg import member
from carefl.secagg.quantize import clip, levels, quantize
from conftest import TINY

SECAGG = ["secagg=on", *TINY.split(), "federation.rounds=1"]


class Recording(LocalTransport):
    """Keeps everything the server receives; ``drop(node, kind, payload) -> bool`` turns a
    reply into a node failure (a SuperNode gone mid-protocol)."""

    def __init__(self, n, drop=lambda node, kind, payload: False, tamper=None):
        super().__init__(n, tamper=self._tap)
        self.received: list[tuple[str, RawReply]] = []
        self.drop, self.hostile = drop, tamper

    def _tap(self, node: int, kind: str, raw: RawReply) -> RawReply:
        if self.drop(node, kind, raw):
            raw = RawReply(node, error="SuperNode gone")
        elif self.hostile:
            raw = self.hostile(node, kind, raw)
        self.received.append((kind, raw))
        return raw


@pytest.fixture()
def updates(monkeypatch):
    """Each hospital's update as it enters the protocol (captured at the hospital, for checks)."""
    seen: dict[str, torch.Tensor] = {}
    advertise = member.advertise

    def spy(key, run_id, server_round, hospital, update, bound, bits):
        seen[hospital] = update.clone()
        return advertise(key, run_id, server_round, hospital, update, bound, bits)

    monkeypatch.setattr(member, "advertise", spy)
    return seen


def _run(tmp_path: Path, transport, *overrides: str) -> tuple[Path, dict]:
    cfg = compose_config([*SECAGG, f"output_dir={tmp_path}", *overrides])
    run_dir = run_federation(transport, cfg)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def test_the_server_gets_the_exact_mean_and_never_an_update(tmp_path, updates):
    transport = Recording(3)
    run_dir, metrics = _run(tmp_path, transport, "privacy=none", "strategy.secagg.clip=0.5")
    assert metrics["status"] == "completed"
    # what the server received: no weights in any training reply; masked inputs only
    q = {name: quantize(u, 0.5, 22) for name, u in updates.items()}
    for kind, raw in transport.received:
        if kind == "train":
            assert raw.arrays is None
        elif raw.arrays:
            y = raw.arrays["masked"].load().numpy().view(np.uint32)
            for levels_ in q.values():
                assert not np.array_equal(y, levels_)
                assert abs(np.corrcoef(y.astype(np.float64), levels_.astype(np.float64))[0, 1]) < 0.1
    # the wire: each hospital sent its masked input (4 bytes a float) and little else
    d = len(next(iter(updates.values())))
    for traffic in metrics["rounds"][0]["wire"].values():
        assert 4 * d < traffic["bytes_received"] < 4 * d * 1.2
        assert traffic["bytes_sent"] > 2 * 4 * d  # the global model, to train and to evaluate
    # the global model moved by the mean of the clipped updates, to the quantisation step
    entry = _ledger(run_dir)[1]
    assert entry["secure_buckets"] == [{"members": entry["secure_buckets"][0]["members"],
                                        "survivors": entry["secure_buckets"][0]["members"], "failed": None}]
    assert all(rec["accepted"] and rec["norm"] is None for rec in entry["hospitals"].values())
    expected = torch.stack([clip(u, 0.5) for u in updates.values()]).mean(0)
    initial = _initial_flat(run_dir)
    final = _flat(torch.load(run_dir / "model_final.pt", weights_only=True))
    assert float((final - initial - expected).abs().max()) <= 0.5 / levels(22) + 1e-6


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for v in state.values() if torch.is_floating_point(v)])


def _initial_flat(run_dir: Path) -> torch.Tensor:
    from omegaconf import OmegaConf

    from carefl.models import build_model

    return _flat(build_model(OmegaConf.load(run_dir / "config.yaml")).state_dict())


def test_dp_epsilon_is_the_same_with_and_without_secure_aggregation(tmp_path):
    eps = {}
    for mode in ("on", "off"):
        run_dir, metrics = _run(tmp_path / mode, LocalTransport(3), f"secagg={mode}", "privacy.noise_multiplier=1.0")
        eps[mode] = {h: rec["epsilon"] for h, rec in metrics["rounds"][0]["train"].items()}
    assert eps["on"] == eps["off"] and all(e > 0 for e in eps["on"].values())


def test_a_hospital_that_drops_after_sharing_is_recovered_from_the_others_shares(tmp_path, updates):
    hospitals = "federation.hospitals=[a,b,c,d]"
    dropped = {"node": None}

    def drop(node, kind, raw):  # node 4 answers the share stage, then its SuperNode dies
        if kind == member.MESSAGE_TYPE and node == 4 and raw.arrays:
            dropped["node"] = node
            return True
        return False

    run_dir, metrics = _run(tmp_path, Recording(4, drop=drop), hospitals, "privacy=none")
    assert metrics["status"] == "completed" and dropped["node"] == 4
    bucket = _ledger(run_dir)[1]["secure_buckets"][0]
    assert len(bucket["survivors"]) == 3 and "d" not in bucket["survivors"] and bucket["failed"] is None
    record = _ledger(run_dir)[1]["hospitals"]["d"]
    assert not record["accepted"] and "dropped out" in record["reason"]
    survivors = bucket["survivors"]
    expected = torch.stack([clip(updates[h], 10.0) for h in survivors]).mean(0)
    moved = _flat(torch.load(run_dir / "model_final.pt", weights_only=True)) - _initial_flat(run_dir)
    assert float((moved - expected).abs().max()) <= 10.0 / levels(22) + 1e-6


def test_below_the_threshold_the_round_is_refused_and_ledgered(tmp_path):
    def drop(node, kind, raw):  # two of three leave after sharing: t = 2 survivors are not there
        return kind == member.MESSAGE_TYPE and node in (2, 3) and bool(raw.arrays)

    run_dir, metrics = _run(tmp_path, Recording(3, drop=drop), "privacy=none")
    assert metrics["status"] == "stopped"
    entry = _ledger(run_dir)[1]
    assert entry["model_after"] == entry["model_before"]
    assert "below the threshold" in entry["secure_buckets"][0]["failed"]


def test_a_hostile_hospital_spoils_only_its_own_bucket(tmp_path):
    """9 hospitals in 3 secure buckets, median over bucket means: hospital 1 sends a masked
    input of its own making; its bucket is refused (sum out of range), the others aggregate."""

    def garbage(node, kind, raw):
        if kind == member.MESSAGE_TYPE and node == 1 and raw.arrays:
            view = raw.arrays["masked"]
            bad = torch.full(view.shape, 2**30, dtype=torch.int32)
            raw.arrays = {"masked": type(view)(view.dtype, view.shape, view.nbytes, lambda: bad)}
        return raw

    names = ",".join(f"h{i}" for i in range(9))
    run_dir, metrics = _run(tmp_path, Recording(9, tamper=garbage), f"federation.hospitals=[{names}]", "privacy=none",
                            "strategy=median", "strategy.f=0", "strategy.secagg.bucket_size=3")
    assert metrics["status"] == "completed"
    buckets = _ledger(run_dir)[1]["secure_buckets"]
    failed = [b for b in buckets if b["failed"]]
    assert len(buckets) == 3 and len(failed) == 1 and "h0" in failed[0]["members"]
    assert "honest inputs" in failed[0]["failed"] or "clip" in failed[0]["failed"]


def test_a_hospital_requiring_secure_aggregation_refuses_a_clear_round(tmp_path):
    policies = "+federation.site_policies={st-mary:{require-secagg:true}}"
    cfg = compose_config([*TINY.split(), "federation.rounds=1", "privacy=none", f"output_dir={tmp_path}", policies])
    run_dir = run_federation(LocalTransport(3), cfg)
    record = _ledger(run_dir)[1]["hospitals"]["st-mary"]
    assert not record["accepted"] and "require-secagg" in record["reason"]

