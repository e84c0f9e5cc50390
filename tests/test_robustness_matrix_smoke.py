"""benchmarks/robustness_matrix.py: the --tiny matrix runs end to end and writes its table.

No timed assertions: only the CSV's rows and columns, Dice values in [0, 1], the markdown
table and the heatmap; plus how a cell is configured (Bulyan's extra hospital, f).
"""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

from carefl.attacks import byzantine_indices
from carefl.config import compose_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "robustness_matrix.py"


def _module():
    spec = importlib.util.spec_from_file_location("robustness_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_matrix_writes_csv_markdown_and_heatmap(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "robustness_matrix.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["task", "alpha", "seed", "rule", "attack", "hospitals", "f", "metric", "score", "worst",
                             "rounds", "status", "seconds"]
    assert [(r["rule"], r["attack"]) for r in rows] == [
        ("fedavg", "none"), ("fedavg", "signflip"), ("median", "none"), ("median", "signflip")]
    for r in rows:
        assert (r["task"], r["alpha"], r["seed"], r["metric"]) == ("seg", "own", "0", "dice")
        assert 0.0 <= float(r["worst"]) <= float(r["score"]) <= 1.0, r
        assert r["hospitals"] == "10" and r["rounds"] == "1" and r["status"] == "completed"
        assert r["f"] == ("0" if r["attack"] == "none" else "2")
    table = (tmp_path / "robustness_matrix.md").read_text()
    assert "| fedavg |" in table and "| median |" in table and "Clean reference (FedAvg, no attack)" in table
    assert table.splitlines()[0] in proc.stdout  # the table is printed too
    assert (tmp_path / "robustness_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_classification_cells_run_on_label_skewed_digits_files(tmp_path):
    """--tasks cls: real images (scikit-learn's digits) split by Dirichlet(alpha), read from npz."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--tasks", "cls", "--alphas", "0.5",
                           "--rules", "fedavg,fedavg_honest,robust", "--attacks", "none,ipm", "--label", "cand",
                           "--stem", "het", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "het.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["rule"], r["attack"], r["metric"], r["alpha"]) for r in rows] == [
        ("fedavg", "none", "accuracy", "0.5"), ("fedavg", "ipm", "accuracy", "0.5"),
        ("fedavg_honest", "none", "accuracy", "0.5"),  # the reference runs without attack only
        ("cand", "none", "accuracy", "0.5"), ("cand", "ipm", "accuracy", "0.5")]
    for r in rows:
        assert 0.0 <= float(r["worst"]) <= float(r["score"]) <= 1.0 and r["status"] == "completed", r
    table = (tmp_path / "het.md").read_text()
    assert "**cls, Dirichlet alpha=0.5**" in table and "`cand` vs clean FedAvg" in table and "Worst cell: cls" in table
    assert "`cand` vs honest-only FedAvg" in table and "Honest-only FedAvg: " in table


def test_the_honest_only_reference_keeps_the_data_split_but_drops_the_attackers():
    rm = _module()
    overrides, n, f = rm.cell_overrides(rm.parse_args([]), rm.ORACLE, "none", "cls")
    cfg = compose_config(overrides)
    assert (n, f) == (10, 2) and list(cfg.federation.hospitals) == [f"h{i:02d}" for i in range(8)]
    assert cfg.strategy.name == "fedavg"


def test_a_segmentation_only_alpha_is_refused_for_classification():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tasks", "cls", "--alphas", "own"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give cls numeric Dirichlet alphas" in proc.stderr


def test_cells_use_f_of_20_percent_and_bulyan_gets_its_hospitals():
    rm = _module()
    args = rm.parse_args([])
    overrides, n, f = rm.cell_overrides(args, "bulyan", "alie")
    assert (n, f) == (13, 2)  # 4f+3 usable after the norm bound leaves f attackers out
    cfg = compose_config(overrides)
    assert cfg.strategy.f == 2 and len(cfg.federation.hospitals) == 13
    assert byzantine_indices(cfg.attack, n) == [11, 12]  # h00..h07, evaluated everywhere, stay honest
    overrides, n, f = rm.cell_overrides(args, "fedavg", "none")
    cfg = compose_config(overrides)
    assert (n, f) == (10, 2) and cfg.strategy.f == 0 and byzantine_indices(cfg.attack, n) == []
    cfg = compose_config(rm.cell_overrides(args, "robust", "signflip")[0])
    assert cfg.strategy.f == 2 and byzantine_indices(cfg.attack, 10) == [8, 9]


def test_deploy_scores_the_fine_tuned_or_the_better_model_of_each_honest_hospital(tmp_path, monkeypatch):
    """--deploy finetune | best: the cell runs personalization=finetune; its score is the
    example-weighted mean over the honest hospitals of their personal (fine-tuned) accuracy,
    or of the better of global and personal per hospital; the federation is run once and
    scored three ways."""
    import json

    rm = _module()
    args = rm.parse_args(["--tiny", "--tasks", "cls", "--alphas", "0.5", "--deploy", "best"])
    overrides, n, _ = rm.cell_overrides(args, "robust", "signflip", "cls")
    overrides += rm.data_overrides("cls", "0.5", 0, n, args, tmp_path)
    cfg = compose_config([*overrides, f"output_dir={tmp_path / 'out'}", "run_id=cell"])
    assert cfg.personalization.name == "finetune"
    honest = rm.hospital_names(n)[:8]
    run_dir = rm.run_federation(rm.LocalTransport(n), cfg)
    monkeypatch.setattr(rm, "run_federation", lambda transport, cfg: run_dir)  # score the same run again
    final = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["eval"]
    weights = [final[h]["num_examples"] for h in honest]
    for deploy, value in (("global", lambda m: m["accuracy"]), ("finetune", lambda m: m["personal_accuracy"]),
                          ("best", lambda m: max(m["accuracy"], m["personal_accuracy"]))):
        result = rm.run_cell(cfg, honest, "accuracy", deploy)
        expected = sum(value(final[h]) * w for h, w in zip(honest, weights)) / sum(weights)
        assert abs(result["score"] - expected) < 1e-12, deploy
        assert result["worst"] == min(value(final[h]) for h in honest)
    assert rm.cell_overrides(rm.parse_args(["--tiny"]), "robust", "none")[0].count("personalization=none") == 1
