"""Does every hospital gain by joining? The default federation with and without personalization.

    python benchmarks/personalization.py [--seeds 0,1,2] [--modes none,finetune,ditto] [--workdir DIR]
        [--out FILE] [--reuse FILE[,FILE]] [--set MODE:OVERRIDE ...] [carefl-sim overrides ...]

Runs ``carefl-sim`` (the default federation: synthetic 3-hospital segmentation consortium, DP-SGD,
baselines) once per seed for each ``personalization`` mode (``none``, ``finetune``, ``ditto`` by
default), and reads each run's ``metrics.json`` ``sites`` block (:meth:`carefl.report.Report.sites`).
Prints, per hospital (mean over seeds): the federated model (none), for every other mode its
deployed model (the better of federated and personalized on its own test split) and its own
local-only model (which gets the same epochs as a hospital of that run, so it differs per mode),
then the gains and the worst-site Dice of every mode. Checks the issue's two targets per mode and
prints PASS/FAIL for each:

1. every hospital's deployed model is at least as good as its local-only model on its own test
   split, in every seed;
2. the worst-site Dice is higher than without personalization (mean over seeds);

and, per mode and hospital, the mean gain (deployed - local-only, paired by seed) with its 95 %
Student-t interval over the seeds: a target 1 missed by a few thousandths whose interval holds 0
is a tie at that number of seeds, not a loss.

``--set ditto:personalization.lambda=1.0`` adds an override to one mode's runs only (a mode may
be named ``ditto@lam1`` to run a second setting beside ``ditto``: everything after ``@`` is a
label). ``--reuse`` takes the runs of earlier ``--out`` files (same seeds and overrides) instead
of running those modes again. Extra arguments go to every ``carefl-sim`` call.
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

import scipy.stats

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, seed: int, mode: str, overrides: list[str]) -> dict:
    """One carefl-sim run of ``mode`` (``name[@label]``); returns its metrics.json ``sites`` block."""
    out = work / f"{mode.replace('@', '-')}-seed{seed}"
    cmd = [str(Path(sys.executable).parent / "carefl-sim"), f"output_dir={out}", f"seed={seed}",
           f"personalization={mode.split('@')[0]}", *overrides]
    print(f"seed {seed}, {mode} {' '.join(overrides)} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"carefl-sim failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return json.loads((run_dir / "metrics.json").read_text())["sites"]


def lo_mid_hi(values) -> str:
    """``+0.004 [-0.002, +0.010]``: the mean of paired per-seed gains and its two-sided 95 %
    Student-t interval (seeds as independent draws; ``[n/a]`` with one seed). It says whether a
    shortfall of a few thousandths is a difference or a tie at this number of seeds."""
    values = list(values)
    mid = statistics.mean(values)
    if len(values) < 2:
        return f"{mid:+.3f} [n/a]"
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mid:+.3f} [{mid - half:+.3f}, {mid + half:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="none,finetune,ditto")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="also write every run's sites block to this JSON file")
    parser.add_argument("--reuse", default=None,
                        help="JSON files written by --out (comma-separated): take their runs of the modes they hold "
                             "instead of running them again (same seeds and overrides)")
    parser.add_argument("--set", action="append", default=[], metavar="MODE:OVERRIDE",
                        help="an override for one mode only, e.g. ditto:personalization.lambda=1.0")
    args, overrides = parser.parse_known_args()
    seeds, modes = [int(s) for s in args.seeds.split(",")], args.modes.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="carefl-personal-"))
    load = os.getloadavg()
    reused: dict = {}
    for path in (args.reuse.split(",") if args.reuse else []):
        reused.update(json.loads(Path(path).read_text())["runs"])
    per_mode: dict[str, list[str]] = {}
    for item in args.set:
        mode, override = item.split(":", 1)
        per_mode.setdefault(mode, []).append(override)
    runs = {m: reused.get(m) or [run(work, s, m, [*overrides, *per_mode.get(m, [])]) for s in seeds] for m in modes}
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": seeds, "overrides": overrides, "per_mode": per_mode,
                                              "runs": runs}, indent=1))
    hospitals = list(runs[modes[0]][0]["per_site"])
    personal = [m for m in modes if m != "none"]

    def mean(mode: str, h: str, key: str) -> float:
        return statistics.mean(r["per_site"][h][key] for r in runs[mode])

    print(f"\nDice on each hospital's own test split, mean of seeds {seeds}:\n")
    head = ["hospital", *(["federated (none)", "local-only (none)"] if "none" in runs else [])]
    for m in personal:
        head += [f"deployed ({m})", f"local-only ({m})"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for h in hospitals:
        cells = [h, *([f"{mean('none', h, 'federated'):.3f}", f"{mean('none', h, 'local_only'):.3f}"]
                      if "none" in runs else [])]
        for m in personal:
            cells += [f"{mean(m, h, 'deployed'):.3f}", f"{mean(m, h, 'local_only'):.3f}"]
        print("| " + " | ".join(cells) + " |")
    worst = {m: statistics.mean(r["worst"] for r in runs[m]) for m in runs}
    print("\nworst-site Dice (mean; per seed): " + "; ".join(
        f"{m} {worst[m]:.3f} {[round(r['worst'], 3) for r in runs[m]]}" for m in runs))
    for m in runs:
        losers = [(s, h, round(e["gain"], 3)) for s, r in zip(seeds, runs[m]) for h, e in r["per_site"].items()
                  if e["gain"] < 0]
        line = f"{m}: target 1 (every deployed model >= its local-only, every seed): {'PASS' if not losers else 'FAIL'}"
        line += f" (below: {losers})" if losers else ""
        if m != "none" and "none" in runs:
            line += f"; target 2 (worst site higher than none): {'PASS' if worst[m] > worst['none'] else 'FAIL'}"
        print(line)
        print(f"  {m}: gain per hospital over seeds, mean [95% t-interval]: " + "; ".join(
            f"{h} {lo_mid_hi(r['per_site'][h]['gain'] for r in runs[m])}" for h in hospitals))
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}; runs in {work}")


if __name__ == "__main__":
    main()
