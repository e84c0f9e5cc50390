"""Does every hospital gain by joining? The default federation with and without personal fine-tuning.

    python benchmarks/personalization.py [--seeds 0,1,2] [--workdir DIR] [--out FILE] [carefl-sim overrides ...]

Runs ``carefl-sim`` (the default federation: synthetic 3-hospital segmentation consortium, DP-SGD,
baselines) once per seed with ``personalization=none`` and once with ``personalization=finetune``,
and reads each run's ``metrics.json`` ``sites`` block (:meth:`carefl.report.Report.sites`). Prints,
per hospital (mean over seeds): the federated model (none), the deployed model with fine-tuning
(the better of federated and personalized on its own test split), its own local-only model
(which gets the same epochs as a hospital of that run) and the gain; then the worst-site Dice of
both modes. Checks the issue's two targets and prints PASS/FAIL for each:

1. with personalization, every hospital's deployed model is at least as good as its local-only
   model on its own test split, in every seed;
2. the worst-site Dice with personalization is higher than without (mean over seeds).

Extra arguments go to every ``carefl-sim`` call (e.g. ``federation.rounds=10``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, seed: int, mode: str, overrides: list[str]) -> dict:
    """One carefl-sim run; returns its metrics.json ``sites`` block."""
    out = work / f"{mode}-seed{seed}"
    cmd = [str(Path(sys.executable).parent / "carefl-sim"), f"output_dir={out}", f"seed={seed}",
           f"personalization={mode}", *overrides]
    print(f"seed {seed}, personalization={mode} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"carefl-sim failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return json.loads((run_dir / "metrics.json").read_text())["sites"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="also write every run's sites block to this JSON file")
    parser.add_argument("--reuse", default=None,
                        help="a JSON written by --out: take its personalization=none runs instead of running them "
                             "again (same seeds and overrides)")
    args, overrides = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="carefl-personal-"))
    load = os.getloadavg()
    reused = json.loads(Path(args.reuse).read_text())["runs"]["none"] if args.reuse else None
    runs = {"none": reused or [run(work, s, "none", overrides) for s in seeds],
            "finetune": [run(work, s, "finetune", overrides) for s in seeds]}
    hospitals = list(runs["none"][0]["per_site"])

    def mean(mode: str, h: str, key: str) -> float:
        return statistics.mean(r["per_site"][h][key] for r in runs[mode])

    print(f"\nDice on each hospital's own test split, mean of seeds {seeds}:\n")
    print("| hospital | federated (none) | deployed (finetune) | local-only | gain (none) | gain (finetune) |")
    print("|---|---|---|---|---|---|")
    for h in hospitals:
        print(f"| {h} | {mean('none', h, 'federated'):.3f} | {mean('finetune', h, 'deployed'):.3f} "
              f"| {mean('finetune', h, 'local_only'):.3f} | {mean('none', h, 'gain'):+.3f} "
              f"| {mean('finetune', h, 'gain'):+.3f} |")
    worst = {m: statistics.mean(r["worst"] for r in runs[m]) for m in runs}
    print(f"\nworst-site Dice: none {worst['none']:.3f}, finetune {worst['finetune']:.3f} "
          f"(per seed: none {[round(r['worst'], 3) for r in runs['none']]}, "
          f"finetune {[round(r['worst'], 3) for r in runs['finetune']]})")
    losers = [(s, h) for s, r in zip(seeds, runs["finetune"]) for h, e in r["per_site"].items() if e["gain"] < 0]
    print(f"target 1 (every deployed model >= its local-only, every seed): {'PASS' if not losers else 'FAIL'}"
          + (f" (below: {losers})" if losers else ""))
    print(f"target 2 (worst site higher with finetune): {'PASS' if worst['finetune'] > worst['none'] else 'FAIL'}")
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}; runs in {work}")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": seeds, "overrides": overrides, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
