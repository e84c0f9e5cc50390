"""PNG plots of a run from its ``metrics.json`` data (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rounds: list[dict], section: str, hospital: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in rounds:
        value = record.get(section, {}).get(hospital, {}).get(key)
        if isinstance(value, (int, float)):
            xs.append(record["round"])
            ys.append(float(value))
    return xs, ys


def _per_hospital_plot(data: dict, section: str, key: str, title: str, path: Path, baselines: bool = False) -> Path | None:
    rounds = data["rounds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for i, hospital in enumerate(data["hospitals"]):
        xs, ys = _series(rounds, section, hospital, key)
        if not xs:
            continue
        color = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", color=color, label=f"{hospital} (federated)" if baselines else hospital)
        drawn = True
        if key == "epsilon":  # the hospital's own cap (its site policy)
            caps = _series(rounds, section, hospital, "epsilon_cap")[1]
            if caps:
                ax.axhline(caps[-1], color=color, linestyle="--", linewidth=1, label=f"{hospital} cap")
        if baselines:
            local = data["baselines"].get("local_only", {}).get(hospital, {}).get(hospital, {}).get(key)
            if local is not None:
                ax.axhline(local, color=color, linestyle="--", linewidth=1, label=f"{hospital} local-only")
    pooled = data["baselines"].get("pooled", {}) if baselines else {}
    pooled_values = [m[key] for m in pooled.values() if key in m]
    if pooled_values:
        ax.axhline(sum(pooled_values) / len(pooled_values), color="black", linestyle=":", label="pooled (mean)")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(data: dict, out_dir: Path) -> list[Path]:
    """Write ``<metric>.png`` (+ baselines), ``epsilon.png``, ``train_loss.png`` and robust
    signal plots into ``out_dir``; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_keys = data.get("metrics") or (["dice"] if data["headline"] == "dice" else ["auc", "accuracy"])
    jobs = [("eval", k, f"{k} per hospital (test split)", True) for k in metric_keys]
    jobs += [
        ("train", "train_loss", "local training loss", False),
        ("train", "epsilon", "privacy spent: epsilon per hospital", False),
        ("robust", "norm", "update L2 norm", False),
        ("robust", "cosine", "cosine(update, aggregate)", False),
        ("robust", "reputation", "reputation", False),
    ]
    written = []
    for section, key, title, baselines in jobs:
        path = _per_hospital_plot(data, section, key, title, out_dir / f"{key}.png", baselines)
        if path:
            written.append(path)
    gains = {h: e["gain"] for h, e in (data.get("sites") or {}).get("per_site", {}).items() if "gain" in e}
    if gains:
        written.append(_gain_plot(gains, data["headline"], out_dir / "gain_from_joining.png"))
    return written


def _gain_plot(gains: dict[str, float], metric: str, path: Path) -> Path:
    """Bar per hospital: deployed model minus its local-only model, on its own test split."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(gains) + 2), 3.5))
    names = list(gains)
    ax.bar(names, [gains[h] for h in names], color=["tab:green" if gains[h] >= 0 else "tab:red" for h in names])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"{metric}: deployed - local-only")
    ax.set_title("gain from joining (own test split)", fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
