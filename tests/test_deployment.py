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


# ------------------------------------------------ the README's deployment recipe, as written

def readme_recipe() -> list[str]:
    """The indented command blocks of README.md's "Deployment" section, in order, with each
    backslash-continued line joined."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Deployment: real SuperLink and SuperNodes"):]
    section = section[:section.index("\n## ", 10)]
    blocks, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("    "):
            current.append(line[4:])
        elif current:  # the prose after a block ends it
            blocks.append("\n".join(current).replace("\\\n", " "))
            current = []
    return blocks


def tls_files(directory: Path) -> None:
    """``ca.crt``, and ``server.pem``/``server.key`` signed by it for 127.0.0.1 and localhost
    (``cryptography``), the three files the README's SuperLink command names."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, names=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("CareFL test CA", ca_key, "CareFL test CA", ca_key, True)
    server = cert("127.0.0.1", server_key, "CareFL test CA", ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def swap(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; fails if the README no longer says ``old``."""
    assert old in text, f"the README's deployment recipe no longer contains {old!r}: update this test with it"
    return text.replace(old, new)


@pytest.mark.slow
def test_the_readme_deployment_recipe_runs_as_written_with_tls(processes, tmp_path: Path, project_copy: Path):
    """README "Deployment", command by command, TLS included: the SuperLink with the CA and
    server certificate, three hospitals that each run carefl-keygen and flower-supernode with
    --root-certificates, their own port and the README's node config (epsilon-cap=6.0 below the
    run's 8), the connection block written to ~/.flwr/config.toml, carefl-run, then
    carefl-verify --receipts. The only changes are where things are on this machine (the
    loopback address, free ports, temporary paths, each hospital's name and data), each one
    checked to be in the README, plus a run directory and 32x32 images for the submission."""
    import shlex
    import socket

    from conftest import free_ports, process_env, wait_until

    superlink_cmd, hospital_cmds, connection, submit_cmd, *_rest = readme_recipe()
    verify_cmd = next(b for b in _rest if b.startswith("carefl-verify"))
    tls = tmp_path / "tls"
    tls.mkdir()
    tls_files(tls)
    port, *node_ports = free_ports(4)
    env = process_env(FLWR_HOME=str(tmp_path / "flwr-home"))  # ~/.flwr of the person who submits

    command = swap(swap(superlink_cmd, "--host 0.0.0.0", "--host 127.0.0.1"), "--port 9092", f"--port {port}")
    processes.start("superlink", shlex.split(command), env=env, cwd=tls)  # ca.crt etc. by the README's names

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60, "the SuperLink to listen", processes.tails)

    keygen_line, supernode_line = hospital_cmds.splitlines()
    keygen_line = keygen_line.split("#")[0].strip()
    keys = {}
    for i, (hospital, node_port) in enumerate(zip(("st-mary", "riverside", "northfield"), node_ports)):
        state = tmp_path / "state" / hospital
        keygen = subprocess.run(shlex.split(swap(keygen_line, "/var/lib/carefl", str(state))), env=env,
                                capture_output=True, text=True, timeout=120)
        assert keygen.returncode == 0, keygen.stdout + keygen.stderr
        keys[hospital] = keygen.stdout.split()[0]  # the key, then how to register it
        datalist = write_site(tmp_path / "sites" / hospital, 6, 2, seed=i)
        line = swap(supernode_line, "consortium.example.org:9092", f"127.0.0.1:{port}")
        line = swap(swap(line, "--port 9094", f"--port {node_port}"), 'hospital="st-mary"', f'hospital="{hospital}"')
        line = swap(swap(line, "/data/datalist.json", datalist), "/var/lib/carefl", str(state))
        name = f"supernode-{hospital}"
        processes.start(name, shlex.split(line), env=env, cwd=tls)
        wait_until(lambda: "SuperNode ID:" in processes.log(name) or processes.procs[name].poll() is not None, 90,
                   f"{name} to register", processes.tails)
        assert processes.procs[name].poll() is None, processes.tails()

    config = swap(swap(connection, "consortium.example.org:9092", f"127.0.0.1:{port}"),
                  "/path/to/ca.crt", str(tls / "ca.crt"))
    (tmp_path / "flwr-home").mkdir(exist_ok=True)
    (tmp_path / "flwr-home" / "config.toml").write_text(config + "\n")

    out = tmp_path / "out"
    submit = shlex.split(submit_cmd.split("#")[0]) + [
        f"output_dir={out}", "run_id=readme", "data.spatial_size=[32,32]",
        *(f'+federation.hospital_keys.{h}="{k}"' for h, k in keys.items())]  # "register" the printed keys
    done = subprocess.run(submit, env=env, cwd=project_copy, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + processes.tails(30)
    assert "finished:completed" in done.stdout

    metrics = json.loads((out / "readme" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 5
    for record in metrics["rounds"]:  # every hospital trains every round, within its own cap of 6
        assert {h: t["status"] for h, t in record["train"].items()} == dict.fromkeys(keys, "ok")
        assert all(0 < t["epsilon"] <= 6.0 + 1e-6 for t in record["train"].values())
    assert all(t["epsilon"] > 5.0 for t in metrics["rounds"][-1]["train"].values())  # the cap is used, not wasted

    for hospital in keys:
        command = swap(swap(verify_cmd, "outputs/<run-id>", str(out / "readme")),
                       "/var/lib/carefl", str(tmp_path / "state" / hospital))
        verify = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
