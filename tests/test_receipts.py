"""Signed receipts: a ledger rewritten consistently by whoever controls the run directory is
still caught from one hospital's receipt log, and every check is total on junk input."""

import hashlib
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from carefl.checkpoint import atomic_save
from carefl.ledger import (
    GENESIS,
    Ledger,
    canonical_json,
    entry_hash,
    hash_config,
    hash_state_dict,
    main,
    verify_receipts,
    verify_run,
)
from carefl.receipts import (
    KEY_FILE,
    LOG_FILE,
    RECEIPT_KEYS,
    ReceiptError,
    ReceiptLog,
    SigningKey,
    head_problem,
    history_hash,
    make_receipt,
    receipt_problem,
    sign_head,
    verify_signature,
)

HOSPITALS = ("st-mary", "riverside")
ROUNDS = 3
CFG = {"seed": 0, "federation": {"rounds": ROUNDS, "hospitals": list(HOSPITALS)}}
CFG_HASH = hash_config(CFG)


def model_hash(step: int) -> str:
    torch.manual_seed(step)
    return hash_state_dict(torch.nn.Linear(4, 2).state_dict())


def key(tmp_path: Path, name: str) -> SigningKey:
    return SigningKey.load_or_create(tmp_path / name / KEY_FILE)


def build_run(tmp_path: Path, heads: bool = True) -> tuple[Path, list[Path]]:
    """A finished run of 3 rounds with 2 hospitals; each hospital's log holds its 3 receipts.

    The server signs its head for every request after round 1 when ``heads``."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(CFG), run / "config.yaml")  # the config whose hash the entries carry
    server = key(tmp_path, "server")
    ledger = Ledger(run / "ledger.jsonl")
    run_id = ledger.append("start", round=0, config_hash=CFG_HASH, model_after=model_hash(0))["hash"]
    logs = {name: ReceiptLog(tmp_path / name / LOG_FILE) for name in HOSPITALS}
    for r in range(1, ROUNDS + 1):
        head = sign_head(server, len(ledger) - 1, ledger.head) if heads and r > 1 else None
        records = {}
        for h, name in enumerate(HOSPITALS):
            history = [[1.1, 0.01, 50 * r]]
            receipt = make_receipt(
                key(tmp_path, name), run_id=run_id, round=r, hospital=name, model_received=model_hash(r - 1),
                update_hash=model_hash(100 * r + h), num_examples=640, epsilon=0.4 * r,
                history_hash=history_hash(history), ledger_head=head,
            )
            logs[name].append(receipt)
            records[name] = {"update_hash": receipt["update_hash"], "norm": 1.0, "accepted": True, "reason": None,
                             "epsilon": receipt["epsilon"], "receipt": receipt}
        ledger.append("round", round=r, config_hash=CFG_HASH, model_before=model_hash(r - 1),
                      model_after=model_hash(r), hospitals=records)
    torch.manual_seed(ROUNDS)
    atomic_save(torch.nn.Linear(4, 2).state_dict(), run / "model_final.pt")
    ledger.append("end", round=ROUNDS, config_hash=CFG_HASH, model_before=model_hash(ROUNDS),
                  model_after=model_hash(ROUNDS))
    return run, [logs[name].path for name in HOSPITALS]


@pytest.fixture
def federation(tmp_path) -> tuple[Path, list[str]]:
    run, logs = build_run(tmp_path)
    return run, [str(log) for log in logs]


def entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def rewrite(run: Path, new_entries: list[dict], finished: bool = True) -> None:
    """The attacker: re-index and re-hash the whole chain with CareFL's own code. The plain
    check then passes (``finished``) or calls the run unfinished, never tampered."""
    prev_hash = GENESIS
    for i, e in enumerate(new_entries):
        e.update(index=i, prev_hash=prev_hash)
        e["hash"] = prev_hash = entry_hash(e)
    (run / "ledger.jsonl").write_text("".join(canonical_json(e) + "\n" for e in new_entries))
    result = verify_run(run)
    assert result.ok if finished else result.first_bad is None, result.reason


def verify(run: Path, logs: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(run), "--receipts", *logs])
    return code, capsys.readouterr().out


def resign(receipt: dict, signer: SigningKey, **changes) -> dict:
    fields = {k: v for k, v in receipt.items() if k not in ("public_key", "signature")}
    return make_receipt(signer, **{**fields, **changes})


# ---- an honest run ------------------------------------------------------------------


def test_untouched_ledger_agrees_with_every_log(federation, capsys):
    run, logs = federation
    assert verify_receipts(run, logs) == []
    code, out = verify(run, logs, capsys)
    assert code == 0
    assert out.splitlines()[-1] == "OK: the ledger agrees with the 2 receipt log(s)"
    assert [len(ReceiptLog(log)) for log in logs] == [ROUNDS, ROUNDS]


def test_order_is_checked_without_heads_too(tmp_path, capsys):
    run, logs = build_run(tmp_path, heads=False)
    logs = [str(log) for log in logs]
    assert verify(run, logs, capsys)[0] == 0
    e = entries(run)
    rewrite(run, [e[0], e[2], e[1], e[3], e[4]])
    code, out = verify(run, logs, capsys)
    assert code == 1
    assert "round 2: st-mary's receipt is in ledger entry 1, before entry 2" in out and "reordered" in out
    assert "server-signed head" not in out


def test_receipts_of_other_runs_in_the_log_are_skipped(tmp_path, federation, capsys):
    run, logs = federation
    other, _ = build_run(tmp_path / "other")  # same hospitals' names, their own keys, another run
    log = ReceiptLog(logs[0])
    for receipt in ReceiptLog(tmp_path / "other" / "st-mary" / LOG_FILE).receipts():
        log.append(receipt)
    assert verify_receipts(run, logs) == []
    assert verify_receipts(other, [logs[0]]) == []


# ---- a consistent rewrite of the ledger is caught -----------------------------------


def test_dropped_receipt(federation, capsys):
    run, logs = federation
    e = entries(run)
    e[2]["hospitals"]["st-mary"]["receipt"] = None
    rewrite(run, e)
    code, out = verify(run, logs, capsys)
    assert code == 1
    assert "TAMPERED: round 2: st-mary's signed receipt is missing from the ledger (dropped or altered)" in out
    assert "riverside's signed receipt is missing" not in out


def test_dropped_hospital_record(federation, capsys):
    run, logs = federation
    e = entries(run)
    del e[1]["hospitals"]["riverside"]
    rewrite(run, e)
    problems = verify_receipts(run, logs)
    assert "round 1: riverside's signed receipt is missing from the ledger (dropped or altered)" in problems
    assert sum("missing" in p for p in problems) == 1


@pytest.mark.parametrize("change", [{"epsilon": 0.01}, {"update_hash": "f" * 64}, {"num_examples": 64000}])
def test_altered_receipt_resigned_with_another_key(tmp_path, federation, capsys, change):
    run, logs = federation
    attacker = key(tmp_path, "attacker")
    e = entries(run)
    e[3]["hospitals"]["riverside"]["receipt"] = resign(e[3]["hospitals"]["riverside"]["receipt"], attacker, **change)
    rewrite(run, e)
    code, out = verify(run, logs, capsys)
    assert code == 1
    assert "round 3: riverside's signed receipt is missing from the ledger (dropped or altered)" in out
    assert "round 3: the ledger holds a receipt for riverside signed by a key riverside never used: forged" in out


def test_altered_receipt_without_resigning_breaks_the_ledger_itself(federation, capsys):
    """Without the hospital's key an edited receipt no longer verifies: the ledger schema check
    refuses it, so even a carefully re-hashed chain fails the plain check."""
    run, logs = federation
    e = entries(run)
    e[2]["hospitals"]["st-mary"]["receipt"]["epsilon"] = 0.01
    with pytest.raises(AssertionError):
        rewrite(run, e)
    result = verify_run(run)
    assert (result.ok, result.first_bad) == (False, 2) and "signature does not verify" in result.reason
    code, out = verify(run, logs, capsys)
    assert code == 1 and "round 2: st-mary's signed receipt is missing" in out


def test_swapped_rounds(federation, capsys):
    run, logs = federation
    e = entries(run)
    rewrite(run, [e[0], e[2], e[1], e[3], e[4]])
    code, out = verify(run, logs, capsys)
    assert code == 1
    for name in HOSPITALS:
        assert f"round 2: {name}'s receipt is in ledger entry 1, before entry 2 holding its receipt of round 1" in out
        assert f"round 2: {name}'s receipt holds the server-signed head index 1" in out
    assert "the ledger was rewritten" in out


def test_removed_round(federation, capsys):
    run, logs = federation
    e = entries(run)
    rewrite(run, [e[0], e[1], e[3], e[4]])
    code, out = verify(run, logs, capsys)
    assert code == 1
    for name in HOSPITALS:
        assert f"round 2: {name}'s signed receipt is missing from the ledger" in out
        assert f"round 3: {name}'s receipt holds the server-signed head index 2" in out
    assert "but the ledger's entry 2 is different: the ledger was rewritten" in out


def test_cut_short_ledger_breaks_a_head(tmp_path, federation):
    """The ledger is cut after round 1 and the final model removed: "the run never finished"."""
    run, logs = federation
    e = entries(run)
    (run / "model_final.pt").unlink()
    rewrite(run, e[:2], finished=False)
    problems = verify_receipts(run, logs[:1])
    assert problems == [
        "round 2: st-mary's signed receipt is missing from the ledger (dropped or altered)",
        f"round 3: st-mary's receipt holds the server-signed head index 2 = {e[2]['hash'][:12]}..., "
        "but the ledger has only 2 intact entries: entries were removed",
        "round 3: st-mary's signed receipt is missing from the ledger (dropped or altered)",
    ]


def test_rewritten_start_entry(federation, capsys):
    run, logs = federation
    e = entries(run)
    e[0]["config_hash"] = "c" * 64
    rewrite(run, e)
    code, out = verify(run, logs, capsys)
    assert code == 1
    assert f"{logs[0]} holds no receipt of this run" in out and "start entry was rewritten" in out


def test_forged_extra_receipt(tmp_path, federation):
    """The server claims a hospital took part in a round it did not sign."""
    run, logs = federation
    e = entries(run)
    genuine = e[1]["hospitals"]["st-mary"]
    del e[2]["hospitals"]["riverside"]
    e[2]["hospitals"]["riverside"] = {**genuine, "receipt": resign(genuine["receipt"], key(tmp_path, "attacker"),
                                                                      hospital="riverside", round=2)}
    rewrite(run, e)
    problems = verify_receipts(run, logs)
    assert "round 2: the ledger holds a receipt for riverside signed by a key riverside never used: forged" in problems


def test_broken_chain_is_reported_with_the_receipts(federation, capsys):
    run, logs = federation
    lines = (run / "ledger.jsonl").read_text().splitlines()
    del lines[2]
    (run / "ledger.jsonl").write_text("".join(line + "\n" for line in lines))
    code, out = verify(run, logs, capsys)
    assert code == 1
    assert out.startswith("TAMPERED: entry 2: ")
    assert "receipts are checked against the 2 entries before it" in out
    assert "round 3: riverside's signed receipt is missing" in out


# ---- the hospital's own log ---------------------------------------------------------


def test_tampered_log_is_detected_on_open(federation, capsys):
    run, logs = federation
    path = Path(logs[0])
    original = path.read_text()
    lines = original.splitlines()
    line = json.loads(lines[1])
    line["receipt"]["epsilon"] = 0.01
    path.write_text("\n".join([lines[0], json.dumps(line), lines[2]]) + "\n")
    with pytest.raises(ReceiptError, match=r"line 2: .*hash does not match.*restore it from backup"):
        ReceiptLog(path)
    code, out = verify(run, logs, capsys)
    assert code == 1 and f"TAMPERED: {path}: line 2" in out

    path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a line deleted
    with pytest.raises(ReceiptError, match="line 2: prev_hash"):
        ReceiptLog(path)
    path.write_text(original[:-20])  # cut off mid-line
    with pytest.raises(ReceiptError, match="line 3: cut off"):
        ReceiptLog(path)
    line = json.loads(lines[1])  # re-hashed consistently, but the receipt's signature breaks
    line["receipt"]["epsilon"] = 0.01
    unhashed = {"receipt": line["receipt"], "prev_hash": line["prev_hash"]}
    line["hash"] = hashlib.sha256(canonical_json(unhashed).encode()).hexdigest()
    path.write_text("\n".join([lines[0], json.dumps(line)]) + "\n")
    with pytest.raises(ReceiptError, match="line 2: bad receipt: the receipt's signature does not verify"):
        ReceiptLog(path)


def test_log_append_refuses_a_bad_receipt_and_writes_nothing(tmp_path, federation):
    _, logs = federation
    log = ReceiptLog(logs[0])
    before = Path(logs[0]).read_bytes()
    with pytest.raises(ValueError, match="receipt not logged"):
        log.append({**log.last(), "epsilon": 9.0})
    assert Path(logs[0]).read_bytes() == before and len(log) == ROUNDS
    assert log.last() == log.receipts()[-1] and ReceiptLog(tmp_path / "new" / LOG_FILE).last() is None


def test_cli_nothing_to_verify(tmp_path, federation, capsys):
    run, logs = federation
    assert main([str(run), "--receipts", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err
    assert main([str(tmp_path / "no-run"), "--receipts", *logs]) == 2


# ---- keys and signatures ------------------------------------------------------------


def test_key_file_is_private_and_stable(tmp_path):
    path = tmp_path / "state" / "deep" / KEY_FILE
    first = SigningKey.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert SigningKey.load_or_create(path).public_b64 == first.public_b64
    assert SigningKey.load_or_create(tmp_path / "other.pem").public_b64 != first.public_b64
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left behind


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    ],
)
def test_a_key_file_that_is_not_ed25519_is_refused(tmp_path, content):
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    with pytest.raises(ReceiptError, match=rf"{KEY_FILE} is not an unencrypted Ed25519 private key.*restore"):
        SigningKey.load_or_create(path)
    assert path.read_bytes() == content


def test_receipt_signatures(tmp_path, federation):
    _, logs = federation
    genuine = ReceiptLog(logs[0]).last()
    mary = genuine["public_key"]
    assert set(genuine) == set(RECEIPT_KEYS)
    assert receipt_problem(genuine) is None and receipt_problem(genuine, mary) is None
    other = key(tmp_path, "attacker")
    forged = resign(genuine, other, epsilon=0.0)
    assert receipt_problem(forged) is None  # well-formed, signed by *some* key ...
    assert "another key" in receipt_problem(forged, mary)  # ... but not the hospital's
    assert "does not verify" in receipt_problem({**forged, "public_key": mary})
    assert "does not verify" in receipt_problem({**genuine, "epsilon": 0.0})
    assert "another key" in receipt_problem(genuine, other.public_b64)


def test_heads(tmp_path):
    server = key(tmp_path, "server")
    head = sign_head(server, 4, "a" * 64)
    assert head_problem(head) is None
    assert "does not verify" in head_problem({**head, "index": 5})
    assert "does not verify" in head_problem({**head, "public_key": key(tmp_path, "x").public_b64})
    assert "bad value for ['hash']" in head_problem({**head, "hash": "A" * 64})
    with pytest.raises(ValueError):
        sign_head(server, -1, "a" * 64)


def test_make_receipt_refuses_bad_fields(tmp_path):
    k = key(tmp_path, "h")
    good = dict(run_id="r" * 64, round=1, hospital="h", model_received="a" * 64, update_hash=None, num_examples=0,
                epsilon=None, history_hash=None, ledger_head=None)
    assert receipt_problem(make_receipt(k, **good), k.public_b64) is None
    for bad in ({"round": 0}, {"epsilon": math.nan}, {"epsilon": -1.0}, {"num_examples": True}, {"hospital": "a\nb"},
                {"update_hash": "A" * 64}, {"ledger_head": {"index": 0, "hash": "a" * 64}}):
        with pytest.raises(ValueError, match="not made"):
            make_receipt(k, **{**good, **bad})


def test_history_hash():
    assert history_hash([(1, 0.01, 10)]) == history_hash([[1.0, 0.01, 10]])
    assert history_hash([(1.0, 0.01, 10)]) != history_hash([(1.0, 0.01, 11)])
    assert history_hash([]) != history_hash([(1.0, 0.01, 0)])


# ---- the ledger refuses receipts that do not belong where they are stored -----------


def test_ledger_refuses_misfiled_or_broken_receipts(tmp_path, federation):
    _, logs = federation
    receipt = ReceiptLog(logs[0]).receipts()[0]  # st-mary, round 1
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.append("start", round=0, config_hash=CFG_HASH, model_after=CFG_HASH)
    record = {"update_hash": None, "norm": None, "accepted": True, "reason": None, "epsilon": None}
    for name, r, rec, match in [
        ("riverside", 1, receipt, "holds the receipt of 'st-mary' for round 1"),
        ("st-mary", 2, receipt, "holds the receipt of 'st-mary' for round 1"),
        ("st-mary", 1, {**receipt, "num_examples": 1}, "signature does not verify"),
    ]:
        with pytest.raises(ValueError, match=match):
            ledger.append("round", round=r, config_hash=CFG_HASH, model_after=CFG_HASH,
                          hospitals={name: {**record, "receipt": rec}})
    ledger.append("round", round=1, config_hash=CFG_HASH, model_after=CFG_HASH,
                  hospitals={"st-mary": {**record, "receipt": receipt}})


# ---- the checks are total -----------------------------------------------------------


def junk(rng: random.Random, depth: int = 0):
    atoms = [None, True, False, 0, -1, 2**63, 10**5000, 1.5, math.nan, math.inf, -math.inf, "", "a" * 64,
             "A" * 44, "x\udc80y", "\n", b"bytes", ("t",), {1, 2}]
    if depth > 2 or rng.random() < 0.5:
        return rng.choice(atoms)
    if rng.random() < 0.5:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = list(RECEIPT_KEYS) + ["index", "hash", 1, None, 10**5000]
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randrange(12))}


def test_checks_never_raise_on_junk(federation):
    _, logs = federation
    genuine = ReceiptLog(logs[0]).last()
    rng = random.Random(0)
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    samples = [None, [], "x", 10**5000, math.nan, deep, {"a": deep}] + [junk(rng) for _ in range(3000)]
    samples += [{**genuine, field: junk(rng)} for field in RECEIPT_KEYS for _ in range(40)]
    samples += [{**genuine, "ledger_head": {**genuine["ledger_head"], field: junk(rng)}}
                for field in ("index", "hash", "public_key", "signature") for _ in range(20)]
    for sample in samples:
        problem = receipt_problem(sample)
        assert isinstance(problem, str) and "\n" not in problem, sample
        assert isinstance(head_problem(sample), str)
        assert verify_signature(genuine["public_key"], sample if isinstance(sample, dict) else {}, junk(rng)) is False
    for public in (1, "", "A" * 44, genuine["public_key"] + "=", deep):
        assert verify_signature(public, {"a": deep}, genuine["signature"]) is False
        assert isinstance(receipt_problem(genuine, public), str)
