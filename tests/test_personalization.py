"""Personal fine-tuning (personalization=finetune) and what joining bought each hospital.

The maths checked here: a personal model is trained with DP-SGD in the same accountant and under
the same cap as the federated rounds (its steps recomputed independently with Google's
dp_accounting); it never leaves the hospital; the cap check of every training round keeps its
epochs in reserve; the report's per-site gain, worst site and spread match a hand computation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import pld

from carefl import budget, privacy
from carefl.config import compose_config
from carefl.ledger import verify_receipts
from carefl.hospital import EVALUATE, PERSONAL_DIR, TRAIN, handle, local_steps
from carefl.models import build_model
from carefl.receipts import LOG_FILE, ReceiptLog, SigningKey
from carefl.report import Report
from carefl.request import build_request

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RUN = "cd" * 32
N, BATCH, ROUNDS, PERSONAL = 8, 4, 3, 2
TINY = [f"data.n_train={N}", "data.n_test=4", "data.image_size=16", f"federation.rounds={ROUNDS}",
        f"federation.batch_size={BATCH}", "personalization=finetune", f"personalization.epochs={PERSONAL}"]


def node(tmp_path, **extra) -> dict:
    return {"hospital": "st-mary", "data-path": "synthetic:0", "state-dir": str(tmp_path / "state"),
            "epsilon-cap": "8.0", "delta": "1e-5", **extra}


def request(*overrides: str, server_round: int) -> tuple[str, dict]:
    cfg = compose_config([*TINY, *overrides])
    return build_request(cfg, server_round, RUN, None, None), build_model(cfg).state_dict()


def _history(tmp_path) -> list:
    state = tmp_path / "state"
    return budget.load(state, SigningKey.load_or_create(state / "hospital_key.pem"), ReceiptLog(state / LOG_FILE))


def _pld_epsilon(history, delta: float) -> float:
    acc = pld.PLDAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_personal_fine_tuning_is_dp_sgd_in_the_same_budget_and_never_leaves(tmp_path):
    for r in range(1, ROUNDS + 1):
        text, state = request(server_round=r)
        assert handle(TRAIN, text, state, node(tmp_path)).status == "ok"
        if r < ROUNDS:  # only after the last round
            assert not any(k.startswith("personal_") for k in handle(EVALUATE, text, state, node(tmp_path)).metrics)
    trained = _history(tmp_path)
    reply = handle(EVALUATE, text, state, node(tmp_path))
    assert reply.status == "ok" and reply.state is None  # nothing but metrics goes back
    assert {"dice", "personal_dice", "trivial_dice"} <= set(reply.metrics)
    personal = torch.load(tmp_path / "state" / PERSONAL_DIR / f"{RUN}.pt", weights_only=True)
    assert any(not torch.equal(personal[k], state[k]) for k in state if state[k].is_floating_point())

    history = _history(tmp_path)
    q, per_round = privacy.sample_rate(N, BATCH), local_steps(N, BATCH, 1)
    sigmas = {s for s, _, _ in history}
    assert len(sigmas) == 1 and {qq for _, qq, _ in history} == {q}
    assert sum(n for *_, n in history) == ROUNDS * per_round + local_steps(N, BATCH, PERSONAL)
    assert sum(n for *_, n in history) - sum(n for *_, n in trained) == local_steps(N, BATCH, PERSONAL)
    # the plan (rounds + personal epochs) meets the target epsilon, recomputed independently
    assert _pld_epsilon(history, 1e-5) == pytest.approx(8.0, rel=0.02)
    # evaluating the last round again (a resumed run) reuses the personal model: no new spend
    again = handle(EVALUATE, text, state, node(tmp_path))
    assert again.metrics["personal_dice"] == reply.metrics["personal_dice"] and _history(tmp_path) == history
    # the state dir still verifies (the personal spend has its receipt); the cap is spent now
    later = handle(TRAIN, *request(server_round=1), node(tmp_path))
    assert later.status == "refused" and "privacy budget" in later.reason, later.reason


def test_every_training_round_keeps_the_personal_epochs_in_reserve(tmp_path):
    sigma = ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    q, per_round = privacy.sample_rate(N, BATCH), local_steps(N, BATCH, 1)
    rounds_only = privacy.projected_epsilon([], 1.0, q, ROUNDS * per_round, 1e-5, "prv")
    with_personal = privacy.projected_epsilon([], 1.0, q, ROUNDS * per_round + local_steps(N, BATCH, PERSONAL), 1e-5, "prv")
    cap = str((rounds_only + with_personal) / 2)  # the rounds fit, rounds + personal do not
    statuses = []
    for r in range(1, ROUNDS + 1):
        reply = handle(TRAIN, *request(*sigma, server_round=r), node(tmp_path, **{"epsilon-cap": cap}))
        statuses.append(reply.status)
    assert statuses[-1] == "refused" and "keeping 2 personal fine-tuning epoch(s) in reserve" in reply.reason
    statuses = [handle(TRAIN, *request(*sigma, "personalization=none", server_round=r),
                       node(tmp_path / "none", **{"epsilon-cap": cap})).status for r in range(1, ROUNDS + 1)]
    assert statuses == ["ok"] * ROUNDS


def test_what_joining_bought_each_site_by_hand(tmp_path):
    cfg = compose_config(["federation.hospitals=[a,b,c]"])
    report = Report(tmp_path, cfg)
    report.add_evaluation(1, {
        "a": {"dice": 0.70, "personal_dice": 0.80, "trivial_dice": 0.30, "num_examples": 4.0},
        "b": {"dice": 0.60, "personal_dice": 0.55, "trivial_dice": 0.65, "num_examples": 4.0},
        "c": {"dice": 0.90, "trivial_dice": 0.20, "num_examples": 4.0},
    })
    report.add_baselines({"local_only": {"a": {"a": {"dice": 0.75}}, "b": {"b": {"dice": 0.50}},
                                         "c": {"c": {"dice": 0.95}}}, "pooled": {}})  # b's 0.50 <= its rule's 0.65
    report.finish("completed")
    sites = json.loads((tmp_path / "metrics.json").read_text())["sites"]
    per = sites["per_site"]
    assert [per[h]["deployed_model"] for h in "abc"] == ["personalized", "federated", "federated"]
    assert [round(per[h]["gain"], 6) for h in "abc"] == [0.05, 0.10, -0.05]  # 0.80-0.75, 0.60-0.50, 0.90-0.95
    assert sites["worst_site"] == "b" and sites["worst"] == 0.60 and sites["spread"] == pytest.approx(0.30)
    assert sites["no_better_than_trivial"] == ["b"]  # 0.60 <= 0.65
    assert sites["degenerate_baselines"] == ["b"]  # and its local-only baseline too: 0.50 <= 0.65
    summary = (tmp_path / "summary.md").read_text()
    assert "| personalized (final, own site) | 0.800 | 0.550 | - |" in summary
    assert "- a: 0.800 (personalized), local-only 0.750, gain +0.050" in summary
    assert "WARNING: b's deployed model (dice 0.600) is no better than a rule without a model (0.650" in summary
    assert "WARNING: b's local-only baseline (dice 0.500) is no better than the rule without a model" in summary
    assert (tmp_path / "plots" / "gain_from_joining.png").is_file()


@pytest.mark.slow
def test_a_personalized_federation_reports_every_sites_gain(tmp_path):
    cmd = [str(Path(sys.executable).parent / "carefl-sim"), f"output_dir={tmp_path}", "data.image_size=16",
           "data.n_train=24", "data.n_test=6", "model.channels=[4,8,16]", "federation.batch_size=8",
           "federation.rounds=2", "personalization=finetune"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    data = json.loads((run_dir / "metrics.json").read_text())
    final = data["rounds"][-1]["eval"]
    for h, entry in data["sites"]["per_site"].items():
        deployed = max(final[h]["dice"], final[h]["personal_dice"])
        assert entry["deployed"] == deployed
        assert entry["gain"] == pytest.approx(deployed - data["baselines"]["local_only"][h][h]["dice"])
        assert len(list((run_dir / "hospitals" / h / PERSONAL_DIR).glob("*.pt"))) == 1  # kept at the hospital
    assert "what joining bought each hospital" in (run_dir / "summary.md").read_text()
    # the personal receipts in the hospitals' logs are not a round's: the ledger still agrees with every log
    assert verify_receipts(run_dir, sorted(run_dir.glob("hospitals/*/receipts.jsonl"))) == []


def test_fedbn_keeps_each_hospitals_normalisation_at_home(tmp_path):
    from carefl.hospital import norm_keys

    text, state = request("personalization=fedbn", server_round=1)
    reply = handle(TRAIN, text, state, node(tmp_path))
    assert reply.status == "ok"
    norms = norm_keys(build_model(compose_config([*TINY, "personalization=fedbn"])))
    assert norms and all(k.endswith((".weight", ".bias")) for k in norms)
    assert all(torch.equal(reply.state[k], state[k]) for k in norms)  # the received values go back
    assert any(not torch.equal(reply.state[k], state[k]) for k in state if k not in norms)  # the rest trained
    local = torch.load(tmp_path / "state" / PERSONAL_DIR / f"{RUN}.norm.pt", weights_only=True)
    assert set(local) == set(norms) and any(not torch.equal(local[k], state[k]) for k in norms)
    evaluation = handle(EVALUATE, text, state, node(tmp_path))
    assert {"dice", "personal_dice"} <= set(evaluation.metrics) and evaluation.state is None
    text2, _ = request("personalization=fedbn", server_round=2)
    assert handle(TRAIN, text2, reply.state, node(tmp_path)).status == "ok"  # trains on from its own norms
    again = torch.load(tmp_path / "state" / PERSONAL_DIR / f"{RUN}.norm.pt", weights_only=True)
    assert any(not torch.equal(again[k], local[k]) for k in norms)


def test_a_classifier_no_better_than_the_majority_class_is_flagged_on_accuracy(tmp_path):
    report = Report(tmp_path, compose_config(["task=cls2d", "model=classifier", "federation.hospitals=[a,b]"]))
    report.add_evaluation(1, {"a": {"auc": 0.9, "accuracy": 0.62, "trivial_accuracy": 0.70, "num_examples": 10.0},
                              "b": {"auc": 0.8, "accuracy": 0.85, "trivial_accuracy": 0.55, "num_examples": 10.0}})
    report.finish("completed")
    sites = json.loads((tmp_path / "metrics.json").read_text())["sites"]
    assert sites["no_better_than_trivial"] == ["a"]  # a good AUC, but an accuracy below always answering its majority
    assert "WARNING: a's deployed model (accuracy 0.620) is no better than a rule without a model (0.700: the most " \
           "frequent class)" in (tmp_path / "summary.md").read_text()


# ---- Ditto (personalization=ditto): a personal model v trained every round beside the global update ----

DITTO = ["personalization=ditto", "personalization.epochs=1", "personalization.lambda=0.5"]
NO_DP = ["privacy=none"]


def _no_dp_node(path: Path) -> dict:
    return {"hospital": "st-mary", "data-path": "synthetic:0", "state-dir": str(path), "epsilon-cap": "8.0",
            "delta": "1e-5", "require-dp": "false"}


def _seeded(kind: str, text: str, state: dict, node_config: dict):
    """``handle`` with the process-wide RNGs reset first: without DP, a round is then a function of
    the request and the state dir (augmentation draws from them; DP noise would not be)."""
    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    return handle(kind, text, state, node_config)


def test_ditto_sends_the_global_update_only_and_keeps_v_at_home(tmp_path):
    from carefl.ledger import hash_state_dict

    text, state = request(*DITTO, *NO_DP, server_round=1)
    reply = _seeded(TRAIN, text, state, _no_dp_node(tmp_path / "ditto"))
    plain = _seeded(TRAIN, *request(*DITTO[:1], *NO_DP, "personalization=none", server_round=1),
                   _no_dp_node(tmp_path / "none"))
    assert reply.status == plain.status == "ok", reply.reason
    # what is sent: exactly the global update a hospital without Ditto sends (same seed, no DP)
    assert set(reply.state) == set(state) and all(torch.equal(reply.state[k], plain.state[k]) for k in state)
    v = torch.load(tmp_path / "ditto" / PERSONAL_DIR / f"{RUN}.pt", weights_only=True)
    assert any(not torch.equal(v[k], reply.state[k]) for k in state if state[k].is_floating_point())
    assert reply.receipt["update_hash"] == hash_state_dict(reply.state) != hash_state_dict(v)
    # v's hash is signed in the hospital's own log only, under <run>.personal (never a ledger entry)
    own = ReceiptLog(tmp_path / "ditto" / LOG_FILE).receipts()
    assert [(r["run_id"], r["update_hash"] == hash_state_dict(v)) for r in own] == [(RUN + ".personal", True), (RUN, False)]
    evaluation = handle(EVALUATE, text, reply.state, _no_dp_node(tmp_path / "ditto"))
    assert evaluation.state is None and {"dice", "personal_dice"} <= set(evaluation.metrics)
    assert "personal_dice" not in handle(EVALUATE, text, reply.state, _no_dp_node(tmp_path / "none")).metrics


def test_dittos_personal_steps_are_dp_sgd_in_the_same_accountant_and_cap(tmp_path):
    for r in range(1, ROUNDS + 1):
        reply = handle(TRAIN, *request(*DITTO, server_round=r), node(tmp_path))
        assert reply.status == "ok", reply.reason
        history = _history(tmp_path)
        # the reply's epsilon (and its receipt's) is the spend after BOTH steps of the round
        assert reply.metrics["epsilon"] == reply.receipt["epsilon"]
        assert reply.metrics["epsilon"] == pytest.approx(privacy.epsilon(history, 1e-5, "prv"), rel=1e-6)
    q, per_round = privacy.sample_rate(N, BATCH), local_steps(N, BATCH, 1)
    assert {s for s, _, _ in history} == {history[0][0]} and {qq for _, qq, _ in history} == {q}
    assert sum(n for *_, n in history) == ROUNDS * (per_round + local_steps(N, BATCH, 1))  # global + personal
    # the noise plan covers rounds x (local + personal epochs) and meets the target, recomputed independently
    assert _pld_epsilon(history, 1e-5) == pytest.approx(8.0, rel=0.02)
    assert handle(TRAIN, *request(*DITTO, server_round=1), node(tmp_path)).status == "refused"  # the cap is spent


def test_every_ditto_round_checks_its_personal_step_against_the_cap(tmp_path):
    sigma = ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    q, per_round = privacy.sample_rate(N, BATCH), local_steps(N, BATCH, 1)
    global_only = privacy.projected_epsilon([], 1.0, q, per_round, 1e-5, "prv")
    both = privacy.projected_epsilon([], 1.0, q, 2 * per_round, 1e-5, "prv")
    cap = str((global_only + both) / 2)  # the round's global step fits, global + personal does not
    reply = handle(TRAIN, *request(*DITTO, *sigma, server_round=1), node(tmp_path, **{"epsilon-cap": cap}))
    assert reply.status == "refused" and "keeping 1 Ditto personal epoch(s) in reserve" in reply.reason
    assert not (tmp_path / "state" / budget.HISTORY_FILE).exists() and reply.state is None  # nothing spent or sent


def test_dittos_lambda_is_exactly_the_term_added_after_privatisation():
    """Same model v, same batch, zero noise: the personal step with lambda differs from the one
    without by exactly lr * lambda * (v - w_global) (SGD's first step): clipped per-sample
    gradients are untouched, so the pull is post-processing of the private gradient."""
    from torch.utils.data import DataLoader, Subset

    from carefl.data import load_hospital
    from carefl.hospital import make_private
    from carefl.training import make_optimizer, train_epochs

    lam, lr = 0.5, 0.01
    cfg = compose_config([*TINY, *DITTO, "federation.optimizer=sgd", f"federation.lr={lr}"])
    w = build_model(cfg).state_dict()
    torch.manual_seed(1)
    v = {k: t + 0.05 * torch.randn_like(t) if t.is_floating_point() else t for k, t in w.items()}
    batch = Subset(load_hospital(cfg, "st-mary", 0).train, range(BATCH))
    after = []
    for mu in (lam, 0.0):
        model = build_model(cfg)
        model.load_state_dict(v)
        anchor = [w[k].clone() for k, p in model.named_parameters() if p.requires_grad]
        opt = make_optimizer(model, "sgd", lr)
        dp_model, dp_opt, _, _ = make_private(cfg, model, opt, DataLoader(batch, batch_size=BATCH), 1.0, [])
        dp_opt.noise_multiplier = 0.0  # no noise: both steps see the same clipped gradient
        train_epochs(dp_model, dp_opt, DataLoader(batch, batch_size=BATCH, shuffle=False), cfg.task, 1, mu, anchor=anchor)
        after.append({k: p.detach().clone() for k, p in model.named_parameters()})
    for k in after[0]:
        torch.testing.assert_close(after[1][k] - after[0][k], lr * lam * (v[k] - w[k]), rtol=1e-4, atol=1e-7)


_ROUND_2 = """
import sys, numpy, torch
from carefl.hospital import TRAIN, handle
text, state, node = torch.load(sys.argv[1], weights_only=False)
torch.set_num_threads(1)
torch.manual_seed(0)
numpy.random.seed(0)
assert handle(TRAIN, text, state, node).status == "ok"
"""


def test_dittos_personal_model_survives_a_restart(tmp_path):
    import shutil

    first = tmp_path / "first"
    text, state = request(*DITTO, *NO_DP, server_round=1)
    reply = _seeded(TRAIN, text, state, _no_dp_node(first))
    v1 = torch.load(first / PERSONAL_DIR / f"{RUN}.pt", weights_only=True)
    for name in ("restarted", "forgot"):
        shutil.copytree(first, tmp_path / name)
    (tmp_path / "forgot" / PERSONAL_DIR / f"{RUN}.pt").unlink()
    text2, _ = request(*DITTO, *NO_DP, server_round=2)
    # round 2 here, and in a fresh process (a restarted hospital) on a copy of the state dir
    assert _seeded(TRAIN, text2, reply.state, _no_dp_node(first)).status == "ok"
    job = tmp_path / "round2.pt"
    torch.save((text2, reply.state, _no_dp_node(tmp_path / "restarted")), job)
    proc = subprocess.run([sys.executable, "-c", _ROUND_2, str(job)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _seeded(TRAIN, text2, reply.state, _no_dp_node(tmp_path / "forgot")).status == "ok"
    v2, again, fresh = (torch.load(tmp_path / d / PERSONAL_DIR / f"{RUN}.pt", weights_only=True)
                        for d in ("first", "restarted", "forgot"))
    assert any(not torch.equal(v2[k], v1[k]) for k in v1 if v1[k].is_floating_point())
    assert all(torch.equal(v2[k], again[k]) for k in v2)  # the restarted hospital went on from its saved v
    assert any(not torch.equal(v2[k], fresh[k]) for k in v2 if v2[k].is_floating_point())  # not from w_global


def test_a_ditto_hospitals_personal_model_is_the_one_its_receipt_signs(tmp_path):
    """What carefl-predict --personal checks before it uses a personal model: after a ditto
    federation, each hospital's v in its state dir hashes to the update_hash of its own last
    signed receipt for <run>.personal, v is not the federated model, and the receipts still
    agree with the ledger."""
    from carefl.hospital import PERSONAL_SUFFIX
    from carefl.ledger import hash_state_dict, run_id
    from carefl.local_transport import LocalTransport
    from carefl.rounds import run_federation

    cfg = compose_config([*TINY, *DITTO, *NO_DP, f"output_dir={tmp_path}", "run_id=d", "federation.baselines=false"])
    run_dir = run_federation(LocalTransport(3), cfg)
    run, final = run_id(run_dir), torch.load(run_dir / "model_final.pt", weights_only=True)
    for hospital in ("st-mary", "riverside", "northfield"):
        state_dir = run_dir / "hospitals" / hospital
        v = torch.load(state_dir / PERSONAL_DIR / f"{run}.pt", weights_only=True)
        signed = [r["update_hash"] for r in ReceiptLog(state_dir / LOG_FILE).receipts()
                  if r.get("run_id") == run + PERSONAL_SUFFIX]
        assert signed and signed[-1] == hash_state_dict(v)
        assert any(not torch.equal(v[k], final[k]) for k in final)
    assert verify_receipts(run_dir, sorted(run_dir.glob("hospitals/*/receipts.jsonl"))) == []


def test_personal_fine_tuning_trains_at_personalization_lr(tmp_path):
    """personalization.lr reaches the fine-tuning's optimizer: null means federation.lr (the
    same personal model as naming that rate), another rate gives another model."""
    import numpy

    def personal(lr: str, where: str) -> dict:
        text, state = request(*NO_DP, "federation.lr=0.005", f"personalization.lr={lr}", server_round=ROUNDS)
        torch.manual_seed(0)
        numpy.random.seed(0)
        reply = handle(EVALUATE, text, state, node(tmp_path / where, **{"require-dp": "false"}))
        assert reply.status == "ok" and "personal_dice" in reply.metrics, reply.reason
        return torch.load(tmp_path / where / "state" / PERSONAL_DIR / f"{RUN}.pt", weights_only=True)

    default, named, faster = personal("null", "a"), personal("0.005", "b"), personal("0.05", "c")
    assert all(torch.equal(default[k], named[k]) for k in default)
    assert any(not torch.equal(default[k], faster[k]) for k in default if default[k].is_floating_point())
    with pytest.raises(Exception, match="personalization.lr"):
        compose_config([*TINY, "personalization.lr=-1"])


def test_a_local_only_baseline_trains_on_the_hospitals_schedule():
    """Local-only = a hospital's own schedule without the federation: its rounds' epochs at
    federation.lr, then its personal epochs at personalization.lr (same model, same batches)."""
    import numpy

    from carefl.baselines import train_centrally
    from carefl.data import load_hospital
    from carefl.training import make_loader, make_optimizer, train_epochs

    def baseline(personal_lr: float):
        cfg = compose_config([*TINY, *NO_DP, "federation.optimizer=sgd", "federation.lr=0.01",
                              f"personalization.lr={personal_lr}"])
        torch.manual_seed(0)
        numpy.random.seed(0)
        return cfg, train_centrally(cfg, load_hospital(cfg, "st-mary", 0).train, seed=3).state_dict()

    cfg, got = baseline(0.1)
    data = load_hospital(cfg, "st-mary", 0).train
    torch.manual_seed(0)
    numpy.random.seed(0)
    model = build_model(cfg)
    optimizer, loader = make_optimizer(model, "sgd", 0.01), make_loader(data, BATCH, 3)
    train_epochs(model, optimizer, loader, cfg.task, ROUNDS)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    train_epochs(model, optimizer, loader, cfg.task, PERSONAL)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    _, same_rate = baseline(0.01)
    assert any(not torch.equal(got[k], same_rate[k]) for k in got if got[k].is_floating_point())
