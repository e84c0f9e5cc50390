"""Audit ledger: every kind of tampering is caught and names the first bad entry."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from carefl.checkpoint import atomic_save
from carefl.ledger import (
    GENESIS,
    Ledger,
    LedgerError,
    entry_hash,
    hash_config,
    hash_file,
    hash_state_dict,
    main,
    verify_run,
)

CFG = {"seed": 0, "federation": {"rounds": 3, "hospitals": ["st-mary", "riverside"]}, "strategy": {"f": 0}}


def model_state(step: int) -> dict:
    torch.manual_seed(step)
    return torch.nn.Linear(4, 2).state_dict()


def hospitals(round: int) -> dict:
    return {
        "st-mary": {"update_hash": "a" * 64, "norm": 1.5 + round, "accepted": True, "reason": None, "epsilon": 0.5,
                    "receipt": None},
        "riverside": {"update_hash": "b" * 64, "norm": 90.0, "accepted": False, "reason": "norm > 10", "epsilon": None,
                      "receipt": None},
    }


def write_run(run_dir: Path, rounds: int = 3, end: bool = True) -> Ledger:
    """start, `rounds` round entries, end; model_final.pt = the last model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(CFG), run_dir / "config.yaml")
    ledger = Ledger(run_dir / "ledger.jsonl")
    cfg_hash = hash_config(CFG)
    ledger.append("start", round=0, config_hash=cfg_hash, model_after=hash_state_dict(model_state(0)))
    for r in range(1, rounds + 1):
        ledger.append(
            "round",
            round=r,
            config_hash=cfg_hash,
            model_before=hash_state_dict(model_state(r - 1)),
            model_after=hash_state_dict(model_state(r)),
            hospitals=hospitals(r),
        )
    if end:
        final = model_state(rounds)
        atomic_save(final, run_dir / "model_final.pt")
        final_hash = hash_state_dict(final)
        (run_dir / "metrics.json").write_text('{"status": "completed"}')
        (run_dir / "summary.md").write_text("dice 0.9\n")
        outputs = {name: hash_file(run_dir / name) for name in ("metrics.json", "summary.md")}
        ledger.append("end", round=rounds, config_hash=cfg_hash, model_before=final_hash, model_after=final_hash,
                      outputs=outputs)
    return ledger


@pytest.fixture
def run(tmp_path) -> Path:
    write_run(tmp_path / "run")
    return tmp_path / "run"


def read_lines(run_dir: Path) -> list[str]:
    return (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()


def write_lines(run_dir: Path, lines: list[str]) -> None:
    (run_dir / "ledger.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def dump(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def assert_bad(run_dir: Path, index: int, *words: str) -> None:
    result = verify_run(run_dir)
    assert not result.ok
    assert result.first_bad == index, result.reason
    for word in words:
        assert word in result.reason


# ---- hashing ------------------------------------------------------------------------


def test_state_dict_hash_survives_save_and_load(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "conv.weight": torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0)),
        "t": base.t(),  # non-contiguous view
        "slice": base[1],  # shares storage with a larger tensor
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "half": torch.ones(3, dtype=torch.bfloat16, requires_grad=True),
    }
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert hash_state_dict(loaded) == hash_state_dict(state)
    assert hash_state_dict(dict(reversed(list(state.items())))) == hash_state_dict(state)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: {**s, "w": s["w"].double()},  # dtype
        lambda s: {**s, "w": s["w"].reshape(4, 1)},  # shape, same bytes
        lambda s: {"v": s["w"]},  # key
        lambda s: {**s, "w": s["w"] + torch.tensor([[0, 0], [0, 1e-6]])},  # value
        lambda s: {**s, "extra": torch.zeros(0)},  # an extra (even empty) tensor
    ],
)
def test_state_dict_hash_sees_every_change(change):
    state = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    assert hash_state_dict(change(state)) != hash_state_dict(state)


def test_state_dict_hash_rejects_non_tensors():
    with pytest.raises(TypeError, match="'lr'"):
        hash_state_dict({"lr": 0.1})


def test_config_hash_is_canonical():
    reordered = {"strategy": {"f": 0}, "federation": {"hospitals": ["st-mary", "riverside"], "rounds": 3}, "seed": 0}
    assert hash_config(reordered) == hash_config(CFG)
    assert hash_config(OmegaConf.create(CFG)) == hash_config(CFG)
    assert hash_config({**CFG, "seed": 1}) != hash_config(CFG)
    assert len(hash_config(CFG)) == 64


# ---- a clean run --------------------------------------------------------------------


def test_clean_ledger_verifies(run, capsys):
    result = verify_run(run)
    assert (result.ok, result.entries, result.first_bad) == (True, 5, None)
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == ("OK: 5 entries, chain intact, model_final.pt, config.yaml, "
                                               "metrics.json, summary.md match entry 4")


@pytest.mark.parametrize("name, edit, words", [
    ("config.yaml", lambda t: t.replace("rounds: 3", "rounds: 30"), ["config.yaml hashes to", "edited after the run"]),
    ("metrics.json", lambda t: t.replace("completed", "failed"), ["metrics.json hashes to", "edited after the run"]),
    ("summary.md", lambda t: t.replace("0.9", "0.99"), ["summary.md hashes to", "edited after the run"]),
])
def test_edited_config_or_results_are_detected(run, name, edit, words):
    path = run / name
    path.write_text(edit(path.read_text()))
    assert_bad(run, 4, *words)


def test_removed_config_or_results_are_detected(run):
    (run / "summary.md").unlink()
    assert_bad(run, 4, "summary.md not found")
    (run / "config.yaml").unlink()
    assert_bad(run, 4, "config.yaml not found")


def test_a_ledger_from_before_outputs_existed_still_verifies(run):
    entries = [json.loads(line) for line in read_lines(run)]
    prev = GENESIS
    for entry in entries:  # as an older CareFL wrote it: no outputs key, hashes over what is there
        entry.pop("outputs")
        entry["prev_hash"] = prev
        entry.pop("hash")
        entry["hash"] = prev = entry_hash(entry)
    write_lines(run, [dump(e) for e in entries])
    result = verify_run(run)
    assert result.ok, result.reason


def test_entries_follow_the_schema(run):
    entries = [json.loads(line) for line in read_lines(run)]
    assert [e["kind"] for e in entries] == ["start", "round", "round", "round", "end"]
    assert entries[0]["prev_hash"] == GENESIS
    for before, after in zip(entries, entries[1:]):
        assert after["prev_hash"] == before["hash"]
    assert all(entry_hash(e) == e["hash"] for e in entries)
    assert entries[2]["hospitals"]["riverside"] == hospitals(2)["riverside"]
    assert entries[2]["time"].endswith("+00:00")


# ---- tampering ----------------------------------------------------------------------


def test_edited_field_is_detected(run):
    lines = read_lines(run)
    entry = json.loads(lines[2])
    entry["hospitals"]["riverside"]["accepted"] = True
    lines[2] = dump(entry)
    write_lines(run, lines)
    assert_bad(run, 2, "hash does not match")


def test_edit_with_recomputed_hash_breaks_the_next_link(run):
    lines = read_lines(run)
    entry = json.loads(lines[2])
    entry["hospitals"]["st-mary"]["norm"] = 0.1
    entry["hash"] = entry_hash(entry)
    lines[2] = dump(entry)
    write_lines(run, lines)
    assert_bad(run, 3, "prev_hash", "entry 2")


def test_deleted_entry_is_detected(run):
    lines = read_lines(run)
    del lines[2]
    write_lines(run, lines)
    assert_bad(run, 2, "index is 3")


def test_deleted_first_entry_is_detected(run):
    write_lines(run, read_lines(run)[1:])
    assert_bad(run, 0)


def test_reordered_entries_are_detected(run):
    lines = read_lines(run)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(run, lines)
    assert_bad(run, 1, "reordered")


def forged(lines: list[str], **changes) -> dict:
    entry = {**json.loads(lines[-2]), "index": len(lines)}  # a copy of round 3, appended
    entry.update(changes)
    entry["hash"] = entry_hash(entry)
    return entry


def test_forged_entry_with_wrong_prev_hash(run):
    lines = read_lines(run)
    write_lines(run, lines + [dump(forged(lines, prev_hash="c" * 64))])
    assert_bad(run, 5, "prev_hash")


def test_forged_entry_with_right_prev_hash_but_wrong_hash(run):
    lines = read_lines(run)
    entry = forged(lines, prev_hash=json.loads(lines[-1])["hash"])
    entry["hash"] = "d" * 64
    write_lines(run, lines + [dump(entry)])
    assert_bad(run, 5, "hash does not match")


def test_consistent_forged_entry_after_end(run):
    lines = read_lines(run)
    write_lines(run, lines + [dump(forged(lines, prev_hash=json.loads(lines[-1])["hash"]))])
    assert_bad(run, 5, "after the 'end'")


def test_truncated_last_line(run):
    text = (run / "ledger.jsonl").read_text()
    (run / "ledger.jsonl").write_text(text[: len(text) - 40])
    assert_bad(run, 4, "cut off")


def test_truncated_middle_line(run):
    lines = read_lines(run)
    lines[1] = lines[1][: len(lines[1]) // 2]
    write_lines(run, lines)
    assert_bad(run, 1, "not valid JSON")


def test_removed_end_entry_with_model_present(run):
    write_lines(run, read_lines(run)[:-1])
    assert_bad(run, 4, "missing")


def test_tampered_model_file(run, capsys):
    state = torch.load(run / "model_final.pt", weights_only=True)
    state["weight"][0, 0] += 1e-3
    torch.save(state, run / "model_final.pt")
    assert_bad(run, 4, "model_final.pt")
    assert main([str(run)]) == 1
    assert capsys.readouterr().out.startswith("TAMPERED: entry 4: model_final.pt hashes to")


def test_unreadable_model_file(run):
    (run / "model_final.pt").write_bytes(b"not a checkpoint")
    assert_bad(run, 4, "model_final.pt cannot be read")


def test_missing_model_file_is_incomplete(run, capsys):
    (run / "model_final.pt").unlink()
    result = verify_run(run)
    assert (result.ok, result.first_bad) == (False, None)
    assert main([str(run)]) == 1
    assert capsys.readouterr().out.startswith("INCOMPLETE: model_final.pt not found")


def test_empty_ledger(tmp_path):
    (tmp_path / "ledger.jsonl").write_text("")
    assert_bad(tmp_path, 0, "empty")


# ---- resume -------------------------------------------------------------------------


def test_reopen_continues_the_chain(tmp_path):
    run = tmp_path / "run"
    first = write_run(run, rounds=2, end=False)
    second = Ledger(run / "ledger.jsonl", expect_head=first.head)
    assert (second.head, len(second)) == (first.head, 3)
    cfg_hash = hash_config(CFG)
    entry = second.append(
        "round",
        round=3,
        config_hash=cfg_hash,
        model_before=hash_state_dict(model_state(2)),
        model_after=hash_state_dict(model_state(3)),
        hospitals=hospitals(3),
    )
    assert entry["prev_hash"] == first.head and entry["index"] == 3
    atomic_save(model_state(3), run / "model_final.pt")
    second.append("end", round=3, config_hash=cfg_hash, model_after=hash_state_dict(model_state(3)))
    assert verify_run(run).ok


def test_reopen_accepts_an_older_checkpoint_head(tmp_path):
    ledger = write_run(tmp_path, rounds=2, end=False)
    older = json.loads(read_lines(tmp_path)[1])["hash"]  # crash after logging round 2, before its checkpoint
    assert Ledger(tmp_path / "ledger.jsonl", expect_head=older).head == ledger.head


def test_reopen_refuses_a_foreign_head(tmp_path):
    write_run(tmp_path, rounds=1, end=False)
    with pytest.raises(LedgerError, match="different runs"):
        Ledger(tmp_path / "ledger.jsonl", expect_head="e" * 64)


def test_reopen_refuses_a_tampered_ledger(run):
    lines = read_lines(run)[:-1]
    lines[1] = lines[1].replace('"round":1', '"round":9')
    write_lines(run, lines)
    before = (run / "ledger.jsonl").read_bytes()
    with pytest.raises(LedgerError, match="entry 1:.*start a new run"):
        Ledger(run / "ledger.jsonl")
    assert (run / "ledger.jsonl").read_bytes() == before


def test_reopen_refuses_a_finished_run(run):
    with pytest.raises(LedgerError, match="'end'"):
        Ledger(run / "ledger.jsonl")


# ---- append validation --------------------------------------------------------------


def test_append_rejects_bad_entries_without_writing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    h = hash_config(CFG)
    with pytest.raises(ValueError, match="'start'"):
        ledger.append("round", round=1, config_hash=h, model_after=h)
    with pytest.raises(TypeError, match="unknown fields \\['note'\\]"):
        ledger.append("start", round=0, config_hash=h, model_after=h, note="x")
    with pytest.raises(TypeError, match="missing fields \\['model_after'\\]"):
        ledger.append("start", round=0, config_hash=h)
    assert not (tmp_path / "ledger.jsonl").exists()
    ledger.append("start", round=0, config_hash=h, model_after=h)
    no_reason = {"x": {"update_hash": None, "norm": None, "accepted": False, "reason": None, "epsilon": None,
                       "receipt": None}}
    with pytest.raises(ValueError, match="needs a reason"):
        ledger.append("round", round=1, config_hash=h, model_after=h, hospitals=no_reason)
    with pytest.raises(ValueError, match="exactly the keys"):
        ledger.append("round", round=1, config_hash=h, model_after=h, hospitals={"x": {"accepted": True}})
    with pytest.raises(ValueError, match="model_after"):
        ledger.append("round", round=1, config_hash=h, model_after="not-a-hash")
    assert len(read_lines(tmp_path)) == 1 and len(ledger) == 1


def test_append_stores_tensor_norms_and_non_finite_as_null(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    h = hash_config(CFG)
    ledger.append("start", round=0, config_hash=h, model_after=h)
    recs = {
        "a": {"update_hash": None, "norm": torch.tensor(2.5), "accepted": True, "reason": None, "epsilon": 1.0,
              "receipt": None},
        "b": {"update_hash": None, "norm": float("nan"), "accepted": False, "reason": "non-finite", "epsilon": None,
              "receipt": None},
    }
    entry = ledger.append("round", round=1, config_hash=h, model_after=h, hospitals=recs)
    assert entry["hospitals"]["a"]["norm"] == 2.5 and entry["hospitals"]["b"]["norm"] is None
    assert json.loads(read_lines(tmp_path)[1]) == entry


# ---- CLI ----------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path, run, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "ledger.jsonl not found" in capsys.readouterr().err
    assert main([str(run)]) == 0
    lines = read_lines(run)
    lines[1], lines[3] = lines[3], lines[1]
    write_lines(run, lines)
    assert main([str(run)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("TAMPERED: entry 1: ")
