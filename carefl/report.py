"""The run report: ``metrics.json`` and PNG plots in the run directory.

``metrics.json`` layout (all numbers are plain floats)::

    {"run_id", "task", "headline": "dice"|"auc", "metrics": [names, carefl.tasks.metric_names],
     "hospitals": [...], "status", "message",
     "rounds": [{"round": r,
                 "train":  {hospital: {"status", "reason", "train_loss", "num_examples",
                                       "steps", "epsilon", "delta", ...}},
                 "robust": {hospital: {"norm", "cosine", "score", "selected", "reputation"}},
                 "eval":   {hospital: {"dice" (+ "dice_c" per class) | "auc", "accuracy",
                              "num_examples"}},
                 "aggregate": {"dice" | "auc", "accuracy", "train_loss"},
                 "timing": {"train_phase_seconds", "aggregate_seconds", "eval_phase_seconds",
                            "checkpoint_seconds", "round_seconds"}}],
     "baselines": {"local_only": {trained_at: {evaluated_at: {metric: v}}},
                   "pooled": {evaluated_at: {metric: v}}}}

Plots (``plots/``): one PNG per metric (per hospital per round, baselines dashed), epsilon
per hospital, and the robust signals (update norm, cosine, reputation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from carefl.checkpoint import atomic_write_text
from carefl.tasks import HEADLINE, metric_names


def _weighted_mean(values: dict[str, dict[str, float]], key: str) -> float:
    pairs = [(m[key], m.get("num_examples", 1.0)) for m in values.values() if key in m and not math.isnan(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


class Report:
    """Accumulates per-round records and writes them (atomically) to ``run_dir``."""

    def __init__(self, run_dir: Path, cfg):
        self.run_dir = Path(run_dir)
        self.metric_names = metric_names(cfg.task)
        self.data = {
            "run_id": self.run_dir.name,
            "task": cfg.task.name,
            "headline": HEADLINE[cfg.task.kind],
            "metrics": list(self.metric_names),
            "hospitals": list(cfg.federation.hospitals),
            "status": "running",
            "message": "",
            "rounds": [],
            "baselines": {},
        }

    def _round(self, server_round: int) -> dict:
        rounds = self.data["rounds"]
        if not rounds or rounds[-1]["round"] != server_round:
            rounds.append({"round": server_round, "train": {}, "robust": {}, "eval": {}, "aggregate": {}})
        return rounds[-1]

    def add_round(self, server_round: int, replies, robust_record: dict, rejected: dict[str, str]) -> None:
        """Training replies (accepted or not) and the robust signals of the accepted ones."""
        record = self._round(server_round)
        for reply in replies:
            status = "rejected" if reply.hospital in rejected and reply.status == "ok" else reply.status
            record["train"][reply.hospital] = {
                "status": status, "reason": rejected.get(reply.hospital), **reply.metrics,
            }
        record["robust"] = robust_record
        record["aggregate"]["train_loss"] = _weighted_mean(
            {h: m for h, m in record["train"].items() if m["status"] == "ok"}, "train_loss"
        )

    def add_evaluation(self, server_round: int, evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-hospital test metrics; returns the example-weighted aggregate."""
        record = self._round(server_round)
        record["eval"] = evaluations
        for name in self.metric_names:
            record["aggregate"][name] = _weighted_mean(evaluations, name)
        return record["aggregate"]

    def add_timing(self, server_round: int, timing: dict[str, float]) -> None:
        """Server-side wall times of the round's phases (seconds); written with the next save."""
        self._round(server_round)["timing"] = dict(timing)

    def add_baselines(self, baselines: dict) -> None:
        self.data["baselines"] = baselines

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.data))

    def load_state_dict(self, state: dict) -> None:
        self.data = json.loads(json.dumps(state))
        self.data["status"] = "running"

    def save(self) -> Path:
        path = self.run_dir / "metrics.json"
        atomic_write_text(path, json.dumps(self.data, indent=2, default=float, allow_nan=True))
        return path

    def summary(self) -> str:
        """Markdown table: the final federated model vs pooled and local-only baselines, per
        test split, with the mean over OTHER sites for each local-only model (what federation
        buys a hospital beyond its own data)."""
        key, names = self.data["headline"], self.data["hospitals"]
        final = self.data["rounds"][-1]["eval"] if self.data["rounds"] else {}

        def mean(values: dict, sites: list[str]) -> str:
            found = [values[h][key] for h in sites if h in values]
            return f"{sum(found) / len(found):.3f}" if found else "-"

        def row(label: str, values: dict, own: str | None = None) -> str:
            cells = [f"{values[h][key]:.3f}" if h in values else "-" for h in names]
            others = [h for h in names if h != own]
            off = [mean(values, others), mean(final, others)] if own else ["-", "-"]
            return f"| {label} | " + " | ".join(cells + off) + " |"

        lines = [f"{key} on each hospital's test split (status: {self.data['status']})", "",
                 "| model | " + " | ".join(names) + " | mean on the other sites | federated on those sites |",
                 "|---|" + "---|" * (len(names) + 2), row("federated (final)", final)]
        baselines = self.data["baselines"]
        if baselines.get("pooled"):
            lines.append(row("pooled (centralised)", baselines["pooled"]))
        for trained_at, values in baselines.get("local_only", {}).items():
            lines.append(row(f"local-only {trained_at}", values, own=trained_at))
        per_class = [m for m in self.metric_names if m.startswith("dice_")]
        if per_class and final:  # K-class segmentation: each foreground class of the final model
            lines += ["", "per-class Dice of the final federated model", "",
                      "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {m[len('dice_'):]} | " + " | ".join(f"{final[h][m]:.3f}" if h in final else "-"
                                                              for h in names) + " |" for m in per_class]
        return "\n".join(lines) + "\n"

    def finish(self, status: str, message: str = "") -> str:
        """Save metrics.json, ``summary.md`` and the plots; return the summary table."""
        self.data["status"], self.data["message"] = status, message
        self.save()
        summary = self.summary()
        atomic_write_text(self.run_dir / "summary.md", summary)
        from carefl.plots import plot_run  # matplotlib only when a run ends

        plot_run(self.data, self.run_dir / "plots")
        return summary
