"""Framework overhead: the default federation on Flower's simulation engine vs a bare loop.

    .venv/bin/python benchmarks/bench_overhead.py                    # conf/ defaults, 3 repeats
    .venv/bin/python benchmarks/bench_overhead.py --tiny             # smoke: tiny data, 2 rounds
    .venv/bin/python benchmarks/bench_overhead.py data.n_train=40 federation.rounds=3   # overrides

Three ways to run the same federation (config composed from conf/ at run time, baselines off),
each in a fresh process with one torch/BLAS thread per worker (``OMP_NUM_THREADS=1``):

- ``bare``: the one round loop (``carefl.rounds.run_federation``) over the in-process
  transport (``carefl.local_transport``): hospitals are called one after another in this
  process -- same request/reply checks and receipts, no Flower, no Ray, no messages;
- ``flower-1w``: ``carefl-sim``'s code path (``server_app.simulate.simulate``) with one Ray
  worker (``num_cpus`` per hospital = all cores), so hospitals train one after another like
  the bare loop: the difference is the framework's cost;
- ``flower``: the default ``carefl-sim`` (one worker per core): hospitals train in parallel.

Round time is split with what the system records (``metrics.json``: per-round ``timing`` and
each hospital's ``train_seconds`` / ``eval_seconds``): local training, aggregation,
evaluation, checkpoint and "other" (messages, serialisation, scheduling). Round 1 also pays
the workers' imports, data generation and the one-off noise calibration, so steady rounds
(2..R) are reported apart from it. Figures are medians over ``--repeat`` runs; the ratio is
taken per repeat (all variants of one repeat run back to back) and its median reported.
Prints a table and writes JSON (default benchmarks/results/bench_overhead.json).

The ``--worker`` mode runs one federation and is also used by bench_scaling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
#: smoke-test sizes (noise given directly: calibration is measured in the full run only)
TINY = ["data.n_train=8", "data.n_test=4", "data.image_size=16", "federation.rounds=2", "privacy.noise_multiplier=1.0"]
VARIANTS = ("bare", "flower-1w", "flower")


# ---- one federation in this process (--worker) ------------------------------------------


def _round_record(timing: dict, train: dict, evals: dict) -> dict:
    train_s = [m["train_seconds"] for m in train.values() if "train_seconds" in m]
    eval_s = [m["eval_seconds"] for m in evals.values() if "eval_seconds" in m]
    return {**timing, "train_compute_seconds": sum(train_s), "train_max_seconds": max(train_s, default=0.0),
            "eval_compute_seconds": sum(eval_s), "hospitals": len(train_s)}


def run_flower(cfg, cpus_per_hospital: float, run_dir: Path) -> list[dict]:
    """``server_app.simulate.simulate`` (what ``carefl-sim`` runs); per-round records from metrics.json."""
    from server_app.simulate import simulate

    simulate(cfg, cpus_per_hospital=cpus_per_hospital)
    return _records(run_dir)


def run_bare(cfg, run_dir: Path) -> list[dict]:
    """The same round loop as the ServerApp over the in-process transport; per-round records
    from metrics.json."""
    from carefl.local_transport import LocalTransport
    from carefl.rounds import run_federation

    run_federation(LocalTransport(len(cfg.federation.hospitals)), cfg)
    return _records(run_dir)


def _records(run_dir: Path) -> list[dict]:
    """Per-round records of a finished run's metrics.json; a run that did not complete (a
    hospital killed by the OOM killer, a stopped federation) is an error naming its status and
    message, not a missing key."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RuntimeError(f"the run wrote no {path}; see its log above")
    metrics = json.loads(path.read_text())
    if metrics["status"] != "completed":
        raise RuntimeError(f"the run in {run_dir} ended {metrics['status']}: {metrics['message'] or 'no message'}")
    return [_round_record(r["timing"], r["train"], r["eval"]) for r in metrics["rounds"]]


def worker(variant: str, cpus_per_hospital: float, out_dir: Path, overrides: list[str]) -> None:
    """Run one federation; print ``RESULT <json>`` as the last line."""
    import torch
    from omegaconf import OmegaConf

    from carefl.config import compose_config

    torch.set_num_threads(1)
    cfg = compose_config([*overrides, f"output_dir={out_dir}", "run_id=run", "federation.baselines=false"])
    start = time.monotonic()
    if variant == "bare":
        rounds = run_bare(cfg, out_dir / "run")
    else:
        rounds = run_flower(cfg, cpus_per_hospital, out_dir / "run")
    recipe = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "federation", "privacy")}
    print("RESULT " + json.dumps({"rounds": rounds, "federation_seconds": time.monotonic() - start, "recipe": recipe}),
          flush=True)


# ---- the parent: launch a worker, sample the memory of its process tree -----------------


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of ``pid`` and all its descendants, bytes; PSS splits shared pages."""
    rss = pss = count = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for proc in procs:
        try:
            full = proc.memory_full_info()  # reads /proc/<pid>/smaps_rollup on Linux
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or a kernel thread
            continue
        rss, pss, count = rss + full.rss, pss + full.pss, count + 1
    return rss, pss, count


def launch(variant: str, overrides: list[str], cpus_per_hospital: float = 1.0, sample_s: float = 1.0,
           log: Path | None = None) -> dict:
    """Run ``--worker`` in a fresh process; return its result with process wall time and peak memory."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"carefl-bench-{variant}-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--cpus", str(cpus_per_hospital),
           "--worker-dir", str(out_dir), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = log or out_dir / "worker.log"
    peak = {"rss": 0, "pss": 0, "processes": 0}
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(sample_s):
                rss, pss, n = tree_memory(proc.pid)
                peak.update(rss=max(peak["rss"], rss), pss=max(peak["pss"], pss), processes=max(peak["processes"], n))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    wall = time.monotonic() - start
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{variant} run failed (exit {rc}); log {log}:\n{tail}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {**result, "process_seconds": wall, "peak_rss_bytes": peak["rss"], "peak_pss_bytes": peak["pss"],
            "peak_processes": peak["processes"], "log": str(log)}


def steady(rounds: list[dict], key: str) -> float:
    """Median of ``key`` over rounds 2..R (round 1 when there is only one)."""
    rows = rounds[1:] or rounds
    return statistics.median(r[key] for r in rows)


# ---- overhead table -----------------------------------------------------------------------

SPLIT = (  # (column, how to get it from a round record)
    ("round", lambda r: r["round_seconds"]),
    ("train", lambda r: r["train_compute_seconds"]),
    ("aggregate", lambda r: r["aggregate_seconds"]),
    ("evaluate", lambda r: r["eval_compute_seconds"]),
    ("checkpoint", lambda r: r["checkpoint_seconds"]),
    ("other", lambda r: r["round_seconds"] - r["train_compute_seconds"] - r["aggregate_seconds"]
     - r["eval_compute_seconds"] - r["checkpoint_seconds"]),
)


def summarise(runs: list[dict]) -> dict:
    """Medians over repeats of the steady-round split, round 1, start-up and process time."""
    def med(fn):
        return statistics.median(fn(run) for run in runs)

    out = {f"steady_{name}_s": med(lambda run, f=f: statistics.median(f(r) for r in (run["rounds"][1:] or run["rounds"])))
           for name, f in SPLIT}
    out.update(
        round1_s=med(lambda run: run["rounds"][0]["round_seconds"]),
        round1_train_s=med(lambda run: run["rounds"][0]["train_compute_seconds"]),
        outside_rounds_s=med(lambda run: run["process_seconds"] - sum(r["round_seconds"] for r in run["rounds"])),
        process_s=med(lambda run: run["process_seconds"]),
        peak_pss_mib=med(lambda run: run["peak_pss_bytes"]) / 2**20,
        repeats=len(runs),
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml (key=value)")
    p.add_argument("--tiny", action="store_true", help="smoke run: " + " ".join(TINY) + ", 1 repeat")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant (medians reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_overhead.json")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--cpus", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    if args.worker:
        worker(args.worker, args.cpus, args.worker_dir, overrides)
        return
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    repeat = 1 if args.tiny else args.repeat
    cpus = {"bare": 1.0, "flower-1w": float(os.cpu_count() or 1), "flower": 1.0}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants if v != "bare"}
    load_start = os.getloadavg()
    print(f"overrides: {' '.join(overrides) or '(conf/ defaults)'}; repeat={repeat}; load {load_start[0]:.1f}")
    for i in range(repeat):
        for v in variants:
            run = launch(v, overrides, cpus[v])
            runs[v].append(run)
            print(f"  repeat {i + 1} {v:<10} steady round {steady(run['rounds'], 'round_seconds'):7.2f} s, "
                  f"process {run['process_seconds']:6.1f} s", flush=True)
        if "bare" in variants:
            base = steady(runs["bare"][-1]["rounds"], "round_seconds")
            for v in ratios:
                ratios[v].append(steady(runs[v][-1]["rounds"], "round_seconds") / base)
    table = {v: summarise(r) for v, r in runs.items()}
    for v in ratios:
        table[v]["ratio_to_bare"] = statistics.median(ratios[v])

    cols = [name for name, _ in SPLIT]
    header = f"{'variant':<11}" + "".join(f"{c:>11}" for c in cols) + f"{'x bare':>8}{'round 1':>9}{'start-up':>9}{'PSS MiB':>9}"
    print("\nsteady round (median of rounds 2..R, then of repeats), seconds\n" + header + "\n" + "-" * len(header))
    for v, row in table.items():
        ratio = f"{row['ratio_to_bare']:.3f}" if "ratio_to_bare" in row else "-"
        print(f"{v:<11}" + "".join(f"{row[f'steady_{c}_s']:>11.3f}" for c in cols)
              + f"{ratio:>8}{row['round1_s']:>9.2f}{row['outside_rounds_s']:>9.1f}{row['peak_pss_mib']:>9.0f}")
    print("train/evaluate: sum over hospitals of their train_seconds/eval_seconds (compute in the workers);\n"
          "other: round - those - aggregate - checkpoint (messages, serialisation, scheduling; negative when\n"
          "workers run in parallel); start-up: process wall time outside the rounds (imports, Ray, finish).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "overrides": overrides, "repeat": repeat, "tiny": args.tiny, "nproc": os.cpu_count(),
        "load_start": load_start, "load_end": os.getloadavg(), "variants": table, "ratios": ratios,
        "runs": {v: [{k: x for k, x in run.items() if k != "log"} for run in r] for v, r in runs.items()},
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
