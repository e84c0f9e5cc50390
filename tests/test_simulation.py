"""End to end on Flower's simulation engine, through the real entry points.

carefl-sim (Hydra) and `flwr run .` start real Ray-backed simulations of the same
ServerApp/ClientApp; sizes are tiny so the whole file runs in a few minutes.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_ports, process_env

from carefl import privacy
from carefl.config import compose_config
from carefl.data import load_hospital
from carefl.hospital import local_steps
from carefl.ledger import hash_state_dict, verify_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["data.image_size=16", "data.n_train=24", "data.n_test=6", "model.channels=[4,8,16]", "federation.batch_size=8"]

pytestmark = pytest.mark.slow


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def carefl_sim(out: Path, *overrides: str, multirun: bool = False, returncode: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "carefl-sim"), *(["-m"] if multirun else []), f"output_dir={out}", *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_run_directory_holds_config_metrics_models_plots_and_a_valid_ledger(tmp_path):
    proc = carefl_sim(tmp_path, "federation.rounds=2")
    (run,) = _run_dirs(tmp_path)
    log = proc.stdout + proc.stderr
    assert "round 1/2" in log and "round 2/2" in log and "dice" in log  # one progress line per round
    assert (run / "config.yaml").is_file() and (run / "model_final.pt").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("round_*.pt")) == ["round_001.pt", "round_002.pt"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert set(record["train"]) == {"st-mary", "riverside", "northfield"}
        for train in record["train"].values():
            assert train["status"] == "ok" and train["num_examples"] > 0
            assert "train_loss" not in train  # under DP the unnoised loss never leaves the hospital
            assert 0 < train["epsilon"] <= 8.0 + 1e-6 and train["delta"] == 1e-5
        assert all(0 <= e["dice"] <= 1 for e in record["eval"].values())
        assert 0 <= record["aggregate"]["dice"] <= 1
        assert set(record["robust"]["st-mary"]) >= {"norm", "cosine", "score", "selected", "reputation"}
    epsilons = [[r["train"][h]["epsilon"] for r in metrics["rounds"]] for h in metrics["hospitals"]]
    assert all(e[1] > e[0] for e in epsilons)  # privacy spending accumulates across rounds
    baselines = metrics["baselines"]
    assert set(baselines["local_only"]["riverside"]) == {"st-mary", "riverside", "northfield"}
    assert set(baselines["pooled"]) == {"st-mary", "riverside", "northfield"}
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"dice.png", "epsilon.png", "norm.png"}
    summary = (run / "summary.md").read_text()
    assert "| federated (final) |" in summary and "| local-only riverside |" in summary and "pooled" in summary
    assert verify_run(run).ok
    final = torch.load(run / "model_final.pt", weights_only=True)
    assert hash_state_dict(final) == hash_state_dict(torch.load(run / "checkpoints" / "round_002.pt", weights_only=True)["global_model"])


def test_budget_cap_that_runs_out_after_two_rounds_ends_the_run_cleanly(tmp_path):
    """Each hospital's cap lies between its epsilon after 2 and after 3 rounds at a fixed sigma
    (privacy.noise_multiplier: with a target epsilon a hospital would calibrate its noise to its
    cap and train every round): rounds 1-2 train, round 3 is refused by all, the run stops cleanly."""
    overrides = [*TINY, "federation.rounds=4", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    cfg = compose_config(overrides)
    caps = {}
    for i, name in enumerate(cfg.federation.hospitals):
        n = len(load_hospital(cfg, name, i).train)
        sigma = 1.0
        q, steps = privacy.sample_rate(n, 8), local_steps(n, 8, 1)
        eps2, eps3 = (privacy.epsilon([(sigma, q, steps * r)], 1e-5) for r in (2, 3))
        caps[name] = (eps2 + eps3) / 2
    policies = ",".join(f"{h}:{{epsilon-cap:{c:.4f}}}" for h, c in caps.items())
    proc = carefl_sim(tmp_path, *overrides[len(TINY):], f"+federation.site_policies={{{policies}}}",
                      "federation.baselines=false", returncode=1)  # a stopped run is not a success for scripts and CI
    assert "carefl-sim: the run ended stopped" in proc.stderr
    (run,) = _run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and "min_hospitals" in metrics["message"]
    statuses = [{h: t["status"] for h, t in r["train"].items()} for r in metrics["rounds"]]
    assert statuses[:2] == [{h: "ok" for h in caps}] * 2
    assert statuses[2] == {h: "refused" for h in caps} and len(statuses) == 3
    assert all("privacy budget" in t["reason"] for t in metrics["rounds"][2]["train"].values())
    assert all(metrics["rounds"][1]["train"][h]["epsilon"] <= caps[h] for h in caps)
    assert "left out" in proc.stdout + proc.stderr or "privacy budget" in proc.stdout + proc.stderr
    assert verify_run(run).ok  # final model = round 2's, recorded in the ledger


def test_hydra_multirun_sweeps_strategies(tmp_path):
    carefl_sim(tmp_path, "federation.rounds=1", "federation.baselines=false", "privacy=none", "strategy=fedavg,median", multirun=True)
    runs = _run_dirs(tmp_path)
    assert len(runs) == 2
    names = sorted(json.loads(json.dumps(compose_config([f"strategy={s}"]).strategy.rule.name)) for s in ("fedavg", "median"))
    assert sorted((r / "config.yaml").read_text().split("rule:")[1].split("name:")[1].split()[0] for r in runs) == names


def _checkout(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A fresh copy of the project (the first `flwr run` edits pyproject.toml) and its own Flower
    home and local SuperLink ports (Flower's background SuperLink listens on fixed ports whatever
    FLWR_HOME is, so two checkouts would otherwise share one)."""
    app = tmp_path / name
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for file in files:
        if (ROOT / file).is_file():
            (app / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / file, app / file)
    http, control = free_ports(2)
    env = process_env(FLWR_HOME=str(tmp_path / f"flwr-{name}"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
                      FLWR_LOCAL_CONTROL_API_PORT=str(control))
    return app, env


def _stop_local_superlinks(flwr_home: Path) -> None:
    """Stop, by PID, the background SuperLink(s) `flwr run` started with this Flower home."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if "flower-superlink" in cmd and (str(flwr_home) in cmd or env.get("FLWR_HOME") == str(flwr_home)):
            proc.kill()


def test_flwr_run_dot_runs_the_app_from_a_fresh_copy_and_two_checkouts_do_not_mix(tmp_path):
    """The README's `flwr run . --stream` on two copies of the project, one after the other,
    each with its own Flower home and local SuperLink ports: each run lands in its own
    SuperLink (its `flwr ls` lists one run) and writes to its own output directory."""
    runs = {}
    try:
        for name in ("a", "b"):
            app, env = _checkout(tmp_path, name)
            out = tmp_path / f"out-{name}"
            overrides = " ".join([*TINY, "federation.rounds=2", "federation.baselines=false", f"output_dir={out}"])
            proc = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f"overrides='{overrides}'"],
                                  cwd=app, env=env, capture_output=True, text=True, timeout=600)
            log = proc.stdout + proc.stderr
            assert proc.returncode == 0, log[-3000:]
            assert "3 simulated SuperNodes" in log and "round 2/2" in log
            (run,) = _run_dirs(out)
            assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
            listed = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], cwd=app, env=env,
                                    capture_output=True, text=True, timeout=120).stdout
            runs[name] = [r["run-id"] for r in json.loads(listed[listed.index("{"):])["runs"]]
        assert len(runs["a"]) == len(runs["b"]) == 1 and runs["a"] != runs["b"]  # neither saw the other's run
    finally:
        for name in ("a", "b"):
            _stop_local_superlinks(tmp_path / f"flwr-{name}")


def test_secure_aggregation_on_flowers_simulation_engine(tmp_path):
    """secagg=on through real Flower messages (train, train.secagg x3, evaluate per round):
    the ledger shows every hospital summed in one secure bucket and no update norm."""
    proc = carefl_sim(tmp_path, "secagg=on", "federation.rounds=2", "federation.baselines=false")
    (run,) = _run_dirs(tmp_path)
    assert "round 2/2" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    model_bytes = sum(v.numel() * 4 for v in torch.load(run / "model_final.pt", weights_only=True).values())
    for traffic in metrics["rounds"][0]["wire"].values():  # counted from Flower's own messages
        assert model_bytes < traffic["bytes_received"] < 1.3 * model_bytes  # the masked input
        assert traffic["bytes_sent"] > 2 * model_bytes
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    for entry in entries[1:3]:
        (bucket,) = entry["secure_buckets"]
        assert sorted(bucket["survivors"]) == ["northfield", "riverside", "st-mary"] and bucket["failed"] is None
        assert all(rec["accepted"] and rec["norm"] is None for rec in entry["hospitals"].values())
    assert verify_run(run).ok


SPY = r'''
import json, sys
import numpy as np
import server_app.app as app
from carefl.config import compose_config
from server_app.simulate import simulate

seen, raw = [], app._raw


def spy(msg, sent):  # every reply the ServerApp process takes from Flower, as it arrives
    reply = raw(msg, sent)
    record = {"type": msg.metadata.message_type, "arrays": {}}
    for key, view in (reply.arrays or {}).items():
        record["arrays"][key] = [view.dtype, list(view.shape)]
        if key == "masked":
            words = view.load().numpy().view(np.uint32).astype(np.float64) / 2**32
            record["uniform"] = [float(words.mean()), float(words.std())]
    seen.append(record)
    return reply


app._raw = spy
status = simulate(compose_config(sys.argv[1:]))
print("SPY" + json.dumps({"status": status, "seen": seen}))
'''


def test_the_serverapp_process_receives_only_masked_inputs_under_secure_aggregation(tmp_path):
    """What the ServerApp process itself takes from Flower in a secure run (a spy on its reply
    decoding, Flower's simulation engine, real ClientApps in Ray workers): no training reply
    carries weights, no evaluation reply either, and the only arrays are masked inputs that
    look uniform on Z_2^32 (an update's quantised levels would sit near 2^21 / 2^32 ~ 0.0005)."""
    proc = subprocess.run([sys.executable, "-c", SPY, "secagg=on", "federation.rounds=1", "federation.baselines=false",
                           f"output_dir={tmp_path}", *TINY], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("SPY") + 3:].splitlines()[0])
    assert result["status"] == "completed"
    kinds = [r["type"] for r in result["seen"]]
    assert kinds.count("train") == 3 and kinds.count("train.secagg") == 9 and kinds.count("evaluate") == 3
    masked = [r for r in result["seen"] if r["arrays"]]
    assert len(masked) == 3 and all(r["type"] == "train.secagg" and set(r["arrays"]) == {"masked"} for r in masked)
    for r in masked:
        assert r["arrays"]["masked"][0] == "int32"
        mean, std = r["uniform"]
        assert abs(mean - 0.5) < 0.02 and abs(std - 12 ** -0.5) < 0.02
