"""Robustness matrix: final Dice of every aggregation rule under every simulated attack.

One cell = one federation (``strategy=<rule>``, ``attack=<attack>``) on the synthetic
consortium with ``--hospitals`` hospitals (h00, h01, ...; the synthetic data draws a site
profile for every index, 0-2 are the hand-designed sites). Byzantine hospitals are the last
f = round(0.2 n) of the ``--hospitals`` n (``attack.byzantine``: n=10 -> f=2, h08 and h09; a
row that needs more hospitals keeps f and makes its last f Byzantine), and every rule that
uses ``strategy.f`` gets ``strategy.f=f``. Bulyan needs n >= 4f+3 = 11 usable updates for
f=2, and the norm bound leaves the gaussian and scaling attackers out, so its row runs with
three extra honest hospitals (n=13, still f=2: 15 %); the table says so.

The cell's value is the example-weighted mean Dice of the FINAL global model over the test
splits of the hospitals that are honest in every cell (h00..h07 for n=10), so every cell of
the table (clean rows included) is measured on the same patients.

How rounds run: through the one round loop, ``carefl.rounds.run_federation`` -- the code the
ServerApp and ``carefl-sim`` run -- over the in-process transport
(``carefl.local_transport.LocalTransport``): every request and reply crosses the same
schema checks, site policies and signed receipts as under Flower, and the transport is
simulated, so the server-side attacks apply. Flower itself (``carefl-sim -m``) is not used:
its Ray workers cost seconds per round and memory per hospital, which 2 shared cores cannot
afford for 63 federations. Synthetic data is generated once per hospital
and cached in-process (``carefl.data.synthetic``).

Defaults (small, CPU): ``privacy=none`` (no DP-SGD: DP noise at these tiny dataset sizes
would hide the rules' differences; ``--privacy dp`` turns it on), 32x32 images,
``data.n_train=80`` (x the site's size scale), 32 test images per hospital, 10 rounds of 2
local epochs (clean FedAvg reaches Dice ~0.89; with 5 x 1 it is still at ~0.55, where every
rule that slows learning looks broken), no baselines, one torch thread: ~20 s per cell.

Outputs in ``--out`` (default benchmarks/results/): ``robustness_matrix.csv`` (one row per
cell), ``robustness_matrix.md`` (the table), ``robustness_matrix.png`` (heatmap).

Usage:
    python benchmarks/robustness_matrix.py                      # the full matrix (9 rules x 7 attacks)
    python benchmarks/robustness_matrix.py --rules fedavg,robust --attacks none,alie --rounds 5
    python benchmarks/robustness_matrix.py --tiny --out /tmp/rm  # smoke: 2 rules x 2 attacks, 1 round
    python benchmarks/robustness_matrix.py --rules robust --set strategy.pre.1.tau=2.0   # extra overrides
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "centered_clip", "robust")
ATTACKS = ("none", "signflip", "gaussian", "scaling", "labelflip", "alie", "ipm")
FRACTION = 0.2  # f = round(0.2 n) of the --hospitals n are Byzantine (the last ones)
#: rules that need more hospitals than --hospitals for f = round(0.2 n): rule -> n(f)
#: Bulyan needs n >= 4f+3 usable updates; updates the norm bound leaves out
#: (federation.max_update_norm_ratio: the gaussian and scaling attackers) no longer count, so its
#: row gets f spare honest hospitals: n = 5f+3 (13 for f=2)
MIN_HOSPITALS = {"bulyan": lambda f: 5 * f + 3}
STEM = "robustness_matrix"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: fedavg,median x none,signflip, 1 round, 16x16 images, 8 training images")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated strategy names")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack names")
    p.add_argument("--hospitals", type=int, default=10, help="hospitals n (f = round(0.2 n) are Byzantine)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=80, help="data.n_train (x each site's size scale)")
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--privacy", choices=("none", "dp"), default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every cell (repeatable), e.g. strategy.pre.1.tau=2.0")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    p.add_argument("--update", action="store_true",
                   help="keep the other cells of an existing CSV in --out; re-run and replace only these")
    args = p.parse_args(argv)
    if args.tiny:
        args.rules, args.attacks = "fedavg,median", "none,signflip"
        args.rounds, args.n_train, args.n_test, args.image_size = 1, 8, 4, 16
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from carefl.attacks import byzantine_indices  # noqa: E402
from carefl.config import compose_config  # noqa: E402
from carefl.local_transport import LocalTransport  # noqa: E402
from carefl.rounds import run_federation  # noqa: E402

COLUMNS = ("rule", "attack", "hospitals", "f", "dice", "worst_dice", "rounds", "status", "seconds")


def hospital_names(n: int) -> list[str]:
    return [f"h{i:02d}" for i in range(n)]


def byzantine_count(n: int) -> int:
    """f = round(0.2 n), half up: how many of n hospitals are Byzantine."""
    return math.floor(FRACTION * n + 0.5)


def cell_overrides(args: argparse.Namespace, rule: str, attack: str) -> tuple[list[str], int, int]:
    """Hydra overrides of one cell, its hospital count n and Byzantine count f."""
    n = args.hospitals
    f = byzantine_count(n)
    if rule in MIN_HOSPITALS:
        n = max(n, MIN_HOSPITALS[rule](f))
    overrides = [
        f"strategy={rule}", f"attack={attack}", f"federation.hospitals=[{','.join(hospital_names(n))}]",
        f"federation.rounds={args.rounds}", f"federation.local_epochs={args.local_epochs}",
        "federation.baselines=false", f"privacy={args.privacy}", f"seed={args.seed}",
        f"data.n_train={args.n_train}", f"data.n_test={args.n_test}", f"data.image_size={args.image_size}",
    ]
    if rule != "fedavg":  # the plain mean tolerates no Byzantine hospital: its f stays 0
        overrides.append(f"strategy.f={f}")
    if attack != "none":  # the last f hospitals, whatever n this row needs
        overrides.append(f"attack.byzantine=[{','.join(str(i) for i in range(n - f, n))}]")
    return overrides + list(args.set), n, f


def run_cell(cfg, honest: list[str]) -> dict:
    """One federation through ``carefl.rounds.run_federation`` (in-process transport).

    Returns ``dice`` (example-weighted mean over ``honest`` of the final model: the last
    evaluated round), ``worst_dice`` (lowest of them), ``rounds`` completed and ``status``
    (completed | stopped).
    """
    run_dir = run_federation(LocalTransport(len(cfg.federation.hospitals)), cfg)
    record = json.loads((run_dir / "metrics.json").read_text())
    evaluated = [r for r in record["rounds"] if r["eval"]]
    final = {h: evaluated[-1]["eval"][h] for h in honest} if evaluated else {}
    total = sum(m["num_examples"] for m in final.values())
    dice = sum(m["dice"] * m["num_examples"] for m in final.values()) / total if total else float("nan")
    worst = min((m["dice"] for m in final.values()), default=float("nan"))
    return {"dice": dice, "worst_dice": worst, "rounds": len(evaluated), "status": record["status"]}


def run_matrix(args: argparse.Namespace) -> list[dict]:
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    n0 = args.hospitals
    honest = hospital_names(n0)[: n0 - byzantine_count(n0)]  # honest in every cell
    rows, total = [], len(rules) * len(attacks)
    with tempfile.TemporaryDirectory(prefix="carefl-matrix-") as tmp:
        for rule in rules:
            for attack in attacks:
                overrides, n, f = cell_overrides(args, rule, attack)
                cfg = compose_config([*overrides, f"output_dir={tmp}", f"run_id={rule}-{attack}"])
                byz = byzantine_indices(cfg.attack, n)
                assert not set(byz) & set(range(len(honest))), (rule, attack, byz)
                start = time.perf_counter()
                result = run_cell(cfg, honest)
                seconds = time.perf_counter() - start
                row = {"rule": rule, "attack": attack, "hospitals": n, "f": len(byz), **result, "seconds": seconds}
                rows.append(row)
                print(f"[{len(rows):2d}/{total}] {rule:>13} x {attack:<9} n={n} byzantine={len(byz)} "
                      f"dice {result['dice']:.3f} (worst honest {result['worst_dice']:.3f}) "
                      f"{result['status']} in {seconds:.1f} s", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """Rules x attacks table of final Dice, the clean FedAvg reference and the robust row's gaps."""
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    cell = {(r["rule"], r["attack"]): r for r in rows}
    n0 = args.hospitals
    lines = ["| rule \\ attack | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
    for rule in rules:
        label = rule
        widest = max((cell[(rule, a)]["hospitals"] for a in attacks if (rule, a) in cell), default=n0)
        if widest != n0:
            label += f" (n={widest})"
        values = []
        for a in attacks:
            r = cell.get((rule, a))
            values.append("—" if r is None else f"{r['dice']:.3f}" + ("†" if r["status"] != "completed" else ""))
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    notes = [f"Final global-model Dice (example-weighted mean over the {n0 - byzantine_count(n0)} hospitals "
             f"honest in every cell, h00..h{n0 - byzantine_count(n0) - 1:02d}); n={n0}, "
             f"f={byzantine_count(n0)} Byzantine (the last ones)."]
    if any(r["hospitals"] != n0 for r in rows):
        notes.append("A rule marked (n=…) needs more hospitals for this f (Bulyan: n >= 4f+3); its extra "
                     "hospitals are honest and not among those evaluated.")
    if any(r["status"] != "completed" for r in rows):
        notes.append("† the federation stopped early (too few usable updates); the value is its last model.")
    clean = cell.get(("fedavg", "none"))
    if clean is not None:
        notes.append(f"Clean reference (FedAvg, no attack): {clean['dice']:.3f}.")
        if any(r["rule"] == "robust" for r in rows):
            gaps = {a: clean["dice"] - cell[("robust", a)]["dice"] for a in attacks if ("robust", a) in cell}
            worst = max(gaps, key=gaps.get)
            met = gaps[worst] <= 0.03
            notes.append("`strategy=robust` vs clean FedAvg, Dice points below: "
                         + ", ".join(f"{a} {100 * g:+.1f}" for a, g in gaps.items())
                         + f"; worst {worst} {100 * gaps[worst]:.1f} -> goal (<= 3 points under every attack) "
                         + ("MET" if met else "NOT MET") + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def heatmap(rows: list[dict], path: Path) -> None:
    """Rules x attacks heatmap of final Dice with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(dict.fromkeys(r["rule"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    cell = {(r["rule"], r["attack"]): r["dice"] for r in rows}
    grid = torch.tensor([[cell.get((r, a), float("nan")) for a in attacks] for r in rules]).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2.5, 0.5 * len(rules) + 1.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(rules)), rules)
    for i in range(len(rules)):
        for j in range(len(attacks)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="final Dice (honest hospitals)")
    ax.set_title("CareFL robustness matrix: final Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_rows(path: Path) -> list[dict]:
    """The cells of a CSV this script wrote (numbers parsed back)."""
    with open(path, newline="") as fh:
        return [{**r, "hospitals": int(r["hospitals"]), "f": int(r["f"]), "dice": float(r["dice"]),
                 "worst_dice": float(r["worst_dice"]), "rounds": int(r["rounds"]), "seconds": float(r["seconds"])}
                for r in csv.DictReader(fh)]


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` cells with those re-run in ``new`` replaced in place; new cells appended."""
    fresh = {(r["rule"], r["attack"]): r for r in new}
    out = [fresh.pop((r["rule"], r["attack"]), r) for r in old]
    return out + list(fresh.values())


def write_outputs(rows: list[dict], args: argparse.Namespace) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{STEM}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "dice": f"{r['dice']:.4f}", "worst_dice": f"{r['worst_dice']:.4f}",
                             "seconds": f"{r['seconds']:.1f}"})
    table = markdown(rows, args)
    (args.out / f"{STEM}.md").write_text(table)
    heatmap(rows, args.out / f"{STEM}.png")
    return table


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Optimal order")
    started = time.perf_counter()
    rows = run_matrix(args)
    if args.update and (args.out / f"{STEM}.csv").is_file():
        rows = merged(read_rows(args.out / f"{STEM}.csv"), rows)
    table = write_outputs(rows, args)
    print()
    print(table)
    print(f"wrote {args.out / STEM}.csv/.md/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(ARGS)
