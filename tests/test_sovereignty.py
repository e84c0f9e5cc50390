"""A hostile coordinator against one real hospital (issue 12, points 1-4): whatever the server
sends, the hospital's privacy rests only on its own node config. Each test replays one attack
that worked before and asserts the hospital's answer -- the line its operator and the server see.

The hospital here is ``carefl.hospital.handle`` with a real SuperNode's node config (no
``partition-id``): exactly what the ClientApp calls for every Flower message.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest
import torch

from carefl import budget
from carefl.config import compose_config
from carefl.hospital import EVALUATE, TRAIN, handle
from carefl.models import build_model
from carefl.receipts import KEY_FILE, LOG_FILE, ReceiptLog, SigningKey, receipt_problem
from carefl.request import RequestError, build_request, parse_request

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
torch.set_num_threads(1)

TINY = ["data.n_train=8", "data.n_test=4", "data.image_size=16", "federation.rounds=3",
        "federation.batch_size=4"]
RUN = "ab" * 32


def node(tmp_path, **extra) -> dict:
    """A real SuperNode's node config: its name, demo data site, state dir and budget."""
    return {"hospital": "st-mary", "data-path": "synthetic:0", "state-dir": str(tmp_path / "state"),
            "epsilon-cap": "8.0", "delta": "1e-5", **extra}


def request(*overrides: str, server_round: int = 1) -> tuple[str, dict]:
    cfg = compose_config([*TINY, *overrides])
    return build_request(cfg, server_round, RUN, None, None), build_model(cfg).state_dict()


def forged(text: str, edit) -> str:
    """The request JSON with ``edit(dict)`` applied: what a hostile server can send."""
    raw = json.loads(text)
    edit(raw)
    return json.dumps(raw)


# ---- point 1: DP, cap, delta, paths are the hospital's ------------------------------------


def test_server_cannot_switch_dp_off(tmp_path):
    text, state = request("privacy=none")
    reply = handle(TRAIN, text, state, node(tmp_path))
    assert reply.status == "refused" and reply.state is None
    assert "require-dp=true" in reply.reason and "privacy.enabled=false" in reply.reason
    assert receipt_problem(reply.receipt) is None and reply.receipt["update_hash"] is None  # signed refusal
    # the hospital's own policy can allow it
    allowed = handle(TRAIN, text, state, node(tmp_path, **{"require-dp": "false"}))
    assert allowed.status == "ok" and "epsilon" not in allowed.metrics and "train_loss" in allowed.metrics


def test_server_cannot_set_delta_or_cap(tmp_path):
    text, state = request()
    for key, value in (("target_delta", 0.5), ("epsilon_cap", 1e9)):
        hostile = forged(text, lambda raw: raw["config"]["privacy"].update({key: value}))
        reply = handle(TRAIN, hostile, state, node(tmp_path))
        assert reply.status == "refused" and f"privacy.{key} is not allowed" in reply.reason
    ok = handle(TRAIN, text, state, node(tmp_path, delta="1e-6"))
    assert ok.status == "ok" and ok.metrics["delta"] == 1e-6  # the hospital's delta, not the server's 1e-5


def test_a_real_supernode_must_set_its_own_budget_and_paths(tmp_path):
    text, state = request()
    for missing in ("epsilon-cap", "delta", "data-path", "state-dir"):
        config = {k: v for k, v in node(tmp_path).items() if k != missing}
        reply = handle(TRAIN, text, state, config)
        assert reply.status == "refused" and missing in reply.reason and "the server can never fill them in" in reply.reason
    assert not (tmp_path / "state").exists()  # nothing written for a misconfigured hospital


def test_delta_must_be_below_one_over_n(tmp_path):
    text, state = request()
    reply = handle(TRAIN, text, state, node(tmp_path, delta="0.2"))  # n_train = 8
    assert reply.status == "refused" and "not below 1/N" in reply.reason


def test_request_cannot_name_a_path_or_resolve_the_hospitals_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSPITAL_SECRET", "s3cr3t-value")
    text, state = request()
    attacks = [
        lambda raw: raw["config"]["data"].update(datalists={"st-mary": "/etc/passwd"}),
        lambda raw: raw["config"]["data"].update(name="${oc.env:HOSPITAL_SECRET}"),
        lambda raw: raw["config"]["model"].update(name="/etc/passwd"),
        lambda raw: raw.update(simulation={"run_dir": "/tmp/elsewhere"}),  # only simulated nodes accept it
        lambda raw: raw["config"].update(attack={"name": "labelflip"}),
        lambda raw: raw["config"]["federation"].update(lr="1e-3"),  # a string where a number goes
    ]
    for attack in attacks:
        reply = handle(TRAIN, forged(text, attack), state, node(tmp_path))
        assert reply.status == "refused" and reply.reason.startswith("request key"), reply.reason
        assert "s3cr3t-value" not in reply.reason
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("override, fragment", [
    ("federation.local_epochs=50", "max-local-epochs=10"),
    ("federation.batch_size=2048", "max-batch-size=1024"),
    ("model=basicunet", "allowed-models=unet"),
])
def test_requests_outside_the_site_policy_are_refused_with_the_reason(tmp_path, override, fragment):
    text, state = request(override)
    reply = handle(TRAIN, text, state, node(tmp_path, **{"allowed-models": "unet"}))
    assert reply.status == "refused" and fragment in reply.reason


def test_policy_file_and_typos(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("epsilon-cap: 2.0\ndelta: 1.0e-6\nmax-rounds: 2\n")
    text, state = request()  # federation.rounds=3 > max-rounds=2
    config = {k: v for k, v in node(tmp_path).items() if k not in ("epsilon-cap", "delta")}
    reply = handle(TRAIN, text, state, {**config, "site-policy": str(policy)})
    assert reply.status == "refused" and "max-rounds=2" in reply.reason
    typo = handle(TRAIN, text, state, {**node(tmp_path), "epsilon_cap": "3"})
    assert typo.status == "refused" and "epsilon_cap" in typo.reason


# ---- point 3: randomness the server cannot predict -----------------------------------------


def test_identical_requests_train_differently_under_dp(tmp_path):
    text, state = request("privacy.noise_multiplier=1.0")
    a = handle(TRAIN, text, state, node(tmp_path / "a"))
    b = handle(TRAIN, text, state, node(tmp_path / "b"))
    assert a.status == b.status == "ok"
    assert any(not torch.equal(a.state[k], b.state[k]) for k in a.state if a.state[k].is_floating_point())


# ---- point 4: a budget that cannot be lost, reset or raced ---------------------------------


def _trained(tmp_path, rounds: int = 1):
    for r in range(1, rounds + 1):
        text, state = request(server_round=r)
        reply = handle(TRAIN, text, state, node(tmp_path))
        assert reply.status == "ok", reply.reason
    return text, state


def test_deleted_history_is_detected(tmp_path):
    text, state = _trained(tmp_path)
    (tmp_path / "state" / budget.HISTORY_FILE).unlink()
    reply = handle(TRAIN, text, state, node(tmp_path))
    assert reply.status == "refused" and "is missing" in reply.reason and "restores the state dir" in reply.reason


def test_edited_history_is_detected(tmp_path):
    text, state = _trained(tmp_path)
    path = tmp_path / "state" / budget.HISTORY_FILE
    raw = json.loads(path.read_text())
    raw["history"][0][2] = 1  # pretend only one step was taken
    path.write_text(json.dumps(raw))
    reply = handle(TRAIN, text, state, node(tmp_path))
    assert reply.status == "refused" and "signature" in reply.reason


def test_rolled_back_history_is_detected(tmp_path):
    text, state = _trained(tmp_path)
    path = tmp_path / "state" / budget.HISTORY_FILE
    old = path.read_bytes()
    _trained(tmp_path, 2)  # round 2 (request r=1..2 again: the ledger is the server's business)
    path.write_bytes(old)  # a validly signed but older history: epsilon would drop
    reply = handle(TRAIN, text, state, node(tmp_path))
    assert reply.status == "refused" and "rolled back" in reply.reason


def test_a_crash_during_training_can_only_over_count(tmp_path, monkeypatch):
    text, state = request()
    import carefl.hospital as hospital

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies mid-round (not a CareFLError: nothing catches it)

    monkeypatch.setattr(hospital, "train_epochs", crash)
    with pytest.raises(KeyboardInterrupt):
        handle(TRAIN, text, state, node(tmp_path))
    monkeypatch.undo()
    state_dir = tmp_path / "state"
    key = SigningKey.load_or_create(state_dir / KEY_FILE)
    written_ahead = budget.load(state_dir, key, ReceiptLog(state_dir / LOG_FILE))
    assert written_ahead and written_ahead[0][2] > 0  # the planned steps are already counted
    reply = handle(TRAIN, text, state, node(tmp_path))  # and the next round accounts on top of them
    history = budget.load(state_dir, key, ReceiptLog(state_dir / LOG_FILE))
    assert reply.status == "ok" and sum(n for *_, n in history) == 2 * written_ahead[0][2]


def test_a_request_the_hospital_cannot_serve_spends_nothing(tmp_path):
    """privacy.secure_mode=true needs torchcsprng (absent here): refused before the budget is
    touched, so a server repeating it cannot burn the hospital's epsilon."""
    text, state = request("privacy.secure_mode=true")
    for _ in range(2):
        reply = handle(TRAIN, text, state, node(tmp_path))
        assert reply.status == "refused" and "secure_mode" in reply.reason
    assert not (tmp_path / "state" / budget.HISTORY_FILE).exists()


def _train_in_child(args):
    tmp, server_round = args
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    text, state = request(server_round=server_round)
    return handle(TRAIN, text, state, node(tmp)).status


def test_two_runs_on_one_state_dir_both_count(tmp_path):
    """Two processes train on one state dir at once: the lock serialises them, so the history
    holds both rounds' steps (before the lock: 8 of 12 steps were recorded)."""
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ctx.Pool(2) as pool:
        statuses = pool.map(_train_in_child, [(tmp_path, 1), (tmp_path, 2)])
    assert statuses == ["ok", "ok"]
    state_dir = tmp_path / "state"
    key = SigningKey.load_or_create(state_dir / KEY_FILE)
    log = ReceiptLog(state_dir / LOG_FILE)
    history = budget.load(state_dir, key, log)
    steps_per_round = log.receipts()[0]["num_examples"] // 4 * 1  # ceil(8 / 4) steps, 1 epoch
    assert sum(n for *_, n in history) == 2 * steps_per_round and len(log) == 2


# ---- the request schema itself -------------------------------------------------------------


def test_what_the_server_builds_is_what_a_hospital_accepts_and_nothing_more():
    cfg = compose_config([*TINY, "+data.datalists={st-mary:/data/x.json}"])
    text = build_request(cfg, 1, RUN, None, None)
    assert "/data/x.json" not in text and "target_delta" not in text and "attack" not in text
    parsed = parse_request(text, simulated=False)
    assert parsed.config.federation.batch_size == 4 and parsed.simulation is None
    with pytest.raises(RequestError, match="request key round"):
        parse_request(forged(text, lambda raw: raw.update(round=99)), simulated=False)  # beyond federation.rounds
    lr = f'"lr": {cfg.federation.lr}'
    assert lr in text
    with pytest.raises(RequestError, match="NaN"):
        parse_request(text.replace(lr, '"lr": NaN'), simulated=False)


def test_evaluation_requests_follow_the_same_policy(tmp_path):
    text, state = request("privacy=none")
    reply = handle(EVALUATE, text, state, node(tmp_path))
    assert reply.status == "refused" and "require-dp" in reply.reason
    text, state = request()
    reply = handle(EVALUATE, text, state, node(tmp_path))
    assert reply.status == "ok" and 0 <= reply.metrics["dice"] <= 1 and reply.metrics["num_examples"] > 0


def test_a_simulated_hospital_keeps_its_partition_index_whatever_its_data():
    """Label flipping and the non-DP batch order read a simulated hospital's index: it is its
    partition, also when its data comes from a file (data.datalists) rather than the demo."""
    from carefl.request import simulation_section
    from carefl.site import read_policy

    cfg = compose_config(["data=decathlon", "+data.datalists={riverside:/data/riv.json}"])
    request = parse_request(build_request(cfg, 1, RUN, None, simulation_section(cfg, "/run")), simulated=True)
    policy = read_policy({"partition-id": 1, "num-partitions": 3}, request)
    assert (policy.hospital, policy.index, policy.synthetic_site, policy.data_path) == ("riverside", 1, None, "/data/riv.json")
    demo = read_policy({"partition-id": 2, "num-partitions": 3}, request)
    assert (demo.hospital, demo.index, demo.synthetic_site) == ("northfield", 2, 2)


def test_a_cap_below_the_consortiums_target_trains_every_round_with_more_noise(tmp_path):
    """epsilon-cap=5 under the default target 8: the hospital calibrates its own sigma so the
    whole run ends at its cap, trains in every round instead of sitting out the last ones, and
    a second run on the same data brings the total, not the run alone, to the cap."""
    from carefl import privacy

    def run(rounds_dir) -> list:
        replies = [handle(TRAIN, *request(server_round=r), node(rounds_dir, **{"epsilon-cap": "5.0"}))
                   for r in (1, 2, 3)]
        assert [r.status for r in replies] == ["ok"] * 3, [r.reason for r in replies]
        return replies

    first = run(tmp_path)
    assert 4.9 <= first[-1].metrics["epsilon"] <= 5.0  # the plan ends at the cap, not at the target
    wide = handle(TRAIN, *request(server_round=1), node(tmp_path / "wide", **{"epsilon-cap": "50.0"}))
    assert wide.metrics["noise_multiplier"] < first[0].metrics["noise_multiplier"]  # target 8 < cap 50: the plan's
    state = tmp_path / "state"
    history = budget.load(state, SigningKey.load_or_create(state / KEY_FILE), ReceiptLog(state / LOG_FILE))
    assert privacy.epsilon(history, 1e-5) <= 5.0


def test_a_hospital_with_data_workers_trains_its_round_and_a_bad_count_is_refused(tmp_path):
    """data-workers is the hospital's: one worker process builds its batches under DP-SGD (the
    round is an ordinary DP round), and a count outside 0..64 is refused by name."""
    text, state = request()
    reply = handle(TRAIN, text, state, node(tmp_path / "a", **{"data-workers": 1}))
    assert reply.status == "ok" and reply.metrics["epsilon"] > 0, reply.reason
    bad = handle(TRAIN, text, state, node(tmp_path / "b", **{"data-workers": -1}))
    assert bad.status == "refused" and "data-workers=-1" in bad.reason
