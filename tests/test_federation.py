"""The server's round logic (carefl.federation) without Flower."""

import json

import pytest
import torch

from carefl.config import compose_config
from carefl.federation import Federation, FederationStopped
from carefl.hospital import TrainReply
from carefl.ledger import verify_run
from carefl.models import build_model

HOSPITALS = ["st-mary", "riverside", "northfield"]


def _cfg(*overrides):
    return compose_config(["data.image_size=16", "model.channels=[4,8,16]", "privacy=none", *overrides])


def _reply(name, global_state, delta=0.01, simulated=1.0, status="ok", n=10.0):
    state = None
    if status == "ok":
        state = {k: v + delta if v.is_floating_point() else v.clone() for k, v in global_state.items()}
    return TrainReply(name, status, "" if status == "ok" else f"{name}: budget", state,
                      {"num_examples": n, "train_loss": 0.5, "simulated": simulated})


def _fed(tmp_path, *overrides):
    cfg = _cfg(*overrides)
    return Federation(cfg, tmp_path / "run", build_model(cfg).state_dict())


def test_bad_updates_are_rejected_by_name_and_the_round_goes_on(tmp_path):
    fed = _fed(tmp_path)
    g = fed.global_state
    nan = _reply("northfield", g)
    first = next(k for k, v in nan.state.items() if v.is_floating_point())
    nan.state[first] = nan.state[first].clone().fill_(float("nan"))
    wrong = _reply("riverside", g)
    wrong.state.pop(first)
    replies = [_reply("st-mary", g), wrong, nan,
               _reply("st-mary", g, delta=1e6)]  # absurd norm (> federation.max_update_norm)
    replies[-1].hospital = "st-mary"
    summary = fed.aggregate(1, replies[:1] + replies[1:3] + [_reply("st-mary", g)])
    assert summary.accepted == ["st-mary", "st-mary"]
    assert "northfield" in summary.rejected["northfield"] and "riverside" in summary.rejected["riverside"]
    absurd = Federation(_cfg("federation.max_update_norm=1.0"), tmp_path / "absurd", g)
    with pytest.raises(FederationStopped):
        absurd.aggregate(1, [_reply("st-mary", g, delta=1e3), _reply("riverside", g, delta=1e3)])
    assert "norm" in absurd.report.data["rounds"][0]["train"]["st-mary"]["reason"]


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


def test_simulated_attack_applies_only_to_simulated_replies(tmp_path):
    moved = {}
    for simulated in (1.0, 0.0):
        fed = _fed(tmp_path / str(simulated), "attack=signflip", "attack.byzantine=[2]", "attack.scale=10")
        g = {k: v.clone() for k, v in fed.global_state.items()}
        fed.aggregate(1, [_reply(h, g, 0.01, simulated) for h in HOSPITALS])
        key = next(k for k, v in g.items() if v.is_floating_point())
        moved[simulated] = float((fed.global_state[key] - g[key]).mean())
    assert moved[0.0] == pytest.approx(0.01, abs=1e-6)  # deployment: nobody attacks
    assert moved[1.0] == pytest.approx((0.01 + 0.01 - 0.1) / 3, abs=1e-6)  # northfield sends -10 u


def test_checkpoint_resume_continues_the_round_and_the_ledger(tmp_path):
    cfg = _cfg("strategy=fedavgm")
    fed = Federation(cfg, tmp_path / "run", build_model(cfg).state_dict())
    fed.aggregate(1, [_reply(h, fed.global_state) for h in HOSPITALS])
    fed.record_evaluation(1, {h: {"dice": 0.5, "num_examples": 4.0} for h in HOSPITALS})
    fed.checkpoint(1)
    resumed = Federation(cfg, tmp_path / "run", build_model(cfg).state_dict(), resume=True)
    assert resumed.next_round == 2
    assert all(torch.equal(resumed.global_state[k], fed.global_state[k]) for k in fed.global_state)
    assert resumed.server_opt.state_dict().keys() == fed.server_opt.state_dict().keys()
    resumed.aggregate(2, [_reply(h, resumed.global_state) for h in HOSPITALS])
    resumed.checkpoint(2)
    resumed.finish("completed")
    result = verify_run(tmp_path / "run")
    assert result.ok and result.entries == 4  # start, round 1, round 2, end
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
