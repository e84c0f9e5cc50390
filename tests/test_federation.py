"""The server's round logic (carefl.federation) without Flower."""

import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from carefl.config import compose_config
from carefl.federation import Federation, FederationStopped
from carefl.ledger import hash_state_dict, verify_run
from carefl.models import build_model
from carefl.receipts import SigningKey, make_receipt
from carefl.replies import TrainReply

HOSPITALS = ["st-mary", "riverside", "northfield"]
KEY_FILE = Path(tempfile.mkdtemp()) / "hospital_key.pem"


def _cfg(*overrides):
    return compose_config(["data.image_size=16", "model.channels=[4,8,16]", "privacy=none", *overrides])


def _reply(name, global_state, delta=0.01, status="ok", n=10.0, rnd=1):
    """A reply as it leaves carefl.replies: checked, with the hospital's signed receipt."""
    state = None
    if status == "ok":
        state = {k: v + delta if v.is_floating_point() else v.clone() for k, v in global_state.items()}
    receipt = make_receipt(
        SigningKey.load_or_create(KEY_FILE), run_id="0" * 64, round=rnd, hospital=name,
        model_received=hash_state_dict(global_state) if global_state else "0" * 64,
        update_hash=hash_state_dict(state) if state else None, num_examples=int(n), epsilon=None,
        history_hash=None, ledger_head=None)
    return TrainReply(name, status, "" if status == "ok" else f"{name}: budget", state,
                      {"num_examples": n, "train_loss": 0.5}, receipt)


def _fed(tmp_path, *overrides, simulated=True):
    cfg = _cfg(*overrides)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, tmp_path / "run" / "config.yaml", resolve=True)  # as carefl.rounds.prepare_run_dir does
    return Federation(cfg, tmp_path / "run", build_model(cfg).state_dict(), simulated=simulated)


def test_absurd_norms_are_left_out_by_name_and_the_round_goes_on(tmp_path, caplog):
    fed = _fed(tmp_path)
    g = fed.global_state
    # relative bound (default federation.max_update_norm_ratio=10): 100x the others' norm
    with caplog.at_level(logging.WARNING, logger="carefl"):
        summary = fed.aggregate(1, [_reply("st-mary", g), _reply("riverside", g), _reply("northfield", g, delta=1.0)])
    assert summary.accepted == ["st-mary", "riverside"]
    assert summary.rejected["northfield"].startswith("northfield: update norm ")
    assert "max_update_norm_ratio" in summary.rejected["northfield"]
    # the hospital is named once, in the reason and in the log line
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith("round 1: left out northfield: update norm ") and line.count("northfield") == 1
    absurd = Federation(_cfg("federation.max_update_norm=1.0"), tmp_path / "absurd", g)
    with pytest.raises(FederationStopped):
        absurd.aggregate(1, [_reply("st-mary", g, delta=1e3), _reply("riverside", g, delta=1e3)])
    record = absurd.report.data["rounds"][0]["train"]["st-mary"]
    assert "federation.max_update_norm=1" in record["reason"] and record["status"] == "rejected"


def test_fedavg_moves_the_model_by_the_mean_update(tmp_path):
    fed = _fed(tmp_path)
    before = {k: v.clone() for k, v in fed.global_state.items()}
    fed.aggregate(1, [_reply("st-mary", before, 0.01), _reply("riverside", before, 0.03)])
    key = next(k for k, v in before.items() if v.is_floating_point())
    assert torch.allclose(fed.global_state[key], before[key] + 0.02, atol=1e-6)


def test_refusals_below_min_hospitals_stop_cleanly_and_keep_the_model(tmp_path):
    fed = _fed(tmp_path)
    before = {k: v.clone() for k, v in fed.global_state.items()}
    with pytest.raises(FederationStopped, match="min_hospitals=2"):
        fed.aggregate(1, [_reply("st-mary", before), _reply("riverside", None, status="refused")])
    assert all(torch.equal(fed.global_state[k], before[k]) for k in before)
    fed.finish("stopped", "budget")
    assert verify_run(tmp_path / "run").ok
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "stopped" and record["rounds"][0]["train"]["riverside"]["status"] == "refused"


def test_simulated_attack_applies_only_when_the_transport_is_simulated(tmp_path):
    moved = {}
    for simulated in (True, False):
        fed = _fed(tmp_path / str(simulated), "attack=signflip", "attack.byzantine=[2]", "attack.scale=10",
                   "federation.max_update_norm_ratio=null", simulated=simulated)
        g = {k: v.clone() for k, v in fed.global_state.items()}
        fed.aggregate(1, [_reply(h, g, 0.01) for h in HOSPITALS])
        key = next(k for k, v in g.items() if v.is_floating_point())
        moved[simulated] = float((fed.global_state[key] - g[key]).mean())
    assert moved[False] == pytest.approx(0.01, abs=1e-6)  # deployment: nobody attacks
    assert moved[True] == pytest.approx((0.01 + 0.01 - 0.1) / 3, abs=1e-6)  # northfield sends -10 u


def test_checkpoint_resume_continues_the_round_and_the_ledger(tmp_path):
    fed = _fed(tmp_path, "strategy=fedavgm")
    cfg = fed.cfg
    fed.aggregate(1, [_reply(h, fed.global_state) for h in HOSPITALS])
    fed.record_evaluation(1, {h: {"dice": 0.5, "num_examples": 4.0} for h in HOSPITALS})
    fed.checkpoint(1)
    resumed = Federation(cfg, tmp_path / "run", build_model(cfg).state_dict(), resume=True)
    assert resumed.next_round == 2
    assert all(torch.equal(resumed.global_state[k], fed.global_state[k]) for k in fed.global_state)
    assert resumed.server_opt.state_dict().keys() == fed.server_opt.state_dict().keys()
    resumed.aggregate(2, [_reply(h, resumed.global_state, rnd=2) for h in HOSPITALS])
    resumed.checkpoint(2)
    resumed.finish("completed")
    result = verify_run(tmp_path / "run")
    assert result.ok and result.entries == 4  # start, round 1, round 2, end
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
