"""Deployment mode end to end: a real flower-superlink, one flower-supernode per hospital
whose node config carries the hospital's name and data location, a run submitted with
``flwr run``. Real NIfTI data: each hospital's Decathlon datalist lives only on its node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BIN, Deployment

#: training / test images per hospital: different sizes, so the metrics prove whose data was used
SIZES = {"st-mary": (6, 2), "riverside": (4, 3)}


def write_site(directory: Path, n_train: int, n_test: int, seed: int) -> str:
    """A hospital's data dir: 2D NIfTI image/label pairs (20x20) and its datalist JSON."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def pair(i: int) -> dict:
        image = rng.uniform(0, 200, (20, 20)).astype(np.float32)
        label = np.zeros((20, 20), np.float32)
        label[5:12, 6:13] = 1
        image[label > 0] += 150
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(directory / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(directory / f"lbl{i}.nii.gz"))
        return {"image": f"img{i}.nii.gz", "label": f"lbl{i}.nii.gz"}

    entries = [pair(i) for i in range(n_train + n_test)]
    datalist = directory / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:n_train], "test": entries[n_train:]}))
    return str(datalist)


@pytest.mark.slow
def test_deployment_two_rounds_on_each_hospitals_own_nifti_data(deployment: Deployment, tmp_path: Path):
    """Two hospitals train with DP-SGD on their own NIfTI datalists (``data-path``); the third
    one's datalist points outside its data directory (a hostile or broken site): it refuses
    every round with the reason, signed, in the server's records, and the federation
    completes without it. Every hospital's receipt log agrees with the server's ledger."""
    deployment.start_superlink()
    for i, (hospital, (n_train, n_test)) in enumerate(SIZES.items()):
        datalist = write_site(tmp_path / "sites" / hospital, n_train, n_test, seed=i)
        deployment.start_supernode(hospital, data_path=datalist, state_dir=str(tmp_path / "state" / hospital))
    bad = Path(write_site(tmp_path / "sites" / "northfield", 3, 1, seed=9))
    bad.write_text(json.dumps({"training": [{"image": "../st-mary/img0.nii.gz", "label": "../st-mary/lbl0.nii.gz"}]}))
    deployment.start_supernode("northfield", data_path=str(bad), state_dir=str(tmp_path / "state" / "northfield"))

    out = tmp_path / "out"
    run_id = deployment.submit(
        f"federation.rounds=2 data=decathlon data.spatial_size=[32,32] federation.baselines=false "
        f"federation.round_timeout_s=120 output_dir={out} run_id=dep"
    )
    metrics = deployment.wait_for_run(run_id, out / "dep", timeout=400)

    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        # each hospital trained on exactly the images its own node's datalist lists
        trained = {h: m for h, m in record["train"].items() if m["status"] == "ok"}
        assert {h: m["num_examples"] for h, m in trained.items()} == {h: n for h, (n, _) in SIZES.items()}
        assert {h: m["num_examples"] for h, m in record["eval"].items()} == {h: n for h, (_, n) in SIZES.items()}
        assert all(0 < m["epsilon"] <= 8.0 and "train_loss" not in m for m in trained.values())  # DP, no raw loss
        assert record["train"]["northfield"]["status"] == "refused"
        assert "points outside the datalist's directory" in record["train"]["northfield"]["reason"]
    logs = [str(tmp_path / "state" / h / "receipts.jsonl") for h in ("st-mary", "riverside", "northfield")]
    verify = subprocess.run([str(BIN / "carefl-verify"), str(out / "dep"), "--receipts", *logs],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = deployment.log(run_id)
    assert "northfield" in log and "points outside the datalist's directory" in log, log


def _two_demo_hospitals(deployment: Deployment, tmp_path: Path) -> None:
    """A SuperLink and SuperNodes st-mary and riverside on the demo data (synthetic:0 and :1)."""
    deployment.start_superlink()
    for i, hospital in enumerate(("st-mary", "riverside")):
        deployment.start_supernode(hospital, data_path=f"synthetic:{i}", state_dir=str(tmp_path / "state" / hospital))


@pytest.mark.slow
def test_a_run_submitted_with_privacy_none_is_refused_by_every_hospital(deployment: Deployment, tmp_path: Path):
    """A hostile (or careless) submitter asks real SuperNodes to train without DP: each
    hospital's own policy (require-dp defaults to true) refuses, signed; nothing trains and the
    run stops with the reason, so no weights computed without DP ever leave a hospital."""
    _two_demo_hospitals(deployment, tmp_path)
    out = tmp_path / "out"
    run_id = deployment.submit(f"privacy=none federation.hospitals=[st-mary,riverside] federation.rounds=2 "
                               f"data.n_train=16 data.n_test=4 data.image_size=16 federation.baselines=false "
                               f"output_dir={out} run_id=nodp")
    metrics = deployment.wait_for_run(run_id, out / "nodp", timeout=300)
    assert metrics["status"] == "stopped" and "min_hospitals" in metrics["message"]
    (record,) = metrics["rounds"]
    assert {h: t["status"] for h, t in record["train"].items()} == {"st-mary": "refused", "riverside": "refused"}
    assert all("require-dp=true" in t["reason"] for t in record["train"].values())
    assert not any((tmp_path / "state" / h / "privacy_history.json").exists() for h in ("st-mary", "riverside"))


@pytest.mark.slow
def test_flwr_stop_ends_the_run_stopped_with_its_checkpoint_kept(deployment: Deployment, tmp_path: Path):
    """``flwr stop`` in the middle of a run: Flower revokes the ServerApp's token and makes it
    exit; CareFL's exit handler writes status 'stopped' (message: how to resume), keeps the last
    completed round's checkpoint and leaves the ledger open -- intact, not finished."""
    import time

    from carefl.ledger import verify_run

    _two_demo_hospitals(deployment, tmp_path)
    out = tmp_path / "out"
    run_id = deployment.submit(f"federation.rounds=30 data.image_size=16 data.n_train=16 data.n_test=4 "
                               f"federation.hospitals=[st-mary,riverside] federation.baselines=false "
                               f"output_dir={out} run_id=st")
    metrics = out / "st" / "metrics.json"

    def rounds() -> int:
        return len(json.loads(metrics.read_text())["rounds"]) if metrics.is_file() else 0

    deadline = time.monotonic() + 300
    while rounds() < 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert rounds() >= 1, deployment.log(run_id) + deployment.procs.tails()
    stopped = deployment.flwr("stop", run_id, deployment.CONNECTION)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    while json.loads(metrics.read_text())["status"] == "running" and time.monotonic() < deadline:
        time.sleep(1)
    data = json.loads(metrics.read_text())
    assert data["status"] == "stopped" and "flwr stop" in data["message"] and "resume=" in data["message"], data
    assert deployment.status(run_id) == "finished:stopped"
    assert (out / "st" / "checkpoints" / "latest").exists() and not (out / "st" / "model_final.pt").exists()
    result = verify_run(out / "st")
    assert not result.ok and result.first_bad is None, result.reason  # open for resume=, not tampered


@pytest.mark.slow
def test_carefl_run_follows_the_run_and_exits_with_its_outcome(deployment: Deployment, tmp_path: Path):
    """A script can rely on carefl-run: 0 for a completed federation, 1 for one that stopped
    early (here every hospital refuses a run without DP), with the reason in what it printed."""
    _two_demo_hospitals(deployment, tmp_path)
    tiny = ("federation.hospitals=[st-mary,riverside] federation.rounds=1 data.n_train=16 data.n_test=4 "
            "data.image_size=16 federation.baselines=false").split()

    def carefl_run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "carefl-run"), deployment.CONNECTION, *tiny, *overrides, "--poll", "1"],
                              cwd=deployment.project, env=deployment.env, capture_output=True, text=True, timeout=600)

    done = carefl_run(f"output_dir={tmp_path / 'out'}", "run_id=ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished:completed" in done.stdout and "round 1/1" in done.stdout  # the log was followed
    refused = carefl_run(f"output_dir={tmp_path / 'out'}", "run_id=nodp", "privacy=none")
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "finished:failed" in refused.stdout and "the federation ended stopped" in refused.stdout
