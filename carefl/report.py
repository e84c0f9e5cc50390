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
                   "pooled": {evaluated_at: {metric: v}}},
     "sites": see :meth:`Report.sites` (what joining bought each hospital; written at the end)}

Plots (``plots/``): one PNG per metric (per hospital per round, baselines dashed), epsilon
per hospital, and the robust signals (update norm, cosine, reputation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from carefl.checkpoint import atomic_write_text
from carefl.tasks import HEADLINE, metric_names
from carefl.tracking import MlflowView, Tracker, flat_params


def _weighted_mean(values: dict[str, dict[str, float]], key: str) -> float:
    pairs = [(m[key], m.get("num_examples", 1.0)) for m in values.values() if key in m and not math.isnan(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def _identity(cfg) -> dict[str, str]:
    """What a reader of ``report.html`` needs to know about how the run was set up."""
    fed, privacy, strategy = cfg.federation, cfg.privacy, cfg.strategy
    pre = " -> ".join(str(p["name"]) for p in strategy.get("pre") or [])
    rule = strategy.rule.name if "rule" in strategy else "?"
    dp = (f"DP-SGD (Opacus), target epsilon {privacy.target_epsilon} at delta {privacy.target_delta} unless a "
          f"hospital's own policy is stricter; per-sample clip {privacy.max_grad_norm}, accountant {privacy.accountant}"
          if privacy.enabled else "off: no differential privacy")
    data = cfg.data.name + (f", preset {cfg.data.preprocess}" if "preprocess" in cfg.data else "")
    return {
        "task": f"{cfg.task.name} ({cfg.task.kind}, {cfg.task.num_classes} class(es), {cfg.task.spatial_dims}D)",
        "model": cfg.model.name, "data": data, "hospitals": ", ".join(fed.hospitals),
        "strategy": f"{strategy.name}: " + (f"{pre} -> " if pre else "") + rule,
        "training": f"{fed.rounds} rounds x {fed.local_epochs} local epoch(s), batch {fed.batch_size}, "
                    f"{fed.optimizer} lr {fed.lr}",
        "privacy": dp,
        "personalization": str(cfg.personalization.name) if "personalization" in cfg else "none",
    }


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
        self.identity = _identity(cfg)
        mlflow = None
        if OmegaConf.select(cfg, "tracking.name", default="tensorboard") == "mlflow":
            mlflow = MlflowView(self.run_dir, cfg.tracking.uri, cfg.tracking.experiment,
                                flat_params(OmegaConf.to_container(cfg, resolve=False)))
        self.tracker = Tracker(self.run_dir, self.metric_names, mlflow)

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
        """Per-hospital test metrics; returns the example-weighted aggregate. A hospital's
        explanation gallery (checked PNGs, :class:`carefl.replies.EvalMetrics`) is written to
        ``gallery/<hospital>/<i>.png`` and listed in ``data["gallery"]`` for ``report.html``."""
        record = self._round(server_round)
        record["eval"] = {h: dict(m) for h, m in evaluations.items()}
        for h, m in evaluations.items():
            if getattr(m, "gallery", ()):
                self._write_gallery(h, m.gallery)
        for name in self.metric_names:
            record["aggregate"][name] = _weighted_mean(evaluations, name)
        return record["aggregate"]

    def _write_gallery(self, hospital: str, pngs) -> None:
        folder = self.run_dir / "gallery" / hospital  # a listed hospital's name: a safe path component
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for i, png in enumerate(pngs, 1):
            (folder / f"{i}.png").write_bytes(png)  # inlined in report.html, which the ledger hashes
        self.data.setdefault("gallery", {})[hospital] = [f"gallery/{hospital}/{i}.png" for i in range(1, len(pngs) + 1)]

    def add_timing(self, server_round: int, timing: dict[str, float]) -> None:
        """Server-side wall times of the round's phases (seconds), the round's last record:
        written with the next save, and the round's TensorBoard scalars now."""
        self._round(server_round)["timing"] = dict(timing)
        self.tracker.log_rounds(self.data["rounds"])

    def add_wire(self, server_round: int, wire: dict[str, dict[str, int]]) -> None:
        """Bytes sent to and received from each hospital in the round (``carefl.rounds.Wire``)."""
        self._round(server_round)["wire"] = {h: dict(v) for h, v in wire.items()}

    def add_baselines(self, baselines: dict) -> None:
        self.data["baselines"] = baselines

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.data))

    def load_state_dict(self, state: dict) -> None:
        self.data = json.loads(json.dumps(state))
        self.data["status"] = "running"
        self.tracker.written.update(r["round"] for r in self.data["rounds"])  # logged by the run before

    def save(self) -> Path:
        path = self.run_dir / "metrics.json"
        atomic_write_text(path, json.dumps(self.data, indent=2, default=float, allow_nan=True))
        return path

    def sites(self) -> dict:
        """What joining bought each hospital, on its own test split, by the headline metric m:

        ``{"per_site": {h: {"federated", "personalized" (None without it), "deployed": the
        better of the two, "deployed_model", "trivial": a no-model rule's m (None if not
        reported), "local_only": h's own local-only model (simulation baselines only), "gain":
        deployed - local_only, "trivial_metric": dice | accuracy, "deployed_on_trivial_metric"}},
        "worst_site", "worst", "best", "spread": best - worst of the deployed models,
        "no_better_than_trivial": [h whose better model is not above the rule on that metric],
        "degenerate_baselines": [h whose own local-only model is not above it either]}``.
        Computed from the final round's evaluations; empty when there are none. The better of
        federated and personalized is picked on the same test split it is scored on, so
        ``deployed`` and ``gain`` are optimistic by that selection (of two models).
        """
        key = self.data["headline"]
        final = self.data["rounds"][-1]["eval"] if self.data["rounds"] else {}
        local = self.data["baselines"].get("local_only", {})
        per_site = {}
        for h in self.data["hospitals"]:
            if h not in final:
                continue
            fed, personal = final[h][key], final[h].get(f"personal_{key}")
            deployed = max(fed, personal) if personal is not None else fed
            # the no-model rule is scored on Dice (segmentation) or accuracy (classification: a
            # constant answer has no AUC to compare), the deployed model on the same metric
            rule = "dice" if key == "dice" else "accuracy"
            own = [final[h].get(rule), final[h].get(f"personal_{rule}")]
            entry = {"federated": fed, "personalized": personal, "deployed": deployed,
                     "deployed_model": "personalized" if personal is not None and personal > fed else "federated",
                     "trivial_metric": rule, "trivial": final[h].get(f"trivial_{rule}"),
                     "deployed_on_trivial_metric": max((v for v in own if v is not None), default=None)}
            if h in local.get(h, {}):
                entry["local_only"] = local[h][h][key]
                entry["gain"] = deployed - entry["local_only"]
                entry["local_only_on_trivial_metric"] = local[h][h].get(rule)
            per_site[h] = entry
        if not per_site:
            return {}
        worst = min(per_site, key=lambda h: per_site[h]["deployed"])
        best = max(per_site[h]["deployed"] for h in per_site)
        return {"per_site": per_site, "worst_site": worst, "worst": per_site[worst]["deployed"], "best": best,
                "spread": best - per_site[worst]["deployed"],
                "no_better_than_trivial": [h for h, e in per_site.items() if e["trivial"] is not None
                                           and e["deployed_on_trivial_metric"] is not None
                                           and e["deployed_on_trivial_metric"] <= e["trivial"]],
                "degenerate_baselines": [h for h, e in per_site.items() if e["trivial"] is not None
                                         and e.get("local_only_on_trivial_metric") is not None
                                         and e["local_only_on_trivial_metric"] <= e["trivial"]]}

    def summary(self) -> str:
        """Markdown table: the final federated model vs pooled and local-only baselines, per
        test split, with the mean over OTHER sites for each local-only model (what federation
        buys a hospital beyond its own data)."""
        key, names = self.data["headline"], self.data["hospitals"]
        final = self.data["rounds"][-1]["eval"] if self.data["rounds"] else {}

        def mean(values: dict, sites: list[str]) -> str:
            found = [values[h][key] for h in sites if h in values]
            return f"{sum(found) / len(found):.3f}" if found else "-"

        def cell(m: dict) -> str:  # the value, with its 95% bootstrap interval over test images if known
            low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
            return f"{m[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")

        def row(label: str, values: dict, own: str | None = None) -> str:
            cells = [cell(values[h]) if h in values else "-" for h in names]
            others = [h for h in names if h != own]
            off = [mean(values, others), mean(final, others)] if own else ["-", "-"]
            return f"| {label} | " + " | ".join(cells + off) + " |"

        lines = [f"{key} on each hospital's test split (status: {self.data['status']}); [low, high]: 95% bootstrap "
                 "interval over that split's test images", "",
                 "| model | " + " | ".join(names) + " | mean on the other sites | federated on those sites |",
                 "|---|" + "---|" * (len(names) + 2), row("federated (final)", final)]
        personal = {h: {k.removeprefix("personal_"): v for k, v in m.items() if k.startswith(f"personal_{key}")}
                    for h, m in final.items() if f"personal_{key}" in m}
        if personal:
            lines.append(row("personalized (final, own site)", personal))
        baselines = self.data["baselines"]
        if baselines.get("pooled"):
            lines.append(row("pooled (centralised)", baselines["pooled"]))
        for trained_at, values in baselines.get("local_only", {}).items():
            lines.append(row(f"local-only {trained_at}", values, own=trained_at))
        sites = self.data.get("sites") or {}
        if sites:
            per_site = sites["per_site"]
            lines += ["", f"what joining bought each hospital ({key} of its deployed model, the better of federated "
                      "and personalized, on its own test split):", ""]
            lines += [f"- {h}: {e['deployed']:.3f} ({e['deployed_model']})"
                      + (f", local-only {e['local_only']:.3f}, gain {e['gain']:+.3f}" if "gain" in e else "")
                      + (f", no-model rule {e['trivial']:.3f} ({e['trivial_metric']})" if e["trivial"] is not None else "")
                      for h, e in per_site.items()]
            lines.append(f"- worst site: {sites['worst_site']} {sites['worst']:.3f}; spread best - worst "
                         f"{sites['spread']:.3f}")
            for h in sites["no_better_than_trivial"]:
                e = per_site[h]
                lines.append(f"- WARNING: {h}'s deployed model ({e['trivial_metric']} {e['deployed_on_trivial_metric']:.3f})"
                             f" is no better than a rule without a model ({e['trivial']:.3f}: "
                             + ("every voxel foreground" if key == "dice" else "the most frequent class")
                             + "); train longer, or check its data")
            for h in sites["degenerate_baselines"]:
                e = per_site[h]
                lines.append(f"- WARNING: {h}'s local-only baseline ({e['trivial_metric']} "
                             f"{e['local_only_on_trivial_metric']:.3f}) is no better than the rule without a model "
                             f"({e['trivial']:.3f}): its gain above is measured against a degenerate baseline")
        per_class = [m for m in self.metric_names if m.startswith("dice_")]
        if per_class and final:  # K-class segmentation: each foreground class of the final model
            lines += ["", "per-class Dice of the final federated model", "",
                      "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {m[len('dice_'):]} | " + " | ".join(f"{final[h][m]:.3f}" if h in final else "-"
                                                              for h in names) + " |" for m in per_class]
        shared = {h: {k[len("card_"):]: v for k, v in m.items() if k.startswith("card_")} for h, m in final.items()}
        shared = {h: c for h, c in shared.items() if c}
        if shared:  # only hospitals whose site policy says share-data-card: true
            lines += ["", "data the hospitals chose to share (share-data-card): usable records and label frequencies", "",
                      "| hospital | train | test | unusable | labels |", "|---|---|---|---|---|"]
            for h, c in shared.items():
                freq = ", ".join(f"{k.split('_', 1)[1]}: " + (f"{v:.1%}" if k.startswith("label_") else f"{v:.0f}")
                                 for k, v in c.items() if k.startswith(("label_", "class_")))
                lines.append(f"| {h} | {c.get('train_records', 0):.0f} | {c.get('test_records', 0):.0f} "
                             f"| {c.get('problems', 0):.0f} | {freq} |")
        return "\n".join(lines) + "\n"

    def finish(self, status: str, message: str = "") -> str:
        """Save metrics.json, ``summary.md`` and the plots; return the summary table."""
        self.data["status"], self.data["message"] = status, message
        self.data["sites"] = self.sites()
        self.save()
        summary = self.summary()
        atomic_write_text(self.run_dir / "summary.md", summary)
        from carefl.plots import plot_run  # matplotlib only when a run ends

        plot_run(self.data, self.run_dir / "plots")
        return summary

    def write_html(self, ledger: dict, config_hash: str) -> Path:
        """``report.html`` (:mod:`carefl.html_report`) from what :meth:`finish` wrote; ``ledger``:
        ``{"entries", "head"}`` now."""
        from carefl.html_report import write_html

        summary = (self.run_dir / "summary.md").read_text()
        path = write_html(self.run_dir, self.data, summary, {**self.identity, "config hash": config_hash}, ledger)
        self.tracker.close(self.data["status"], [self.run_dir / name for name in
                                                  ("metrics.json", "summary.md", "report.html", "plots")])
        return path
