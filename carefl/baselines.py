"""What federation bought: local-only and pooled models on the same test splits.

Simulation only (the server needs every hospital's data). Each baseline gets the same
training budget as one hospital in the federation (``rounds * local_epochs`` epochs over its
training data at ``federation.lr``, then its personal epochs at ``personalization.lr`` when
hospitals train a personal model: finetune's after the last round, Ditto's, which a hospital
interleaves with its rounds, here all after them) and the same privacy recipe: under DP its
noise is calibrated to the same target epsilon, so the comparison holds the privacy guarantee
fixed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from carefl.data import load_hospital
from carefl.hospital import (local_steps, make_private, personal_epochs, personal_lr, planned_epochs,
                             planned_noise_multiplier)
from carefl.models import build_model
from carefl.site import CACHE_DIR
from carefl.training import Progress, evaluate, make_loader, make_optimizer, train_epochs


def train_centrally(cfg, dataset: Dataset, seed: int, progress: Progress | None = None) -> torch.nn.Module:
    """Train a fresh model on ``dataset`` with a hospital's whole schedule: its rounds' epochs
    (``rounds * local_epochs``) at ``federation.lr``, then its personal epochs at
    :func:`carefl.hospital.personal_lr` (DP if enabled, the noise planned for all of them), so
    a local-only model differs from a hospital's only in the data it never saw. ``progress`` is
    called after every step."""
    fed = cfg.federation
    epochs, personal = planned_epochs(cfg), personal_epochs(cfg)
    model = build_model(cfg)
    optimizer = make_optimizer(model, fed.optimizer, fed.lr)
    loader = make_loader(dataset, fed.batch_size, seed)
    trained = model
    if cfg.privacy.enabled:
        sigma = planned_noise_multiplier(cfg, len(dataset), cfg.privacy.target_delta, epochs)
        trained, optimizer, loader, _ = make_private(cfg, model, optimizer, loader, sigma, history=[])
    done = train_epochs(trained, optimizer, loader, cfg.task, epochs - personal, progress=progress).steps
    if personal:
        for group in optimizer.param_groups:
            group["lr"] = personal_lr(cfg)
        train_epochs(trained, optimizer, loader, cfg.task, personal,
                     progress=(lambda steps: progress(done + steps)) if progress else None)
    return model


def _progress(cfg, log: logging.Logger | None, what: str, n: int) -> Progress | None:
    """Lines every 10 s with what is left of one baseline's training (as a hospital prints)."""
    return Progress(log, f"baseline {what}: {n} records", local_steps(n, cfg.federation.batch_size,
                                                                      planned_epochs(cfg))) if log else None


def run_baselines(cfg, log: logging.Logger | None = None, run_dir: Path | None = None) -> dict:
    """``{"local_only": {trained_at: {evaluated_at: metrics}}, "pooled": {evaluated_at: metrics}}``.

    ``run_dir``: real data is read through the simulated hospitals' caches
    (``<run_dir>/hospitals/<name>/data-cache``, their default ``cache-dir``); None: in memory.
    """
    names = list(cfg.federation.hospitals)
    data = [load_hospital(cfg, name, i, cache_dir=run_dir / "hospitals" / name / CACHE_DIR if run_dir else None)
            for i, name in enumerate(names)]
    result: dict = {"local_only": {}, "pooled": {}}
    for i, (name, hospital) in enumerate(zip(names, data)):
        model = train_centrally(cfg, hospital.train, seed=int(cfg.seed) + i,
                                progress=_progress(cfg, log, f"local-only {name}", len(hospital.train)))
        result["local_only"][name] = {other.name: evaluate(model, other.test, cfg.task, window=other.window)
                                      for other in data}
        if log:
            log.info("baseline local-only %s: %s", name, _short(result["local_only"][name]))
    everyone = ConcatDataset([h.train for h in data])
    everyone.collate_fn = getattr(data[0].train, "collate_fn", None)  # the preset's batch augmentation, as each site's
    pooled = train_centrally(cfg, everyone, seed=int(cfg.seed) + len(names),
                             progress=_progress(cfg, log, "pooled", len(everyone)))
    result["pooled"] = {h.name: evaluate(pooled, h.test, cfg.task, window=h.window) for h in data}
    if log:
        log.info("baseline pooled: %s", _short(result["pooled"]))
    return result


def _short(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{h} " + "/".join(f"{v:.3f}" for v in m.values()) for h, m in metrics.items())
