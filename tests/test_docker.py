"""The container deployment, end to end, on a real Docker engine (marker `docker`).

What it does, printing the wall time of every phase:

  1. install   apt-get docker.io docker-compose debootstrap (docker/setup_engine.sh install)
  2. engine    a private dockerd: data/exec root and unix socket under a temp dir
  3. base      local/bookworm-python:latest by debootstrap (root fs cached as a tarball in
               $CAREFL_DOCKER_CACHE, default /var/cache/carefl-docker)
  4. wheels    ./wheelhouse on the host (docker/make_wheelhouse.sh): containers never
               reach a package index
  5. build     the server and hospital images through compose.yaml's build sections
  6. federate  `docker-compose up` of compose.yaml with a tiny run (CAREFL_OVERRIDES):
               TLS everywhere, registered hospitals, launcher exits with the run status,
               outputs/<run-id>/metrics.json lands in a host folder
  7. refuse    a SuperNode with a never-registered key is turned away by the SuperLink
  8. cleanup   compose down -v, dockerd stopped by its PID, temp dirs removed

Needs root and apt (the CI machine). CAREFL_SKIP_DOCKER=1 skips it (with that reason).
Knobs: CAREFL_COMPOSE ("docker-compose" | "docker compose"), CAREFL_TEST_OVERRIDES (the
Hydra overrides of the tiny run), CAREFL_DOCKER_TIMEOUT_S (federation deadline, 900),
CAREFL_DOCKER_DIR (keep the engine's data there: cached layers, faster reruns).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "docker" / "setup_engine.sh"
BASE_IMAGE = "local/bookworm-python:latest"
HOSPITALS = ("st-mary", "riverside", "northfield")
TINY_RUN = os.environ.get(
    "CAREFL_TEST_OVERRIDES",
    "federation.rounds=2 federation.baselines=false data.n_train=16 data.n_test=8",
)
TIMEOUT_S = float(os.environ.get("CAREFL_DOCKER_TIMEOUT_S", "900"))


def _precheck() -> None:
    if os.environ.get("CAREFL_SKIP_DOCKER") == "1":
        pytest.skip("CAREFL_SKIP_DOCKER=1: Docker deployment test skipped on request")
    if os.geteuid() != 0:
        pytest.fail(
            "tests/test_docker.py needs root (it installs docker.io/docker-compose/debootstrap "
            "and starts its own dockerd); run as root or set CAREFL_SKIP_DOCKER=1"
        )
    have_tools = all(shutil.which(t) for t in ("dockerd", "docker-compose", "debootstrap"))
    if not have_tools and not shutil.which("apt-get"):
        pytest.fail(
            "no apt-get to install docker.io, docker-compose and debootstrap; install them "
            "by hand or set CAREFL_SKIP_DOCKER=1"
        )


class Phases:
    """Times each phase and prints it at once, past pytest's output capture."""

    def __init__(self, config: pytest.Config) -> None:
        self.capman = config.pluginmanager.getplugin("capturemanager")
        self.times: list[tuple[str, float]] = []
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        if self.capman is None:
            print(f"[docker] {text}", file=sys.stderr, flush=True)
            return
        with self.capman.global_and_fixture_disabled():
            print(f"\n[docker] {text}", file=sys.stderr, flush=True)

    @contextmanager
    def __call__(self, name: str):
        self.say(f"{name} ...")
        start = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.times.append((name, took))
            self.say(f"{name} took {took:.1f} s")

    def summary(self) -> None:
        lines = ", ".join(f"{n} {t:.0f}s" for n, t in self.times)
        self.say(f"phases: {lines} | total {time.monotonic() - self.t0:.0f} s")


def sh(cmd, env=None, check=True, timeout=None, capture=True) -> subprocess.CompletedProcess:
    """Run a command; on failure the error shows the command and its output."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(
        argv, env=env, cwd=REPO, text=True, timeout=timeout,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{(proc.stdout or '')[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def phases(pytestconfig):
    p = Phases(pytestconfig)
    yield p
    p.summary()


@pytest.fixture(scope="module")
def engine(phases):
    """A private dockerd with the local base image; yields the environment to talk to it.

    CAREFL_DOCKER_DIR=<dir> keeps the engine's data there between runs (image layers stay
    cached, so rebuilds take seconds); by default everything lives in a temp dir removed
    at the end.
    """
    _precheck()
    keep = os.environ.get("CAREFL_DOCKER_DIR")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="carefl-docker-"))
    work = Path(tempfile.mkdtemp(prefix="carefl-compose-"))  # certs, keys, outputs
    env = {**os.environ, "DOCKER_HOST": f"unix://{root}/engine/docker.sock",
           "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    try:
        with phases("install"):
            sh([str(SETUP), "install"], capture=False)
        with phases("engine"):
            sh([str(SETUP), "start", str(root / "engine")])
        with phases("base image"):
            sh([str(SETUP), "base-image", str(root / "engine"), BASE_IMAGE], env=env, timeout=900)
        yield env, work
    finally:
        with phases("engine stop"):
            sh([str(SETUP), "stop", str(root / "engine")], check=False)
        with phases("remove temp dirs"):
            shutil.rmtree(work, ignore_errors=True)
            if not keep:
                # overlay mounts are gone once dockerd stopped; leftovers would block rmtree
                mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                          if line.split()[1].startswith(str(root))]
                for m in sorted(mounts, key=len, reverse=True):
                    subprocess.run(["umount", "-l", m], check=False)
                shutil.rmtree(root, ignore_errors=True)


def compose_cmd() -> list[str]:
    return shlex.split(os.environ.get("CAREFL_COMPOSE", "docker-compose"))


@pytest.fixture(scope="module")
def stack(engine, phases):
    """Images built, the consortium up, the launcher finished; torn down afterwards."""
    env, root = engine
    project = f"carefl-test-{os.getpid()}"
    env = {
        **env,
        "CAREFL_BASE_IMAGE": BASE_IMAGE,
        "CAREFL_CERTS_DIR": str(root / "certs"),
        "CAREFL_KEYS_DIR": str(root / "keys"),
        "CAREFL_OUTPUTS": str(root / "outputs"),
        "CAREFL_OVERRIDES": TINY_RUN,
    }
    compose = [*compose_cmd(), "-p", project, "-f", str(REPO / "compose.yaml")]
    (root / "outputs").mkdir()
    try:
        with phases("wheelhouse"):
            sh(["bash", str(REPO / "docker" / "make_wheelhouse.sh")],
               env={**env, "PYTHON": sys.executable}, timeout=1200)
        with phases("build images"):
            sh([*compose, "build", "superlink", "st-mary"], env=env, timeout=1800)
        with phases("federation (compose up -> launcher exit)"):
            sh([*compose, "up", "-d", "--no-build"], env=env, timeout=600)
            launcher = sh([*compose, "ps", "-q", "launcher"], env=env).stdout.strip()
            assert launcher, "compose did not create the launcher container"
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                state = sh(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}",
                            launcher], env=env).stdout.split()
                if state[0] in ("exited", "dead"):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(5)
        logs = sh([*compose, "logs", "--no-color"], env=env, check=False).stdout
        (root / "compose.log").write_text(logs)
        yield {"env": env, "root": root, "compose": compose, "project": project,
               "launcher_state": state, "logs": logs}
    finally:
        with phases("compose down -v"):
            sh([*compose, "down", "-v", "--remove-orphans", "--timeout", "10"], env=env,
               check=False, timeout=300)


def _tail(text: str, n: int = 120) -> str:
    return "\n".join(text.splitlines()[-n:])


def test_federation_runs_to_completion_and_writes_outputs(stack):
    status, code = stack["launcher_state"]
    logs = stack["logs"]
    assert status == "exited", f"launcher still {status} after {TIMEOUT_S:.0f} s\n{_tail(logs)}"
    assert code == "0", f"launcher exited {code}\n{_tail(logs)}"
    assert "status finished:completed" in logs, _tail(logs)
    # The ServerApp names its run directory <output_dir>/<run_id>/ and logs it; output_dir
    # is /outputs in the serverapp container = the host folder CAREFL_OUTPUTS.
    outputs = stack["root"] / "outputs"
    named = re.findall(r"run directory: /outputs/(\S+)", logs)
    found = sorted(outputs.glob("*/metrics.json"))
    assert found, f"no <run>/metrics.json under {outputs}: {sorted(p.name for p in outputs.iterdir())}"
    if named:
        assert (outputs / named[-1] / "metrics.json") in found, (named, found)
    assert all(m.stat().st_size > 0 for m in found)
    # Every hospital took part and kept its privacy-accountant state on its own volume.
    env = stack["env"]
    for hospital in HOSPITALS:
        assert re.search(rf"{hospital}\S*\s+\|.*SuperNode ID", logs), f"{hospital} never connected"
        listing = sh(["docker", "run", "--rm", "--entrypoint", "ls",
                      "-v", f"{stack['project']}_{hospital}-state:/state:ro",
                      "carefl-hospital:latest", "-A", "/state"], env=env).stdout.split()
        assert listing, f"{hospital}: state volume empty (state-dir not used?)"


def test_unregistered_supernode_is_refused(stack, phases):
    env, root = stack["env"], stack["root"]
    with phases("unregistered SuperNode"):
        # A key pair that was never registered, made the way a hospital makes its own.
        sh([sys.executable, str(REPO / "docker" / "gen_certs.py"), "--keys",
            str(root / "rogue"), "--hospitals", "intruder", "--no-tls"])
        key_dir = root / "rogue" / "intruder"
        for p in (key_dir, *key_dir.iterdir()):
            os.chown(p, 49999, 49999)
        # Exactly the remote-hospital `docker run` of docker/README.md, on the consortium net.
        proc = sh(["docker", "run", "--rm", "--init",
                   "--network", f"{stack['project']}_consortium",
                   "-v", f"{root / 'certs' / 'ca.crt'}:/certs/ca.crt:ro",
                   "-v", f"{key_dir}:/keys:ro",
                   "-e", "CAREFL_HOSPITAL=intruder",
                   "carefl-hospital:latest", "supernode"], env=env, check=False, timeout=180)
    assert proc.returncode != 0, f"unregistered SuperNode was not refused:\n{_tail(proc.stdout)}"
    assert "Failed to activate SuperNode" in proc.stdout, _tail(proc.stdout)
    link_logs = sh([*stack["compose"], "logs", "--no-color", "superlink"], env=env).stdout
    assert "No SuperNode found with the given public key" in link_logs, _tail(link_logs, 40)


def test_server_image_compiles_the_robust_kernel(stack):
    """Krum's Gram kernel is JIT-compiled by numba at its first round: check that this works
    in the server image, as its non-root user, against float64."""
    script = (
        "import torch; from carefl.robust.gram import gram; x = torch.randn(7, 300); "
        "err = (gram(x, 64) - x.double() @ x.double().T).abs().max().item(); "
        "assert err < 1e-3, err; print('gram ok', err)"
    )
    out = sh(["docker", "run", "--rm", "--entrypoint", "python", "carefl-server:latest", "-c", script],
             env=stack["env"]).stdout
    assert "gram ok" in out, out


def test_images_hold_no_keys_data_or_build_leftovers(stack):
    """The project copy in the image is code + config only (.dockerignore allow-list)."""
    script = (
        "cd /app && ls -A && test -z \"$(find / -xdev \\( -path /proc -o -path /sys \\) -prune -o "
        "\\( -name '*.key' -o -name 'supernode.pub' -o -name 'ca.crt' \\) -print)\" && id -u"
    )
    out = sh(["docker", "run", "--rm", "--entrypoint", "sh", "carefl-server:latest", "-c", script],
             env=stack["env"]).stdout.split()
    assert out[-1] == "49999", f"image does not run as the non-root app user: {out}"
    leftovers = {"wheelhouse", "outputs", ".git", ".venv", "tests", "benchmarks", ".env"} & set(out)
    assert not leftovers, f"/app holds {leftovers}"
    assert not (set(out) & {"certs", "keys"}), out
    docker_dir = sh(["docker", "run", "--rm", "--entrypoint", "ls", "carefl-server:latest",
                     "-A", "/app/docker"], env=stack["env"], check=False).stdout.split()
    assert not ({"certs", "keys"} & set(docker_dir)), docker_dir
