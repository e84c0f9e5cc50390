"""Shared fixtures for the process-level tests (deployment, kill and resume).

* :func:`free_ports` - loopback ports nobody listens on right now.
* ``project_copy`` - a copy of the checkout for ``flwr run .`` (its first run comments out
  ``[tool.flwr.federations]`` in pyproject.toml, so it must not touch the real one).
* ``processes`` - starts commands in their own session with their output in log files, and
  at teardown kills every process it started *and their descendants* (Flower's SuperExec
  and the flwr-serverapp / flwr-clientapp it launches, Ray's workers): nothing outlives a test.
* ``deployment`` - a real ``flower-superlink`` and one ``flower-supernode`` per hospital on
  loopback ports, plus ``flwr run`` / ``flwr ls`` / ``flwr log`` against them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: carefl-sim, flwr, flower-superlink, ...
#: the tiny federation every process test runs (seconds per round, not minutes)
TINY = "data.n_train=24 data.n_test=8 data.image_size=32 federation.baselines=false"


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports that are free now (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: the venv first on PATH, no runtime ``uv sync`` of the
    app's dependencies, one BLAS thread per process (2 cores shared by many processes)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        RAY_DEDUP_LOGS="0",
    )
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (psutil walks the ppid tree)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []

def wait_until(condition: Callable[[], object], timeout: float, what: str, on_timeout: Callable[[], str] = str,
               poll: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(poll)


class Processes:
    """Long-running commands of one test; :meth:`stop_all` (always called) kills them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen:
        """Start ``argv`` in a new session; stdout+stderr go to ``<log_dir>/<name>.log``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"process {name} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or process_env(),
                                    cwd=cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 15) -> str:
        """The last ``lines`` of every log, for failure messages."""
        return "\n".join(
            f"---- {name}.log\n" + "\n".join(self.log(name).splitlines()[-lines:]) for name in self.procs
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name``, its descendants and its session's group; reap it."""
        proc = self.procs[name]
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)  # its session (start_new_session: pgid == pid)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def project_copy(tmp_path_factory) -> Path:
    """The checkout's tracked + untracked-not-ignored files, copied (no outputs/, no .venv)."""
    dest = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if rel.startswith("outputs/") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(src.read_bytes())
    return dest


def node_config(**items: str) -> str:
    """``--node-config`` text: ``hospital="st-mary" data-path="/x/y.json"`` (TOML strings)."""
    return " ".join(f'{key.replace("_", "-")}={json.dumps(str(value))}' for key, value in items.items())


class Deployment:
    """A SuperLink and SuperNodes on loopback, driven with the ``flwr`` CLI (connection ``carefl-test``)."""

    CONNECTION = "carefl-test"

    def __init__(self, procs: Processes, root: Path, project: Path):
        self.procs, self.root, self.project = procs, root, project
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = process_env(FLWR_HOME=str(self.flwr_home))
        (self.port,) = free_ports(1)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start_superlink(self) -> None:
        """``flower-superlink`` serving its Fleet, Control and Runtime HTTP APIs on one port."""
        self.procs.start("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ], env=self.env)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 60, "the SuperLink to listen", self.procs.tails)

    def start_supernode(self, hospital: str, **config: str) -> str:
        """One ``flower-supernode`` for ``hospital`` (node config ``hospital`` + ``config``, with
        the demo budget ``epsilon-cap=8 delta=1e-5`` unless ``config`` sets its own: a real
        SuperNode must set both); returns its process name. Waits until it has registered."""
        config = {"epsilon_cap": "8.0", "delta": "1e-5", **config}
        name = f"supernode-{hospital}"
        (runtime_port,) = free_ports(1)
        self.procs.start(name, [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(runtime_port),
            "--node-config", node_config(hospital=hospital, **config),
        ], env=self.env)
        registrations = self.procs.log(name).count("SuperNode ID:")
        wait_until(lambda: self.procs.log(name).count("SuperNode ID:") > registrations, 60,
                   f"{name} to register", self.procs.tails)
        return name

    def start_synthetic_hospitals(self, hospitals: list[str], state_root: Path) -> None:
        """The SuperLink, then one SuperNode per hospital on demo site i, state in state_root/<name>."""
        self.start_superlink()
        for i, hospital in enumerate(hospitals):
            self.start_supernode(hospital, data_path=f"synthetic:{i}", state_dir=str(state_root / hospital))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, overrides: str) -> str:
        """``flwr run . carefl-test --run-config "overrides='...'"``; returns the run id."""
        done = self.flwr("run", ".", self.CONNECTION, "--format", "json",
                         "--run-config", f"overrides='{overrides}'", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return str(json.loads(done.stdout[done.stdout.index("{"):])["run-id"])

    def status(self, run_id: str) -> str:
        """Flower's run status, e.g. ``running`` or ``finished:completed``."""
        done = self.flwr("ls", self.CONNECTION, "--run-id", run_id, "--format", "json")
        runs = json.loads(done.stdout[done.stdout.index("{"):]).get("runs", []) if "{" in done.stdout else []
        return runs[0]["status"] if runs else f"unknown ({done.stdout.strip()[-200:]} {done.stderr.strip()[-200:]})"

    def log(self, run_id: str) -> str:
        """The run's ServerApp log, as ``flwr log --show`` prints it."""
        return self.flwr("log", run_id, self.CONNECTION, "--show").stdout

    def wait_for_run(self, run_id: str, run_dir: Path, timeout: float) -> dict:
        """Wait until the run's ``metrics.json`` says it ended and Flower reports the run
        finished (only then is the ledger's end entry, written after metrics.json, certainly
        there); return the metrics. Fails early, with the ServerApp log, when Flower reports the
        run finished without them."""
        metrics, checked = run_dir / "metrics.json", [time.monotonic()]

        def ended():
            if metrics.is_file() and (data := json.loads(metrics.read_text()))["status"] != "running":
                return data if self.status(run_id).startswith("finished") else None
            if time.monotonic() - checked[0] > 20:  # `flwr ls` costs ~1 s of CPU: not every poll
                checked[0] = time.monotonic()
                status = self.status(run_id)
                if status.startswith("finished") and not (metrics.is_file() and
                                                          json.loads(metrics.read_text())["status"] != "running"):
                    pytest.fail(f"run {run_id} {status} without finishing metrics.json\n{self.log(run_id)}")
            return None

        return wait_until(ended, timeout, f"run {run_id} to finish", lambda: self.log(run_id) + self.procs.tails())


@pytest.fixture
def deployment(processes: Processes, tmp_path: Path, project_copy: Path) -> Deployment:
    return Deployment(processes, tmp_path, project_copy)
