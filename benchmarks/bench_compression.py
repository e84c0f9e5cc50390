"""Bytes per round and final Dice of the default federation for each update compression.

Each option (``compression=none|float16|int8|topk``) runs the default federation (3 hospitals,
6 rounds, DP-SGD, conf/config.yaml) through the one round loop (``carefl.rounds``) over the
in-process transport, so every reply crosses the same checks as under Flower; the same seed
for every option. Reported per option: bytes the server received from a hospital per round
(all its replies: the training reply carries the update; ``metrics.json`` "wire", counted
from the messages' records), the reduction against ``none``, and the final Dice. Goal (issue
18): >= 4x fewer bytes for <= 1 Dice point lost.

Usage:  python benchmarks/bench_compression.py [--tiny] [--options none,int8] [--out PATH] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from carefl.config import compose_config
from carefl.local_transport import LocalTransport
from carefl.rounds import run_federation

OPTIONS = ("none", "float16", "int8", "topk")
TINY = ["data.n_train=16", "data.n_test=8", "data.image_size=32", "federation.rounds=2"]


def run(option: str, overrides: list[str], root: Path) -> dict:
    cfg = compose_config([f"compression={option}", "federation.baselines=false", f"output_dir={root}", *overrides])
    start = time.perf_counter()
    metrics = json.loads((run_federation(LocalTransport(len(cfg.federation.hospitals)), cfg) / "metrics.json").read_text())
    received = [t["bytes_received"] for r in metrics["rounds"] for t in r["wire"].values()]
    return {"option": option, "status": metrics["status"], "bytes_per_hospital_round": statistics.mean(received),
            "final_dice": metrics["rounds"][-1]["aggregate"]["dice"], "wall_s": time.perf_counter() - start,
            "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: 2 rounds of tiny data")
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args()
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for option in args.options.split(","):
            rows.append(run(option, overrides, Path(tmp) / option))
    base = next((r for r in rows if r["option"] == "none"), rows[0])
    print("| compression | bytes a hospital sends per round | fewer than none | final Dice | Dice vs none | wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["reduction"] = base["bytes_per_hospital_round"] / r["bytes_per_hospital_round"]
        r["dice_change_points"] = 100 * (r["final_dice"] - base["final_dice"])
        print(f"| {r['option']} | {r['bytes_per_hospital_round'] / 1e3:.1f} kB | {r['reduction']:.2f}x | "
              f"{r['final_dice']:.3f} | {r['dice_change_points']:+.1f} | {r['wall_s']:.0f} s (load {r['load_avg_1m']:.1f}) |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
