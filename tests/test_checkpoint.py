"""Checkpoints: round-trip, atomic under a crash mid-write, clear errors that touch nothing."""

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from carefl import checkpoint
from carefl.checkpoint import atomic_save, atomic_write_text, load_latest_checkpoint, save_round_checkpoint
from carefl.errors import CareFLError, CheckpointError


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, generator=g)).sum().backward()
    opt.step()
    return {
        "global_model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "server_opt": opt.state_dict(),
        "aggregator": {"momentum": torch.randn(8, generator=g)},
        "reputation": {"st-mary": [1.0, 0.5], "riverside": [1.0, 1.0]},
        "ledger_head": "ab" * 32,
        "metrics": {"dice": [0.1 * seed, 0.2], "rounds": [1, 2], "note": None},
    }


def snapshot(root: Path) -> dict:
    """Every file under root -> (bytes, mtime_ns)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_round_trip_restores_every_key(tmp_path):
    state = make_state(1)
    path = save_round_checkpoint(tmp_path, 1, state)
    assert path == tmp_path / "checkpoints" / "round_001.pt"
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded["round"] == 1
    assert_same_state({k: v for k, v in loaded.items() if k != "round"}, state)
    # the optimiser state loads back into a fresh optimiser
    model = torch.nn.Linear(3, 2)
    torch.optim.Adam(model.parameters(), lr=0.1).load_state_dict(loaded["server_opt"])


def test_latest_follows_the_newest_round(tmp_path):
    save_round_checkpoint(tmp_path, 1, make_state(1))
    save_round_checkpoint(tmp_path, 2, make_state(2))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "round_002.pt"
    assert load_latest_checkpoint(tmp_path)["metrics"]["dice"][0] == pytest.approx(0.2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "round_001.pt", "round_002.pt"]


def test_state_round_must_agree(tmp_path):
    with pytest.raises(ValueError, match="round"):
        save_round_checkpoint(tmp_path, 3, {**make_state(1), "round": 2})


def test_state_missing_a_key_is_refused(tmp_path):
    state = make_state(1)
    del state["ledger_head"]
    with pytest.raises(ValueError, match="ledger_head"):
        save_round_checkpoint(tmp_path, 1, state)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_round_checkpoint(tmp_path, 1, make_state(1))
    before = snapshot(tmp_path)
    real_save = torch.save

    def crashing_save(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half of the bytes reached the disk ...
        raise OSError("disk full")  # ... then the process died

    monkeypatch.setattr(torch, "save", crashing_save)  # the one checkpoint.atomic_save imports when it runs
    with pytest.raises(OSError, match="disk full"):
        save_round_checkpoint(tmp_path, 2, make_state(2))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no round_002.pt, no temp file, latest untouched
    assert load_latest_checkpoint(tmp_path)["round"] == 1


def test_crash_while_overwriting_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model_final.pt"
    atomic_save({"w": torch.ones(3)}, target)
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("I/O error")))
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pt"]


def test_atomic_write_text_replaces_content(tmp_path):
    path = tmp_path / "note.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["note.txt"]


def test_missing_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="run directory not found.*resume=") as err:
        load_latest_checkpoint(tmp_path / "nope")
    assert isinstance(err.value, CareFLError)
    assert not (tmp_path / "nope").exists()


def test_run_without_checkpoint(tmp_path):
    (tmp_path / "ledger.jsonl").write_text("")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"latest not found.*checkpoints/"):
        load_latest_checkpoint(tmp_path)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "checkpoints").exists()


def test_truncated_checkpoint_fails_clearly_and_deletes_nothing(tmp_path):
    save_round_checkpoint(tmp_path, 1, make_state(1))
    path = save_round_checkpoint(tmp_path, 2, make_state(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"round_002\.pt is corrupt.*start a new run without resume="):
        load_latest_checkpoint(tmp_path)  # no silent fall-back to round 1
    assert snapshot(tmp_path) == before


def test_latest_naming_a_missing_file(tmp_path):
    path = save_round_checkpoint(tmp_path, 1, make_state(1))
    path.unlink()
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"round_001\.pt"):
        load_latest_checkpoint(tmp_path)
    assert snapshot(tmp_path) == before


def test_checkpoint_lacking_keys(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"round": 1}, tmp_path / "checkpoints" / "round_001.pt")
    (tmp_path / "checkpoints" / "latest").write_text("round_001.pt\n")
    with pytest.raises(CheckpointError, match="global_model"):
        load_latest_checkpoint(tmp_path)


def test_checkpoint_with_code_objects_is_refused(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"round": 1, "payload": Fraction(1, 3)}, tmp_path / "checkpoints" / "round_001.pt")
    (tmp_path / "checkpoints" / "latest").write_text("round_001.pt\n")
    with pytest.raises(CheckpointError, match="corrupt or unreadable.*Unsupported global.*Fraction"):
        load_latest_checkpoint(tmp_path)
