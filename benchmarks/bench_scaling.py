"""Scaling: round time and peak memory of a simulated consortium of 3 .. 100 hospitals.

    .venv/bin/python benchmarks/bench_scaling.py                       # 3, 10, 30, 100 hospitals
    .venv/bin/python benchmarks/bench_scaling.py --sizes 3,10 --repeat 2
    .venv/bin/python benchmarks/bench_scaling.py --tiny                # smoke: 2 hospitals, 1 round
    .venv/bin/python benchmarks/bench_scaling.py privacy.noise_multiplier=null   # calibrate sigma too

Each run is ``carefl-sim``'s code path (``server_app.simulate.simulate``, one Ray worker per
core) in a fresh process with ``federation.hospitals=[h000, h001, ...]`` (the synthetic data
draws a site profile for any index), small data per hospital, baselines off, the rest from
conf/ at run time. The noise multiplier is given (``privacy.noise_multiplier``) so round 1 does
not calibrate sigma for every hospital (a one-off ~5 s per hospital, see bench_overhead.py);
epsilon accounting still runs every round. Memory is the peak, over 1 s samples, of the PSS
summed over the process and all its descendants (Ray's GCS, raylet, workers): PSS splits
shared pages between processes, so the sum is not inflated by the shared object store.
Figures are medians over ``--repeat`` runs. Prints a table and writes JSON (default
benchmarks/results/bench_scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench_overhead import RESULTS, launch, steady

#: small data per hospital (each site scales n_train by its size factor, 0.75..1.25)
SMALL = ["data.n_train=16", "data.n_test=4", "data.image_size=32", "federation.rounds=2", "privacy.noise_multiplier=1.0"]
TINY = ["data.n_train=8", "data.n_test=4", "data.image_size=16", "federation.rounds=1", "privacy.noise_multiplier=1.0"]


def hospitals_override(n: int) -> str:
    """``federation.hospitals=[h000,...]`` with ``n`` generated names."""
    return "federation.hospitals=[" + ",".join(f"h{i:03d}" for i in range(n)) + "]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, applied after the small-data ones")
    p.add_argument("--sizes", default="3,10,30,100", help="comma-separated numbers of hospitals")
    p.add_argument("--repeat", type=int, default=3, help="runs per size (medians reported)")
    p.add_argument("--tiny", action="store_true", help="smoke run: 2 hospitals, " + " ".join(TINY) + ", 1 repeat")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_scaling.json")
    args = p.parse_args()
    sizes = [2] if args.tiny else [int(s) for s in args.sizes.split(",")]
    repeat = 1 if args.tiny else args.repeat
    base = [*(TINY if args.tiny else SMALL), *args.overrides]
    load_start = os.getloadavg()
    print(f"overrides: {' '.join(base)}; sizes {sizes}; repeat={repeat}; load {load_start[0]:.1f}", flush=True)
    rows = []
    for n in sizes:
        runs = []
        for i in range(repeat):
            run = launch("flower", [*base, hospitals_override(n)])
            runs.append(run)
            print(f"  {n:>4} hospitals, repeat {i + 1}: steady round {steady(run['rounds'], 'round_seconds'):7.2f} s, "
                  f"peak PSS {run['peak_pss_bytes'] / 2**20:7.0f} MiB, process {run['process_seconds']:6.1f} s", flush=True)
        rnd = statistics.median(steady(r["rounds"], "round_seconds") for r in runs)
        rows.append({
            "hospitals": n,
            "round_s": rnd,
            "round_per_hospital_s": rnd / n,
            "train_phase_s": statistics.median(steady(r["rounds"], "train_phase_seconds") for r in runs),
            "aggregate_s": statistics.median(steady(r["rounds"], "aggregate_seconds") for r in runs),
            "eval_phase_s": statistics.median(steady(r["rounds"], "eval_phase_seconds") for r in runs),
            "round1_s": statistics.median(r["rounds"][0]["round_seconds"] for r in runs),
            "process_s": statistics.median(r["process_seconds"] for r in runs),
            "peak_pss_mib": statistics.median(r["peak_pss_bytes"] for r in runs) / 2**20,
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20,
            "peak_processes": max(r["peak_processes"] for r in runs),
            "repeats": len(runs),
        })
    first = rows[0]
    header = (f"{'hospitals':>9}{'round s':>9}{'s/hosp':>8}{'x linear':>9}{'train s':>9}{'aggr s':>8}{'eval s':>8}"
              f"{'round1 s':>9}{'process s':>10}{'PSS MiB':>9}{'RSS MiB':>9}{'procs':>6}")
    print("\nsteady round = median of rounds 2..R (round 1 if R = 1), then of repeats\n" + header + "\n" + "-" * len(header))
    for row in rows:
        row["vs_linear"] = row["round_per_hospital_s"] / first["round_per_hospital_s"]
        print(f"{row['hospitals']:>9}{row['round_s']:>9.2f}{row['round_per_hospital_s']:>8.3f}{row['vs_linear']:>9.2f}"
              f"{row['train_phase_s']:>9.2f}{row['aggregate_s']:>8.3f}{row['eval_phase_s']:>8.2f}{row['round1_s']:>9.2f}"
              f"{row['process_s']:>10.1f}{row['peak_pss_mib']:>9.0f}{row['peak_rss_mib']:>9.0f}{row['peak_processes']:>6}")
    print(f"x linear: seconds per hospital relative to {first['hospitals']} hospitals (1.00 = linear growth)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overrides": base, "sizes": sizes, "repeat": repeat, "tiny": args.tiny,
                                    "nproc": os.cpu_count(), "load_start": load_start, "load_end": os.getloadavg(),
                                    "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
