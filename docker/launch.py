"""Talk to a CareFL SuperLink with the Flower CLI: register hospitals, submit and follow a run.

Used by the `register`, `launch` and `flwr` roles of docker/entrypoint.sh; every step is a
plain `flwr` command, printed before it runs, so an operator can repeat it by hand. The
SuperLink's Control API is reachable only on the consortium's `control` network.

    python launch.py register        register every public key in $CAREFL_PUBKEYS_DIR
    python launch.py run             wait for the hospitals, sign and publish the app
                                     (app_registry.py publish), `flwr run @<app>==<version>
                                     --stream`, check the run's final status
    python launch.py flwr ARGS...    any `flwr` command against the SuperLink (connection
                                     `consortium`), e.g. `flwr ls consortium`

Hospitals run only app bundles signed by a key in their trusted-entities.yaml, so the run
is submitted by name from the consortium's app registry (docker/app_registry.py), never
from a folder: a folder's bundle carries no signature in Flower 1.41.

Environment
    CAREFL_SUPERLINK     host:port of the SuperLink (default superlink:8000)
    CAREFL_CA_CERT       CA certificate that signed the SuperLink's (default /certs/ca.crt)
    CAREFL_PUBKEYS_DIR   folder of <hospital>.pub files (default /certs/supernodes)
    CAREFL_APP           the Flower app to sign and submit (default /app)
    CAREFL_APP_SPEC      submit this published app (@publisher/app==x.y.z) instead of
                         signing $CAREFL_APP (the signing key then need not be here)
    CAREFL_SIGNING_KEY, CAREFL_APPS_DIR   see app_registry.py
    CAREFL_OUTPUT_DIR    output_dir as seen by the ServerApp runtime (default /outputs)
    CAREFL_OVERRIDES     extra Hydra overrides, space-separated (e.g. "federation.rounds=2")
    CAREFL_MIN_NODES     hospitals that must be online before submitting (default 3)
    CAREFL_WAIT_S        how long to wait for them (default 600)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_registry  # noqa: E402  (sits next to this file)

CONNECTION = "consortium"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "") or default


def write_cli_config() -> None:
    """Write the `flwr` CLI connection `consortium` into $FLWR_HOME/config.toml."""
    home = Path(_env("FLWR_HOME", "/tmp/flwr-cli"))
    os.environ["FLWR_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{_env("CAREFL_SUPERLINK", "superlink:8000")}"\n'
        f'root-certificates = "{_env("CAREFL_CA_CERT", "/certs/ca.crt")}"\n',
        encoding="utf-8",
    )


def flwr_json(*args: str) -> dict:
    """Run `flwr ... --format json` and return its JSON answer (flwr exits 0 on errors)."""
    cmd = ["flwr", *args, "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    match = re.search(r"\{.*\}", proc.stdout, re.S)
    if not match:
        raise RuntimeError(f"{' '.join(cmd)}: no JSON answer\n{proc.stdout}{proc.stderr}")
    return json.loads(match.group(0))


def register() -> None:
    keys_dir = Path(_env("CAREFL_PUBKEYS_DIR", "/certs/supernodes"))
    keys = sorted(keys_dir.glob("*.pub"))
    if not keys:
        sys.exit(f"register: no *.pub files in {keys_dir}")
    for key in keys:
        print(f"register: flwr supernode register {key} {CONNECTION} --name {key.stem}", flush=True)
        for attempt in range(60):  # the SuperLink may still be starting
            try:
                answer = flwr_json("supernode", "register", str(key), CONNECTION, "--name", key.stem)
            except RuntimeError as err:
                answer = {"success": False, "error-message": str(err)}
            if answer.get("success"):
                print(f"register: {key.stem} -> node {answer.get('node-id')}", flush=True)
                break
            error = str(answer.get("error-message", answer))
            if "already in use" in error:
                print(f"register: {key.stem} already registered", flush=True)
                break
            if attempt == 59:
                sys.exit(f"register: {key.stem} failed: {error}")
            time.sleep(2)


def online_nodes() -> int:
    answer = flwr_json("supernode", "list", CONNECTION)
    return sum(1 for node in answer.get("nodes", []) if node.get("status") == "online")


def run() -> None:
    min_nodes = int(_env("CAREFL_MIN_NODES", "3"))
    deadline = time.monotonic() + float(_env("CAREFL_WAIT_S", "600"))
    seen = -1
    while True:
        try:
            online = online_nodes()
        except (RuntimeError, json.JSONDecodeError) as err:
            online, err_text = 0, str(err).splitlines()[-1:]
            print(f"launch: SuperLink not answering yet ({err_text})", flush=True)
        if online != seen:
            print(f"launch: {online}/{min_nodes} hospitals online", flush=True)
            seen = online
        if online >= min_nodes:
            break
        if time.monotonic() > deadline:
            sys.exit(f"launch: only {online}/{min_nodes} hospitals came online in time")
        time.sleep(2)

    overrides = _env("CAREFL_OVERRIDES", "").strip()
    if "'" in overrides:
        sys.exit("launch: CAREFL_OVERRIDES must not contain single quotes")
    if not re.search(r"(^|\s)output_dir=", overrides):
        overrides = f"output_dir={_env('CAREFL_OUTPUT_DIR', '/outputs')} {overrides}".strip()
    spec = _env("CAREFL_APP_SPEC", "")
    if not spec:
        spec = app_registry.publish(Path(_env("CAREFL_APP", "/app")),
                                    Path(_env("CAREFL_SIGNING_KEY", "/keys/app-signing.key")),
                                    Path(_env("CAREFL_APPS_DIR", "/apps")))
    cmd = ["flwr", "run", spec, CONNECTION, "--stream",
           "--run-config", f"overrides='{overrides}'"]
    print("launch: " + " ".join(cmd[:5]) + f' --run-config "{cmd[6]}"', flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = run_dir = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if run_id is None and (m := re.search(r"started run (\d+)", line)):
            run_id = m.group(1)
        if run_dir is None and (m := re.search(r"run directory: (\S+)", line)):
            run_dir = m.group(1)
    if proc.wait() != 0 or run_id is None:
        sys.exit(f"launch: flwr run failed (exit {proc.returncode})")

    status = "unknown"
    for _ in range(30):  # the run's final status lands a moment after the last log line
        runs = flwr_json("list", CONNECTION, "--run-id", run_id).get("runs", [])
        status = runs[0].get("status", "unknown") if runs else "unknown"
        if status.startswith("finished"):
            break
        time.sleep(2)
    print(f"launch: Flower run {run_id} status {status}", flush=True)
    if run_dir:
        print(f"launch: results in {run_dir} (in the serverapp container; /outputs is the "
              "host folder CAREFL_OUTPUTS, default ./outputs)", flush=True)
    if status != "finished:completed":
        sys.exit(1)


def main() -> None:
    write_cli_config()
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "register":
        register()
    elif command == "run":
        run()
    elif command == "flwr":
        os.execvp("flwr", ["flwr", *sys.argv[2:]])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
