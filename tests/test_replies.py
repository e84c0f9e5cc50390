"""A hostile hospital against the server (issue 12, point 5): every reply is checked by schema
as the first step of the one round loop; a bad reply leaves that hospital out of the round with
a logged reason and never fails the run, nor changes another hospital's record.

Each case runs a real federation through ``carefl.rounds.run_federation`` with the in-process
transport; ``tamper`` rewrites what one node sends, after its ClientApp logic signed it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from carefl.config import compose_config
from carefl.ledger import entry_hash, verify_run
from carefl.local_transport import LocalTransport
from carefl.receipts import SigningKey
from carefl.replies import ArrayView
from carefl.rounds import run_federation

warnings.filterwarnings("ignore", message="Secure RNG turned off")
torch.set_num_threads(1)
HOSPITALS = ("st-mary", "riverside", "northfield")
TINY = ["data.n_train=8", "data.n_test=4", "data.image_size=16", "federation.rounds=2", "federation.baselines=false",
        "federation.batch_size=4", "privacy=none"]


def run(tmp_path: Path, tamper, *overrides: str) -> tuple[Path, dict]:
    cfg = compose_config([*TINY, *overrides, f"output_dir={tmp_path}", "run_id=r"])
    run_dir = run_federation(LocalTransport(3, tamper), cfg)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def on_node(node_id: int, kind: str, change):
    """A tamper function that applies ``change(raw)`` to what node ``node_id`` sends for ``kind``."""

    def tamper(node, k, raw):
        if node == node_id and k == kind:
            change(raw)
        return raw

    return tamper


def _set_metric(key, value):
    return lambda raw: raw.metrics.__setitem__(key, value)


def _string_dtype(raw):
    key = next(iter(raw.arrays))
    raw.arrays[key] = ArrayView("<U8", raw.arrays[key].shape, 64, lambda: torch.zeros(1))


CASES = {
    "no status": lambda raw: setattr(raw, "status", None),
    "string-dtype array": _string_dtype,
    "num_examples missing": lambda raw: raw.metrics.pop("num_examples"),
    "num_examples a list": _set_metric("num_examples", [8.0, 8.0]),
    "num_examples NaN": _set_metric("num_examples", math.nan),
    "num_examples huge": _set_metric("num_examples", 1e12),
    "epsilon a list": _set_metric("epsilon", [0.1]),
    "unknown metric": _set_metric("patient_ids", 42.0),
    "weights swapped after signing": lambda raw: raw.arrays.update(
        {k: ArrayView(v.dtype, v.shape, v.nbytes, lambda v=v: v.load() + 0.5) for k, v in raw.arrays.items()}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_training_reply_excludes_only_that_hospital(tmp_path, case):
    run_dir, metrics = run(tmp_path, on_node(3, "train", CASES[case]))
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        assert record["train"]["st-mary"]["status"] == record["train"]["riverside"]["status"] == "ok"
        assert record["train"].get("northfield", {"status": "unattributed"})["status"] != "ok"
        assert "northfield" not in record["robust"]
    assert verify_run(run_dir).ok


def test_eval_reply_without_its_metric_is_left_out_and_resume_works(tmp_path):
    run_dir, metrics = run(tmp_path, on_node(2, "evaluate", lambda raw: raw.metrics.pop("dice")))
    assert metrics["status"] == "completed"
    assert all("riverside" not in r["eval"] and "st-mary" in r["eval"] for r in metrics["rounds"])


def test_a_node_answering_as_another_hospital_changes_nothing_of_its_record(tmp_path, caplog):
    impersonate = on_node(3, "train", lambda raw: raw.status.__setitem__("hospital", "st-mary"))
    with caplog.at_level(logging.WARNING, logger="carefl"):
        run_dir, metrics = run(tmp_path, impersonate)
    assert "without a valid receipt signed by st-mary's key" in caplog.text
    for record in metrics["rounds"]:
        assert record["train"]["st-mary"]["status"] == "ok" and "northfield" not in record["train"]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    receipts = [e["hospitals"]["st-mary"]["receipt"] for e in ledger if e["kind"] == "round"]
    assert all(r["hospital"] == "st-mary" for r in receipts)


def test_a_refusal_in_another_hospitals_name_is_not_recorded(tmp_path):
    """A node first to answer 'refused' as st-mary (without st-mary's key) cannot make the
    server drop st-mary's real update."""
    fake = on_node(1, "train", lambda raw: raw.status.update(receipt="", status="refused"))
    _, metrics = run(tmp_path, fake)
    assert all("st-mary" not in r["train"] for r in metrics["rounds"])  # its unsigned reply never counts
    assert all(r["train"]["riverside"]["status"] == "ok" for r in metrics["rounds"])


def test_a_registered_key_is_required_of_that_hospital(tmp_path):
    """federation.hospital_keys pins st-mary to a key it does not hold (say, a hospital that
    lost its state dir and made a new key): its replies no longer count as st-mary's."""
    other = SigningKey.load_or_create(tmp_path / "other.pem").public_b64
    _, metrics = run(tmp_path, None, f'+federation.hospital_keys.st-mary="{other}"')
    assert all("st-mary" not in r["train"] and r["train"]["riverside"]["status"] == "ok" for r in metrics["rounds"])


def test_a_scaled_update_is_dropped_by_the_relative_norm_bound(tmp_path):
    """A Byzantine hospital sending 1000x its update (simulated attack): the default
    federation.max_update_norm_ratio=10 leaves it out by name every round."""
    _, metrics = run(tmp_path, None, "attack=scaling", "attack.byzantine=[2]", "attack.factor=1000")
    assert metrics["status"] == "completed"
    for record in metrics["rounds"]:
        assert record["train"]["northfield"]["status"] == "rejected"
        assert "max_update_norm_ratio=10" in record["train"]["northfield"]["reason"]


def test_consistently_rewritten_ledger_is_caught_by_a_hospitals_receipts(tmp_path):
    """End to end on a real run: the server drops northfield's receipt from round 1 and
    re-hashes the whole chain; plain carefl-verify says intact, --receipts does not."""
    run_dir, _ = run(tmp_path, None)
    path = run_dir / "ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[1]["hospitals"].pop("northfield")
    prev = entries[0]["hash"]
    for entry in entries[1:]:
        entry["prev_hash"] = prev
        entry["hash"] = prev = entry_hash(entry)
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))
    plain = subprocess.run([Path(sys.executable).parent / "carefl-verify", str(run_dir)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    logs = [str(run_dir / "hospitals" / h / "receipts.jsonl") for h in HOSPITALS]
    caught = subprocess.run([Path(sys.executable).parent / "carefl-verify", str(run_dir), "--receipts", *logs],
                            capture_output=True, text=True)
    assert caught.returncode == 1 and "northfield" in caught.stdout and "round 1" in caught.stdout, caught.stdout


def test_deeply_nested_json_in_a_reply_is_refused_not_raised():
    """A receipt or secure-aggregation field of 8000 nested brackets makes json.loads raise
    RecursionError; the reply checks read such fields as absent, so the round goes on."""
    from carefl.replies import RawReply, RoundContext, check_secagg_reply, check_train_reply

    deep = "[" * 8000 + "]" * 8000
    ctx = RoundContext(["st-mary"], "ab" * 32, 1, {}, "0" * 64, False, {})
    reply, why = check_train_reply(RawReply(1, status={"hospital": "st-mary", "receipt": deep[:16000]}), ctx)
    assert reply is None and "without a valid receipt" in why
    name, payload, masked, why = check_secagg_reply(
        RawReply(1, status={"hospital": "st-mary", "status": "ok", "secagg": deep}), {1: "st-mary"}, 10)
    assert name == "st-mary" and payload is None and "not a JSON object" in why
