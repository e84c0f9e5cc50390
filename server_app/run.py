"""``carefl-run``: submit a CareFL run to a SuperLink, follow its log, exit with its outcome.

    carefl-run [SUPERLINK] [Hydra overrides ...]
    carefl-run my-consortium strategy=robust federation.rounds=10
    carefl-run privacy=none            # the default connection of ~/.flwr/config.toml

``flwr run .`` returns as soon as the run is submitted, so a script cannot tell a federation
that completed from one that failed. This wrapper submits with ``flwr run . --format json``,
streams the run's log (``flwr log --stream``), polls ``flwr ls --run-id`` until Flower reports the
run finished, and exits with:

- 0: ``finished:completed`` (every round ran);
- 1: finished otherwise: ``failed`` (an error, or a CareFL federation that stopped early --
  privacy budgets spent, too few hospitals: the ServerApp reports it as a failure with the
  reason) or ``stopped`` (``flwr stop``);
- 2: the run could not be submitted (the flwr error is printed).

It drives Flower's own CLI (its public interface) and adds nothing between the run and the
SuperLink. ``--poll`` sets the seconds between status checks (default 3).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time


def _flwr() -> str:
    path = shutil.which("flwr")
    if path is None:
        sys.exit("carefl-run: the flwr command is not on PATH; activate the environment CareFL is installed in")
    return path


def _status(flwr: str, run_id: str, superlink: list[str]) -> str:
    done = subprocess.run([flwr, "ls", *superlink, "--run-id", run_id, "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    if "{" not in done.stdout:
        return "unknown"
    runs = json.loads(done.stdout[done.stdout.index("{"):]).get("runs", [])
    return str(runs[0]["status"]) if runs else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carefl-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", help="[SUPERLINK] then Hydra overrides (key=value)")
    parser.add_argument("--poll", type=float, default=3.0, help="seconds between status checks")
    parsed = parser.parse_args(argv)
    superlink = parsed.args[:1] if parsed.args and "=" not in parsed.args[0] else []
    overrides = parsed.args[len(superlink):]
    if any("'" in o for o in overrides):
        print("carefl-run: an override may not contain a single quote", file=sys.stderr)
        return 2
    flwr = _flwr()
    submit = subprocess.run([flwr, "run", ".", *superlink, "--format", "json",
                             "--run-config", f"overrides='{' '.join(overrides)}'"],
                            capture_output=True, text=True, timeout=600)
    try:
        run_id = str(json.loads(submit.stdout[submit.stdout.index("{"):])["run-id"])
    except (ValueError, KeyError):
        print(f"carefl-run: the run was not submitted:\n{submit.stdout}{submit.stderr}", file=sys.stderr)
        return 2
    print(f"carefl-run: run {run_id} submitted; following its log", flush=True)
    follow = subprocess.Popen([flwr, "log", run_id, *superlink, "--stream"])
    try:
        status = _status(flwr, run_id, superlink)
        while not status.startswith("finished"):
            time.sleep(parsed.poll)
            status = _status(flwr, run_id, superlink)
        time.sleep(parsed.poll)  # let the stream print the last lines
    finally:
        follow.terminate()
        follow.wait(timeout=30)
    print(f"carefl-run: run {run_id} {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
