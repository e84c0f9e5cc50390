"""Robustness matrix: the final model of every aggregation rule under every simulated attack,
on segmentation and classification consortia at several heterogeneity levels.

One cell = one federation (``strategy=<rule>``, ``attack=<attack>``) of ``--hospitals``
hospitals (h00, h01, ...) for one (task, heterogeneity alpha, seed). Byzantine hospitals are
the last f = round(0.2 n) (``attack.byzantine``: n=10 -> f=2, h08 and h09; a row that needs
more hospitals keeps f and makes its last f Byzantine), and every rule that uses
``strategy.f`` gets ``strategy.f=f``. Bulyan needs n >= 4f+3 = 11 usable updates for f=2,
and the norm bound leaves the gaussian and scaling attackers out, so its row runs with three
extra honest hospitals (n=13, still f=2: 15 %); the table says so.

Tasks (``--tasks``):

* ``seg`` -- the synthetic lesion-segmentation consortium (``carefl.data.synthetic``, UNet,
  32x32, 80 training images x the site's size scale, 32 test images; 10 rounds x 2 local
  epochs: clean FedAvg reaches Dice ~0.89). Heterogeneity alpha: ``own`` = hospital i images
  every patient on its own scanner (the default consortium); a number = each hospital's
  scanner mix ~ Dirichlet(alpha) over 10 scanner profiles (``data.site_mix_alpha``).
* ``cls`` -- a real-image classification consortium: scikit-learn's handwritten digits (1797
  real 8x8 scans, 10 classes; shipped inside the scikit-learn wheel, so nothing is downloaded;
  ``pip install -e ".[test]"``), pooled, split 75/25 into train/test once (seed 0), then every
  class is split across the hospitals by Dirichlet(alpha) (``carefl.data.partition``, the
  label skew of the FL literature; the same shares cut each hospital's test split) and written
  as one MedMNIST-format .npz per hospital, read through ``data=medmnist``. MONAI classifier
  CNN, 10 rounds x 3 local epochs. A row with more hospitals (Bulyan) splits the pool among
  its n hospitals, so its evaluated patients differ from the other rows'.

The cell's value is the example-weighted mean metric (Dice | accuracy) of the FINAL global
model over the test splits of the hospitals that are honest in every cell (h00..h07 for
n=10); ``worst`` is the lowest of them. With several seeds (``--seeds``: data, partition,
model init and batches all follow the seed) the tables show the mean over seeds. With
``--deploy finetune`` every cell runs ``personalization=finetune`` and scores each honest
hospital's own copy of the final global model, fine-tuned on its own training split
(``personal_<metric>``; the FedAvg references are fine-tuned the same way); with ``--deploy
best``, what the run's report says each hospital deploys: the better of the global and the
fine-tuned model on its own test split (:meth:`carefl.report.Report.sites`; optimistic by that
choice of two).

How rounds run: through the one round loop, ``carefl.rounds.run_federation`` -- the code the
ServerApp and ``carefl-sim`` run -- over the in-process transport
(``carefl.local_transport.LocalTransport``): every request and reply crosses the same
schema checks, site policies and signed receipts as under Flower, and the transport is
simulated, so the server-side attacks apply. Flower itself (``carefl-sim -m``) is not used:
its Ray workers cost seconds per round and memory per hospital, which 2 shared cores cannot
afford for hundreds of federations.

Defaults: ``privacy=none`` (DP noise at these tiny dataset sizes would hide the rules'
differences; ``--privacy dp`` turns it on), no baselines, one torch thread: ~20 s per
segmentation cell, ~5 s per classification cell.

Outputs in ``--out`` (default benchmarks/results/): ``<stem>.csv`` (one row per cell),
``<stem>.md`` (one table per task and alpha, and the robust rule's gap to clean FedAvg),
``<stem>.png`` (heatmaps). ``--stem`` names them (default robustness_matrix).

Usage:
    python benchmarks/robustness_matrix.py                      # the rule matrix (10 rules x 7 attacks, seg, own)
    python benchmarks/robustness_matrix.py --tasks seg,cls --alphas 0.1,0.5,1,100 --seeds 0,1,2 \
        --rules fedavg,robust --stem heterogeneity                 # the heterogeneity study
    python benchmarks/robustness_matrix.py --rules robust --set 'strategy.pre=[{name:nnm}]' --label nnm_tm
    python benchmarks/robustness_matrix.py --tasks cls --alphas 0.1 --seeds 0,1,2 --rules fedavg,robust \
        --deploy best --stem heterogeneity_cls_deployed       # what the hospitals deploy
    python benchmarks/robustness_matrix.py --tiny --out /tmp/rm  # smoke: 2 rules x 2 attacks, 1 round
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "centered_clip", "cosine_filter",
         "robust")
ATTACKS = ("none", "signflip", "gaussian", "scaling", "labelflip", "alie", "ipm")
FRACTION = 0.2  # f = round(0.2 n) of the --hospitals n are Byzantine (the last ones)
#: rules that need more hospitals than --hospitals for f = round(0.2 n): rule -> n(f)
#: Bulyan needs n >= 4f+3 usable updates; updates the norm bound leaves out
#: (federation.max_update_norm_ratio: the gaussian and scaling attackers) no longer count, so its
#: row gets f spare honest hospitals: n = 5f+3 (13 for f=2)
MIN_HOSPITALS = {"bulyan": lambda f: 5 * f + 3}
#: task -> (its metric, rounds, local epochs, Hydra overrides besides the data)
TASKS = {
    "seg": ("dice", 10, 2, ["task=seg2d", "data=synthetic"]),
    "cls": ("accuracy", 10, 3, ["task=cls2d", "task.num_classes=10", "model=classifier", "data=medmnist"]),
}
#: a reference, not a rule: FedAvg over the hospitals that are honest in the attacked cells only
#: (the data partition is the same; the last f hospitals just never join). The best any rule can
#: do once the attackers' data is lost; run for attack=none only.
ORACLE = "fedavg_honest"
OWN = "own"  # seg: every hospital on its own scanner (no Dirichlet mix)
COLUMNS = ("task", "alpha", "seed", "rule", "attack", "hospitals", "f", "metric", "score", "worst",
           "rounds", "status", "seconds")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 1 round, 16x16 images, 8 training images; fedavg,median x none,signflip "
                        "unless --rules / --attacks say otherwise")
    p.add_argument("--tasks", default="seg", help="comma-separated: seg (synthetic segmentation), cls (digits)")
    p.add_argument("--alphas", default=OWN,
                   help="comma-separated heterogeneity levels: Dirichlet alphas, or 'own' (seg only)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--rules", help=f"comma-separated strategy names, and/or {ORACLE} (default: all {len(RULES)} rules)")
    p.add_argument("--attacks", help="comma-separated attack names (default: all 7)")
    p.add_argument("--label", default=None,
                   help="the name the cells of the rules other than fedavg get (a candidate pipeline's name)")
    p.add_argument("--hospitals", type=int, default=10, help="hospitals n (f = round(0.2 n) are Byzantine)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: 10 for both tasks)")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs (default: seg 2, cls 3)")
    p.add_argument("--n-train", type=int, default=80, help="seg: data.n_train (x each site's size scale)")
    p.add_argument("--n-test", type=int, default=32, help="seg: data.n_test")
    p.add_argument("--image-size", type=int, default=32, help="seg: data.image_size")
    p.add_argument("--privacy", choices=("none", "dp"), default="none")
    p.add_argument("--deploy", choices=("global", "finetune", "best"), default="global",
                   help="what a cell scores: the final global model (default); each honest hospital's personal "
                        "copy of it, fine-tuned on its own training split (finetune: personalization=finetune in "
                        "every row, the FedAvg references included); or per hospital the better of the two on its "
                        "own test split (best: what the report says it deploys)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every cell (repeatable), e.g. strategy.pre.1.tau=2.0")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    p.add_argument("--stem", default="robustness_matrix", help="output file names: <stem>.csv/.md/.png")
    p.add_argument("--update", action="store_true",
                   help="keep the other cells of an existing CSV in --out; re-run and replace only these")
    args = p.parse_args(argv)
    args.rules = args.rules or ("fedavg,median" if args.tiny else ",".join(RULES))
    args.attacks = args.attacks or ("none,signflip" if args.tiny else ",".join(ATTACKS))
    if args.tiny:
        args.rounds, args.n_train, args.n_test, args.image_size = 1, 8, 4, 16
    for task in args.tasks.split(","):
        if task not in TASKS:
            p.error(f"--tasks: {task!r} is not one of {sorted(TASKS)}")
    for alpha in args.alphas.split(","):
        if alpha != OWN and not _positive_float(alpha):
            p.error(f"--alphas: {alpha!r} must be a positive number or '{OWN}'")
        if alpha == OWN and "cls" in args.tasks.split(","):
            p.error(f"--alphas {OWN} is a segmentation consortium; give cls numeric Dirichlet alphas, e.g. 0.1,0.5,1,100")
    return args


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0 and math.isfinite(float(text))
    except ValueError:
        return False


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from carefl.attacks import byzantine_indices  # noqa: E402
from carefl.config import compose_config  # noqa: E402
from carefl.data.partition import dirichlet_split, write_parts  # noqa: E402
from carefl.local_transport import LocalTransport  # noqa: E402
from carefl.rounds import run_federation  # noqa: E402


def hospital_names(n: int) -> list[str]:
    return [f"h{i:02d}" for i in range(n)]


def byzantine_count(n: int) -> int:
    """f = round(0.2 n), half up: how many of n hospitals are Byzantine."""
    return math.floor(FRACTION * n + 0.5)


def digits_pool() -> dict:
    """scikit-learn's digits as a pooled MedMNIST-format dict: uint8 (N, 8, 8) images in
    [0, 255] (the 0..16 ink counts x 16), labels (N,); a fixed 75/25 train/test split (seed 0)."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit('--tasks cls reads scikit-learn\'s digits: pip install -e ".[test]"') from e
    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    perm = np.random.default_rng(0).permutation(len(images))
    cut = int(0.75 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    return {"train_images": images[tr], "train_labels": digits.target[tr].astype(np.int64),
            "test_images": images[te], "test_labels": digits.target[te].astype(np.int64)}


def data_overrides(task: str, alpha: str, seed: int, n: int, args: argparse.Namespace, folder: Path) -> list[str]:
    """The data half of a cell's overrides; cls writes its hospitals' npz files into ``folder``."""
    if task == "seg":
        return [f"data.n_train={args.n_train}", f"data.n_test={args.n_test}", f"data.image_size={args.image_size}",
                f"data.site_mix_alpha={'null' if alpha == OWN else float(alpha)}"]
    pool = digits_pool()
    names = hospital_names(n)
    train, test = dirichlet_split(pool["train_labels"], pool["test_labels"], n, float(alpha), seed)
    files = write_parts(pool, folder / f"cls-a{alpha}-s{seed}-n{n}", names, train, test)
    return ["+data.files={" + ",".join(f"{h}:'{path}'" for h, path in files.items()) + "}"]


def cell_overrides(args: argparse.Namespace, rule: str, attack: str, task: str = "seg") -> tuple[list[str], int, int]:
    """Hydra overrides of one cell (all but the data), its hospital count n (the data is split
    among n hospitals) and Byzantine count f. The ``ORACLE`` row keeps n's data split but only
    the first n - f hospitals join."""
    n = args.hospitals
    f = byzantine_count(n)
    if rule in MIN_HOSPITALS:
        n = max(n, MIN_HOSPITALS[rule](f))
    _, rounds, epochs, task_overrides = TASKS[task]
    joining = hospital_names(n)[: n - f] if rule == ORACLE else hospital_names(n)
    overrides = [
        *task_overrides, f"strategy={'fedavg' if rule == ORACLE else rule}", f"attack={attack}",
        f"federation.hospitals=[{','.join(joining)}]",
        f"federation.rounds={args.rounds or rounds}", f"federation.local_epochs={args.local_epochs or epochs}",
        "federation.baselines=false", f"privacy={args.privacy}",
        f"personalization={'none' if args.deploy == 'global' else 'finetune'}",
    ]
    if rule not in ("fedavg", ORACLE):  # the plain mean tolerates no Byzantine hospital: its f stays 0
        overrides.append(f"strategy.f={f}")
    if attack != "none":  # the last f hospitals, whatever n this row needs
        overrides.append(f"attack.byzantine=[{','.join(str(i) for i in range(n - f, n))}]")
    return overrides + list(args.set), n, f


def run_cell(cfg, honest: list[str], metric: str, deploy: str = "global") -> dict:
    """One federation through ``carefl.rounds.run_federation`` (in-process transport).

    Returns ``score`` (example-weighted mean over ``honest`` of each hospital's value of
    ``metric`` in the last evaluated round: the global model's, its fine-tuned copy's
    ``personal_<metric>`` for ``deploy="finetune"``, the better of the two for ``"best"``),
    ``worst`` (lowest of them), ``rounds`` completed and ``status`` (completed | stopped).
    """
    value = {"global": lambda m: m[metric], "finetune": lambda m: m[f"personal_{metric}"],
             "best": lambda m: max(m[metric], m[f"personal_{metric}"])}[deploy]
    run_dir = run_federation(LocalTransport(len(cfg.federation.hospitals)), cfg)
    record = json.loads((run_dir / "metrics.json").read_text())
    evaluated = [r for r in record["rounds"] if r["eval"]]
    final = {h: evaluated[-1]["eval"][h] for h in honest} if evaluated else {}
    total = sum(m["num_examples"] for m in final.values())
    score = sum(value(m) * m["num_examples"] for m in final.values()) / total if total else float("nan")
    worst = min((value(m) for m in final.values()), default=float("nan"))
    return {"score": score, "worst": worst, "rounds": len(evaluated), "status": record["status"]}


def run_matrix(args: argparse.Namespace) -> list[dict]:
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    groups = [(t, a, int(s)) for t in args.tasks.split(",") for a in args.alphas.split(",")
              for s in args.seeds.split(",")]
    n0 = args.hospitals
    honest = hospital_names(n0)[: n0 - byzantine_count(n0)]  # honest in every cell
    per_group = sum(int("none" in attacks) if r == ORACLE else len(attacks) for r in rules)
    rows, total = [], len(groups) * per_group
    with tempfile.TemporaryDirectory(prefix="carefl-matrix-") as tmp:
        for task, alpha, seed in groups:
            metric = TASKS[task][0]
            for rule in rules:
                for attack in attacks:
                    if rule == ORACLE and attack != "none":
                        continue
                    overrides, n, f = cell_overrides(args, rule, attack, task)
                    overrides += data_overrides(task, alpha, seed, n, args, Path(tmp))
                    cfg = compose_config([*overrides, f"seed={seed}", f"output_dir={tmp}",
                                          f"run_id={task}-{alpha}-{seed}-{rule}-{attack}"])
                    byz = byzantine_indices(cfg.attack, n)
                    assert not set(byz) & set(range(len(honest))), (rule, attack, byz)
                    start = time.perf_counter()
                    result = run_cell(cfg, honest, metric, args.deploy)
                    seconds = time.perf_counter() - start
                    label = args.label if rule not in ("fedavg", ORACLE) and args.label else rule
                    row = {"task": task, "alpha": alpha, "seed": seed, "rule": label, "attack": attack,
                           "hospitals": n, "f": len(byz), "metric": metric, **result, "seconds": seconds}
                    rows.append(row)
                    print(f"[{len(rows):3d}/{total}] {task} alpha={alpha} seed={seed} {label:>13} x {attack:<9} "
                          f"n={n} byzantine={len(byz)} {metric} {result['score']:.3f} "
                          f"(worst honest {result['worst']:.3f}) {result['status']} in {seconds:.1f} s", flush=True)
    return rows


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(rows: list[dict]) -> dict:
    """{(task, alpha): {(rule, attack): {"mean", "min", "seeds", "hospitals", "stopped"}}}: seeds averaged."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault((r["task"], r["alpha"]), {}).setdefault(
            (r["rule"], r["attack"]), {"scores": [], "hospitals": r["hospitals"], "stopped": False})
        cell["scores"].append(r["score"])
        cell["stopped"] |= r["status"] != "completed"
    for cells in out.values():
        for cell in cells.values():
            cell.update(mean=_mean(cell["scores"]), min=min(cell["scores"]), seeds=len(cell["scores"]))
    return out


def gaps(rows: list[dict], rule: str = "robust", reference: str = "fedavg") -> list[dict]:
    """Per (task, alpha, attack): ``reference`` without attack minus ``rule`` (points of the
    metric), as the mean over seeds and as the worst single seed. Empty without both rows."""
    clean = {(r["task"], r["alpha"], r["seed"]): r["score"] for r in rows
             if r["rule"] == reference and r["attack"] == "none"}
    by_key: dict = {}
    for r in rows:
        key = (r["task"], r["alpha"], r["seed"])
        if r["rule"] == rule and key in clean:
            by_key.setdefault((r["task"], r["alpha"], r["attack"]), []).append(100 * (clean[key] - r["score"]))
    return [{"task": t, "alpha": a, "attack": atk, "mean": _mean(g), "worst": max(g), "seeds": len(g)}
            for (t, a, atk), g in by_key.items()]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """One rules x attacks table per (task, alpha) (means over seeds), then the robust rule's gaps."""
    n0 = args.hospitals
    parts = []
    for (task, alpha), cells in summarise(rows).items():
        rules = list(dict.fromkeys(r for r, _ in cells))
        attacks = list(dict.fromkeys(a for _, a in cells))
        seeds = max(c["seeds"] for c in cells.values())
        metric = TASKS[task][0]
        het = "every hospital its own scanner" if alpha == OWN else f"Dirichlet alpha={alpha}"
        lines = [f"**{task}, {het}**: final {metric}"
                 + (f", mean over {seeds} seeds" if seeds > 1 else ""), "",
                 "| rule \\ attack | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
        for rule in rules:
            widest = max((cells[(rule, a)]["hospitals"] for a in attacks if (rule, a) in cells), default=n0)
            label = rule + (f" (n={widest})" if widest != n0 else "")
            values = []
            for a in attacks:
                c = cells.get((rule, a))
                values.append("—" if c is None else f"{c['mean']:.3f}" + ("†" if c["stopped"] else ""))
            lines.append(f"| {label} | " + " | ".join(values) + " |")
        clean, oracle = cells.get(("fedavg", "none")), cells.get((ORACLE, "none"))
        if clean is not None:
            lines += ["", f"Clean reference (FedAvg, no attack): {clean['mean']:.3f}."
                      + (f" Honest-only FedAvg: {oracle['mean']:.3f}." if oracle else "")]
        parts.append("\n".join(lines))
    model = {"global": "global-model", "finetune": "fine-tuned personal models'",
             "best": "deployed models' (per hospital the better of global and fine-tuned)"}[args.deploy]
    notes = [f"Final {model} {'/'.join(sorted({r['metric'] for r in rows}))} (example-weighted mean over the "
             f"{n0 - byzantine_count(n0)} hospitals honest in every cell, h00..h{n0 - byzantine_count(n0) - 1:02d}); "
             f"n={n0}, f={byzantine_count(n0)} Byzantine (the last ones)."]
    if any(r["hospitals"] != n0 for r in rows):
        notes.append("A rule marked (n=…) needs more hospitals for this f (Bulyan: n >= 4f+3); its extra "
                     "hospitals are honest and not among those evaluated.")
    if any(r["status"] != "completed" for r in rows):
        notes.append("† the federation stopped early (too few usable updates); the value is its last model.")
    robust = args.label or "robust"
    for reference, what in (("fedavg", "clean FedAvg (all n hospitals, no attack)"),
                            (ORACLE, f"honest-only FedAvg ({ORACLE}: the attackers' data never joins)")):
        gap = gaps(rows, robust, reference)
        if not gap:
            continue
        attacks = list(dict.fromkeys(g["attack"] for g in gap))
        table = [f"`{robust}` vs {what}, points below (mean over seeds; worst single seed in brackets):", "",
                 "| task | alpha | " + " | ".join(attacks) + " |", "|---|---|" + "---:|" * len(attacks)]
        for task, alpha in dict.fromkeys((g["task"], g["alpha"]) for g in gap):
            by = {g["attack"]: g for g in gap if (g["task"], g["alpha"]) == (task, alpha)}
            table.append(f"| {task} | {alpha} | " + " | ".join(
                f"{by[a]['mean']:+.1f} [{by[a]['worst']:+.1f}]" if a in by else "—" for a in attacks) + " |")
        worst = max(gap, key=lambda g: g["mean"])
        table += ["", f"Worst cell: {worst['task']}, alpha={worst['alpha']}, {worst['attack']}: "
                  f"{worst['mean']:.1f} points below {reference} (worst seed {worst['worst']:.1f}) -> goal "
                  f"(<= 3 points under every attack) {'MET' if worst['mean'] <= 3 else 'NOT MET'}."]
        notes.append("\n".join(table))
    return "\n\n".join(parts) + "\n\n" + "\n\n".join(notes) + "\n"


def heatmap(rows: list[dict], path: Path) -> None:
    """One rules x attacks heatmap per (task, alpha), seed means written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summarise(rows)
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(1.1 * len(ATTACKS) + 3, sum(0.5 * len({r for r, _ in c}) + 1.3 for c in groups.values())))
    for ax, ((task, alpha), cells) in zip(axes[:, 0], groups.items()):
        rules = list(dict.fromkeys(r for r, _ in cells))
        attacks = list(dict.fromkeys(a for _, a in cells))
        grid = torch.tensor([[cells[(r, a)]["mean"] if (r, a) in cells else float("nan") for a in attacks]
                             for r in rules]).numpy()
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_yticks(range(len(rules)), rules)
        for i in range(len(rules)):
            for j in range(len(attacks)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label=f"final {TASKS[task][0]}")
        ax.set_title(f"{task}, " + ("own scanners" if alpha == OWN else f"Dirichlet alpha={alpha}"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _key(r: dict) -> tuple:
    return r["task"], str(r["alpha"]), int(r["seed"]), r["rule"], r["attack"]


def read_rows(path: Path) -> list[dict]:
    """The cells of a CSV this script wrote (numbers parsed back)."""
    with open(path, newline="") as fh:
        return [{**r, "seed": int(r["seed"]), "hospitals": int(r["hospitals"]), "f": int(r["f"]),
                 "score": float(r["score"]), "worst": float(r["worst"]), "rounds": int(r["rounds"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(fh)]


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` cells with those re-run in ``new`` replaced in place; new cells appended."""
    fresh = {_key(r): r for r in new}
    out = [fresh.pop(_key(r), r) for r in old]
    return out + list(fresh.values())


def write_outputs(rows: list[dict], args: argparse.Namespace) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "score": f"{r['score']:.4f}", "worst": f"{r['worst']:.4f}",
                             "seconds": f"{r['seconds']:.1f}"})
    table = markdown(rows, args)
    (args.out / f"{args.stem}.md").write_text(table)
    heatmap(rows, args.out / f"{args.stem}.png")
    return table


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Optimal order")
    started = time.perf_counter()
    rows = run_matrix(args)
    if args.update and (args.out / f"{args.stem}.csv").is_file():
        rows = merged(read_rows(args.out / f"{args.stem}.csv"), rows)
    table = write_outputs(rows, args)
    print()
    print(table)
    print(f"wrote {args.out / args.stem}.csv/.md/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(ARGS)
