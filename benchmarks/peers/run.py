"""CareFL next to its peers, NVIDIA FLARE and Flower's own MONAI example, on the same federation.

    .venv/bin/python benchmarks/peers/run.py --tiny                 # smoke: 2 rounds, 16 32x32 images
    .venv/bin/python benchmarks/peers/run.py --repeat 2             # conf/ defaults, 3 hospitals
    .venv/bin/python benchmarks/peers/run.py --hospitals 10,30 --privacy none --repeat 1

One federation, three systems, each run as its own process tree with one torch/BLAS thread per
process:

- ``carefl``: ``carefl-sim`` (Flower's simulation engine under CareFL's round loop; one Ray
  worker per core, so two hospitals train at a time);
- ``flower``: ``flower_peer.py``, a ServerApp/ClientApp pair in the style of Flower's
  quickstart-monai and Opacus examples, on the same simulation engine and workers, in its own venv;
- ``nvflare``: ``nvflare_peer.py``, NVFlare's PyTorch ``FedAvgRecipe`` on ``SimEnv`` with a
  Client API script (``nvflare_client.py``), one process per site, in its own venv.

The same federation: CareFL's synthetic consortium (``carefl.data.synthetic``, conf/data
defaults) is rendered once into one ``<hospital>.npz`` per hospital, which the peers read; CareFL
renders the same tensors in-process (same function, same config and seed: bitwise identical). Same MONAI UNet
(conf/model/unet.yaml; the peers' ``task.build_unet`` must load CareFL's initial weights with
``strict=True``) from the same initial weights, Adam at conf/federation's lr, batch size, local
epochs and rounds, FedAvg weighted by training examples, every hospital evaluated every round.
``--privacy dp``: Opacus DP-SGD at the same sigma, C and Poisson rate q = 1/ceil(N/B) (CareFL with
its default bk engine; the peers with Opacus' hooks, a PrivacyEngine made every round).

Measured per run (repeats interleaved: the systems' order rotates every repeat):
wall and CPU time of the whole process tree (s), round 1 and the median later round (s), local
compute per round (sum over hospitals of train + evaluate seconds, as each system's hospital
code times itself), framework overhead = round - compute / workers (workers = min(2 cores, hospitals)),
peak RSS of the server process and of the largest hospital process, peak PSS of the tree (MiB,
psutil samples every 0.2 s, so short peaks can be missed), final Dice: the final global model of
each system evaluated here on every hospital's test split (MONAI DiceMetric, same code for all).
Ratios are to CareFL in the same repeat, medians over repeats. Load (os.getloadavg) is recorded
before and after each run. Writes JSON (default benchmarks/results/peers.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import task  # noqa: E402  (the peers' hospital code: evaluates every system's final model here)

VENVS = Path(os.environ.get("PEERS_VENVS", HERE / ".venvs"))
PEERS = ("flower", "nvflare")
TINY = {"data.n_train": 16, "data.n_test": 8, "data.image_size": 32, "federation.rounds": 2}
DEFAULT_NAMES = ["st-mary", "riverside", "northfield"]  # conf/federation/default.yaml
CAREFL_SRC = [ROOT]  # the CareFL source tree that is measured (--carefl-rev replaces it)


def carefl_source(rev: str | None, work: Path) -> dict:
    """Use this checkout's CareFL, or with ``rev`` a ``git archive`` of that revision (the
    checkout may hold someone's unfinished edits); put it first on ``sys.path``. Returns
    ``{"commit", "dirty" (uncommitted edits in CareFL's code or conf/), "path"}``."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    if rev:
        CAREFL_SRC[0] = work / "carefl-src"
        CAREFL_SRC[0].mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(CAREFL_SRC[0])], input=archive, check=True)
    sys.path.insert(0, str(CAREFL_SRC[0]))
    dirty = not rev and bool(git("status", "--porcelain", "--", "carefl", "server_app", "client_app", "conf").strip())
    return {"commit": git("rev-parse", rev or "HEAD").strip(), "dirty": dirty, "path": str(CAREFL_SRC[0])}


# ---- the federation, written once ---------------------------------------------------------


def carefl_overrides(n: int, tiny: bool, privacy: str, sigma: float, clip: float) -> list[str]:
    """carefl-sim overrides for ``n`` hospitals (the first three keep their default names)."""
    names = DEFAULT_NAMES if n == 3 else [f"h{i:02d}" for i in range(n)]
    out = [f"federation.hospitals=[{','.join(names)}]", "federation.baselines=false"]
    out += [f"{k}={v}" for k, v in (TINY.items() if tiny else ())]
    if privacy == "none":
        return out + ["privacy=none"]
    return out + ["privacy=dp", f"privacy.noise_multiplier={sigma}", f"privacy.max_grad_norm={clip}"]


def write_federation(data_dir: Path, overrides: list[str]) -> dict:
    """Render CareFL's consortium into ``<hospital>.npz`` files, ``init.pt`` (CareFL's initial
    weights) and ``spec.json`` (the recipe the peers follow); returns the spec."""
    from carefl.config import compose_config
    from carefl.data.synthetic import load_synthetic
    from carefl.models import build_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config(overrides), resolve=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(cfg["federation"]["hospitals"]):
        train, test = load_synthetic(cfg["data"], cfg["task"], int(cfg["seed"]), i)
        np.savez(data_dir / f"{name}.npz", train_images=train.tensors[0].numpy(), train_labels=train.tensors[1].numpy(),
                 test_images=test.tensors[0].numpy(), test_labels=test.tensors[1].numpy())
    init = build_model(cfg).state_dict()
    torch.save(init, data_dir / "init.pt")
    fed, model, privacy = cfg["federation"], cfg["model"], cfg["privacy"]
    spec = {"hospitals": fed["hospitals"], "rounds": fed["rounds"], "lr": fed["lr"], "batch_size": fed["batch_size"],
            "local_epochs": fed["local_epochs"], "optimizer": fed["optimizer"],
            "model_bytes": sum(v.numel() * v.element_size() for v in init.values()),  # one copy of the weights
            **{k: model[k] for k in ("channels", "strides", "num_res_units", "norm_groups")},
            "dp": ({"noise_multiplier": privacy["noise_multiplier"], "max_grad_norm": privacy["max_grad_norm"]}
                   if privacy.get("enabled") else None)}
    if spec["optimizer"] != "adam":
        raise SystemExit(f"the peers train with Adam; federation.optimizer={spec['optimizer']}")
    task.build_unet(spec).load_state_dict(init, strict=True)  # same layers and shapes, or this raises
    (data_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


# ---- one run, measured from outside ---------------------------------------------------------


def launch(cmd: list[str], env: dict, log: Path, timeout_s: float, cwd: Path) -> dict:
    """Run ``cmd`` and sample its process tree every 0.2 s: wall (s), CPU of the tree (s), peak
    PSS of the tree and peak RSS per pid (bytes), each pid's parent and command lines."""
    start, load_before, cpu_before = time.perf_counter(), os.getloadavg(), children_cpu_s()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, dict] = {}
    peak_pss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_pss
        while not stop.wait(0.2):
            try:
                root = psutil.Process(proc.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss = 0
            for p in procs:
                try:
                    with p.oneshot():
                        mem, cpu = p.memory_full_info(), p.cpu_times()
                        rec = seen.setdefault(p.pid, {"rss": 0, "ppid": p.ppid(), "cmds": set()})
                        rec["cmds"].add(" ".join(p.cmdline())[:300])  # Ray renames its workers as they go
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rec["rss"] = max(rec["rss"], mem.rss)
                rec["cpu"] = cpu.user + cpu.system
                pss += mem.pss
            peak_pss = max(peak_pss, pss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # our own session: the run's whole tree, nothing else
        rc = "timeout"
    stop.set()
    thread.join()
    for pid in seen:  # what the run left behind (Ray, simulator daemons): stopped by PID
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    wall = time.perf_counter() - start
    cpu_reaped = children_cpu_s() - cpu_before
    return {"rc": rc, "wall_s": wall, "cpu_s": max(cpu_reaped, sum(r.get("cpu", 0.0) for r in seen.values())),
            "peak_pss_bytes": peak_pss, "procs": seen, "load_before": load_before, "load_after": os.getloadavg()}


def children_cpu_s() -> float:
    """CPU seconds (user + system) of all reaped descendants of this process so far; with the
    sampled per-process times it catches processes that lived less than one sample period."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_system(system: str, data_dir: Path, run_dir: Path, overrides: list[str], timeout_s: float) -> dict:
    """Run one system on the federation in ``data_dir``; its files go to ``run_dir``."""
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "RAY_DEDUP_LOGS": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    # Flower: its own home and local SuperLink ports, so nothing of another user's is reached
    # (run_simulation starts no SuperLink; any flower-superlink left is stopped by PID in launch).
    http, control = free_ports(2)
    env.update(FLWR_HOME=str(run_dir / "flwr-home"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
               FLWR_LOCAL_CONTROL_API_PORT=str(control), NVFLARE_SIMULATOR_WORKSPACE_ROOT=str(run_dir / "workspace"))
    # task.py for the peers' processes (CareFL stays out of their venvs); CareFL: the tree measured
    env["PYTHONPATH"] = os.pathsep.join([str(CAREFL_SRC[0]), str(HERE)] if system == "carefl" else [str(HERE)])
    if system == "carefl":
        cmd = [str(ROOT / ".venv/bin/carefl-sim"), *overrides, f"output_dir={run_dir}", "run_id=carefl"]
    else:
        cmd = [str(VENVS / system / "bin/python"), str(HERE / f"{system}_peer.py"), str(data_dir), str(run_dir)]
    # cwd: Ray puts the driver's working directory first on its workers' sys.path
    result = launch(cmd, env, run_dir / "log.txt", timeout_s, CAREFL_SRC[0] if system == "carefl" else run_dir)
    if result["rc"] != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{system} exited {result['rc']}; log {run_dir / 'log.txt'} ends:\n{tail}")
    rounds, final = (carefl_rounds if system == "carefl" else peer_rounds)(system, run_dir)
    return {**result, **rounds, "final_dice": final_dice(final, data_dir)}


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def carefl_rounds(_system: str, run_dir: Path) -> tuple[dict, Path]:
    """Per-round wall and local compute (s) from CareFL's metrics.json; the final model's path."""
    metrics = json.loads((run_dir / "carefl" / "metrics.json").read_text())
    if metrics["status"] != "completed":
        raise RuntimeError(f"carefl ended {metrics['status']}: {metrics.get('message')}")
    rounds = [{"round_s": r["timing"]["round_seconds"],
               "compute_s": sum(m.get("train_seconds", 0.0) for m in r["train"].values())
               + sum(m.get("eval_seconds", 0.0) for m in r["eval"].values()),
               "dice": r["aggregate"].get("dice")} for r in metrics["rounds"]]
    eps = [m["epsilon"] for m in metrics["rounds"][-1]["train"].values() if m.get("epsilon") is not None]
    return {"rounds": rounds, "hospital_pids": None, "epsilon": max(eps, default=None)}, \
        run_dir / "carefl" / "model_final.pt"


def peer_rounds(system: str, run_dir: Path) -> tuple[dict, Path]:
    """Per-round wall and local compute (s) from the peer's own records; the final model's path.

    Flower: round r ends when the ServerApp's ``evaluate_fn`` is called after it. NVFlare: round
    r starts when its first hospital receives the global model (``received_at``) and the last
    round ends when the final global model file is written (its mtime)."""
    lines = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    n_rounds = max(rec["round"] for rec in lines)
    compute = [sum(rec.get("train_seconds", 0.0) + rec.get("eval_seconds", 0.0) for rec in lines if rec["round"] == r)
               for r in range(1, n_rounds + 1)]
    if system == "flower":
        ends = json.loads((run_dir / "server.json").read_text())["round_ends_s"]
        round_s = list(np.diff(ends))
    else:
        starts = [min(rec["received_at"] for rec in lines if rec["round"] == r) for r in range(1, n_rounds + 1)]
        (final,) = (run_dir / "workspace").rglob("FL_global_model.pt")
        round_s = list(np.diff([*starts, final.stat().st_mtime]))
    rounds = [{"round_s": float(w), "compute_s": c} for w, c in zip(round_s, compute)]
    eps = [rec["epsilon"] for rec in lines if rec["round"] == n_rounds and "epsilon" in rec]
    return {"rounds": rounds, "hospital_pids": sorted({rec["pid"] for rec in lines}), "epsilon": max(eps, default=None)}, \
        run_dir / "final.pt"


def final_dice(model_path: Path, data_dir: Path) -> dict[str, float]:
    """Dice of a final global model on every hospital's test split, by the same code for all."""
    spec = task.read_spec(data_dir)
    model = task.build_unet(spec)
    model.load_state_dict(torch.load(model_path, weights_only=False), strict=True)
    return {h: task.evaluate(model, task.load_site(data_dir, h)[1])["dice"] for h in spec["hospitals"]}


def summarise(system: str, run: dict, n: int) -> dict:
    """The table's figures of one run (seconds, MiB, Dice).

    Server process: the launched one for CareFL and Flower (the ServerApp runs in the process
    that calls ``run_simulation``), the simulator process that spawns the sites for NVFlare.
    Hospital processes: Ray's ``ClientAppActor`` workers (CareFL), the pids the peers' hospital
    code logged (Flower, NVFlare)."""
    procs = run["procs"]
    hospitals = run["hospital_pids"] or [p for p, r in procs.items() if any(c.startswith("ray::ClientAppActor") for c in r["cmds"])]
    if system == "nvflare":
        server = statistics.mode(procs[p]["ppid"] for p in hospitals if p in procs)
    else:
        server = next(iter(procs))  # the first process sampled is the launched one
    later = run["rounds"][1:] or run["rounds"]
    workers, mib = min(2, n), 2**20
    return {
        "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "round1_s": run["rounds"][0]["round_s"],
        "round_s": statistics.median(r["round_s"] for r in later),
        "compute_s": statistics.median(r["compute_s"] for r in later),
        "overhead_s": statistics.median(r["round_s"] - r["compute_s"] / workers for r in later),
        "server_rss_mib": procs[server]["rss"] / mib,
        "hospital_rss_mib": max(procs[p]["rss"] for p in hospitals if p in procs) / mib,
        "tree_pss_mib": run["peak_pss_bytes"] / mib,
        "dice": float(np.mean(list(run["final_dice"].values()))),
        "epsilon": run["epsilon"],
        "load": [run["load_before"][0], run["load_after"][0]],
    }


# ---- the comparison -------------------------------------------------------------------------


def build_peers(names: list[str]) -> dict[str, str | None]:
    """Build each peer's venv (setup.sh); ``{peer: None}`` when built, else the exact error."""
    errors = {}
    for name in names:
        proc = subprocess.run(["bash", str(HERE / "setup.sh"), name], capture_output=True, text=True, timeout=1200)
        errors[name] = None if proc.returncode == 0 else f"setup.sh {name} exited {proc.returncode}: " + \
            "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored" not in line)[-2000:]
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2 rounds, 16 train / 8 test images of 32x32 per hospital")
    p.add_argument("--hospitals", default="3", help="comma-separated federation sizes (default 3)")
    p.add_argument("--systems", default="carefl,flower,nvflare")
    p.add_argument("--privacy", default="none,dp", help="none | dp | none,dp")
    p.add_argument("--sigma", type=float, default=1.0, help="DP noise multiplier (all systems)")
    p.add_argument("--clip", type=float, default=0.1, help="DP per-sample clipping bound C (conf/privacy/dp.yaml)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    p.add_argument("--keep", type=Path, help="keep run folders here (default: a temporary folder, kept on failure)")
    p.add_argument("--carefl-rev", help="measure this git revision of CareFL (e.g. HEAD) instead of the checkout")
    args = p.parse_args()
    systems = args.systems.split(",")
    work = Path(args.keep or tempfile.mkdtemp(prefix="peers-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = carefl_source(args.carefl_rev, work)
    errors = build_peers([s for s in systems if s in PEERS])
    result = {"args": vars(args) | {"out": str(args.out), "keep": str(args.keep)}, "carefl": source,
              "peer_errors": errors, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "cells": []}
    for n in map(int, args.hospitals.split(",")):
        for privacy in args.privacy.split(","):
            overrides = carefl_overrides(n, args.tiny, privacy, args.sigma, args.clip)
            cell_dir = work / f"n{n}-{privacy}"
            spec = write_federation(cell_dir / "data", overrides)
            runnable = [s for s in systems if s == "carefl" or errors.get(s) is None]
            cell = {"hospitals": n, "privacy": privacy, "spec": spec, "runs": {s: [] for s in runnable}, "failed": {}}
            for rep in range(args.repeat):
                order = runnable[rep % len(runnable):] + runnable[:rep % len(runnable)]  # interleaved
                for system in order:
                    if system in cell["failed"]:
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] n={n} {privacy} repeat {rep + 1}: {system}", flush=True)
                    try:
                        run = run_system(system, cell_dir / "data", cell_dir / f"{system}-{rep}", overrides, args.timeout)
                    except (RuntimeError, ValueError, OSError) as e:
                        cell["failed"][system] = str(e)
                        print(f"  failed: {e}", flush=True)
                        continue
                    cell["runs"][system].append(summarise(system, run, n) | {"final_dice": run["final_dice"], "repeat": rep})
            cell["table"] = table(cell)
            result["cells"].append(cell)
            print(render(cell), flush=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))
    if args.keep is None and not any(c["failed"] for c in result["cells"]):
        shutil.rmtree(work, ignore_errors=True)
    for name, err in errors.items():
        if err:
            print(f"{name}: not built: {err}")


KEYS = ("wall_s", "cpu_s", "round1_s", "round_s", "compute_s", "overhead_s", "server_rss_mib", "hospital_rss_mib",
        "tree_pss_mib", "dice")


def table(cell: dict) -> dict:
    """Per system: the median of each figure over repeats, and its median ratio to CareFL in the
    same repeat (``<key>_x``)."""
    runs, out = cell["runs"], {}
    base = {r["repeat"]: r for r in runs.get("carefl", [])}
    for system, rs in runs.items():
        if not rs:
            continue
        row = {k: statistics.median(r[k] for r in rs) for k in KEYS}
        row["load"] = statistics.median(r["load"][0] for r in rs)
        row["epsilon"] = rs[-1]["epsilon"]
        for k in KEYS:
            ratios = [r[k] / base[r["repeat"]][k] for r in rs if r["repeat"] in base and base[r["repeat"]][k]]
            row[f"{k}_x"] = statistics.median(ratios) if ratios else None
        out[system] = row
    return out


def render(cell: dict) -> str:
    """A markdown table of one cell (hospitals x privacy): value (ratio to CareFL)."""
    cols = ("wall_s", "cpu_s", "round1_s", "round_s", "overhead_s", "server_rss_mib", "hospital_rss_mib",
            "tree_pss_mib", "dice")
    lines = [f"\n{cell['hospitals']} hospitals, privacy={cell['privacy']}",
             "| system | " + " | ".join(cols) + " | epsilon reported | load |", "|---" * (len(cols) + 3) + "|"]
    for system, row in cell["table"].items():
        vals = [f"{row[k]:.3g}" + (f" ({row[k + '_x']:.2f}x)" if system != "carefl" and row[k + "_x"] else "")
                for k in cols]
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        lines.append(f"| {system} | " + " | ".join(vals) + f" | {eps} | {row['load']:.2f} |")
    for system, err in cell["failed"].items():
        lines.append(f"| {system} | failed: {err.splitlines()[0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
