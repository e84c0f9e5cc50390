"""Losses and metrics per task kind, built from MONAI by name.

Segmentation (binary): the model outputs one foreground logit map ``(N, 1, *spatial)``;
the loss is MONAI ``DiceLoss``/``DiceCELoss`` on the sigmoid; the metric is mean Dice of
the mask thresholded at 0.5 (MONAI ``DiceMetric``), averaged over images.

Classification: the model outputs logits ``(N, K)``; the loss is cross-entropy; the metrics
are accuracy and ROC AUC (MONAI ``compute_roc_auc``; one-vs-rest macro average for K > 2).
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, compute_roc_auc

from carefl.errors import ConfigError

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"

#: metric names a task reports (``metrics.json`` uses exactly these keys)
METRICS = {SEGMENTATION: ("dice",), CLASSIFICATION: ("auc", "accuracy")}

#: the metric that summarises a run (progress lines, plots' headline, robustness table)
HEADLINE = {SEGMENTATION: "dice", CLASSIFICATION: "auc"}


def build_loss(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss ``(logits, labels) -> scalar`` for ``cfg.task``.

    Segmentation labels are float ``(N, 1, *spatial)`` in {0, 1}; classification labels
    int64 ``(N,)``.
    """
    kind, name = task.kind, task.loss
    if kind == SEGMENTATION and name == "dice":
        return DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    if kind == SEGMENTATION and name == "dice_ce":
        return DiceCELoss(sigmoid=True)
    if kind == CLASSIFICATION and name == "ce":
        return torch.nn.CrossEntropyLoss()
    valid = "dice | dice_ce" if kind == SEGMENTATION else "ce"
    raise ConfigError(f"task.loss={name!r} is not a {kind} loss; use task.loss={valid}")


@torch.no_grad()
def compute_metrics(task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of a whole test split from stacked ``logits`` and ``labels``.

    Segmentation: ``{"dice": mean Dice over images}`` (an image whose mask and prediction
    are both empty counts as Dice 1). Classification: ``{"auc", "accuracy"}``.
    """
    if task.kind == SEGMENTATION:
        pred = (torch.sigmoid(logits) > 0.5).float()
        metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
        metric(y_pred=pred, y=labels)
        return {"dice": float(metric.aggregate().item())}
    probs = torch.softmax(logits.float(), dim=1)
    accuracy = float((probs.argmax(dim=1) == labels).float().mean().item())
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).float()
    if probs.shape[1] == 2:  # binary: AUC of the positive-class score
        auc = compute_roc_auc(probs[:, 1], labels.float())
    else:
        auc = compute_roc_auc(probs, onehot, average="macro")
    return {"auc": float(auc), "accuracy": accuracy}
