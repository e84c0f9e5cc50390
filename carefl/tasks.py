"""Losses and metrics per task kind, built from MONAI by name.

Segmentation (binary): the model outputs one foreground logit map ``(N, 1, *spatial)``;
the loss is MONAI ``DiceLoss``/``DiceCELoss`` on the sigmoid; the metric is mean Dice of
the mask thresholded at 0.5 (MONAI ``DiceMetric``), averaged over images.

Classification: the model outputs logits ``(N, K)``; the loss is cross-entropy; the metrics
are accuracy and ROC AUC (MONAI ``compute_roc_auc``), defined on every non-empty split -- see
:func:`compute_metrics` for what ``auc`` means when a split lacks a class.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, compute_roc_auc

from carefl.errors import ConfigError, DataError

log = logging.getLogger("carefl.tasks")

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


_ONE_CLASS_WARNED: set[int] = set()  # classes whose one-class-split warning was logged


@torch.no_grad()
def compute_metrics(task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of a whole test split from stacked ``logits`` and ``labels``.

    Segmentation: ``{"dice": mean Dice over images}`` (an image whose mask and prediction
    are both empty counts as Dice 1).

    Classification (logits ``(N, K)``, int labels ``(N,)``): ``{"auc", "accuracy"}``, both finite
    and in [0, 1] on every split with N >= 1 (an empty split raises :class:`DataError`).
    ``accuracy``: fraction of examples whose argmax class is the label. ``auc``, by the classes
    present in the split (P = the labels that occur):

    - |P| >= 2: ROC AUC one-vs-rest for each class c in P (positives: label c; negatives: every
      other example; score: log-softmax of class c), averaged over P with equal weight; ties
      count 1/2. Classes absent from the split are left out, not counted as NaN. For K = 2 this
      is the usual AUC of the positive class (score: logit 1 - logit 0).
    - |P| = 1: no pair of examples of different classes exists, so no ranking AUC does. ``auc``
      is then the fraction of the split classified as its one class (= ``accuracy``): the
      threshold analogue of AUC, i.e. the mean recall over the classes present (for binary
      decisions, AUC of the decisions = (sensitivity + specificity) / 2). It is logged as a
      warning. Chance level (0.5) is not reported: it would call a model that is right on every
      case of that split a coin flip, and pull the federation's weighted AUC towards 0.5
      whatever the model does.

    Non-finite logits (a diverged model) never make a metric NaN: NaN counts as the lowest
    logit and +-inf as the largest / lowest float32, before the softmax.
    """
    if task.kind == SEGMENTATION:
        pred = (torch.sigmoid(logits) > 0.5).float()
        metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
        metric(y_pred=pred, y=labels)
        return {"dice": float(metric.aggregate().item())}
    if len(labels) == 0:
        raise DataError("the test split has no examples: nothing to evaluate; give the hospital a test split")
    big = float(torch.finfo(torch.float32).max)
    scores = torch.nan_to_num(logits.double(), nan=-big, posinf=big, neginf=-big)
    labels = labels.long().reshape(-1)
    accuracy = float((scores.argmax(dim=1) == labels).double().mean())
    present = labels.unique().tolist()
    if len(present) == 1:
        if present[0] not in _ONE_CLASS_WARNED:  # once per class and process: not every round
            _ONE_CLASS_WARNED.add(present[0])
            log.warning("AUC is undefined on a test split whose labels are all %d; auc reports the fraction "
                        "classified correctly instead (%.3f now; said once)", present[0], accuracy)
        return {"auc": accuracy, "accuracy": accuracy}
    if scores.shape[1] == 2:  # binary: AUC of the positive-class score
        auc = compute_roc_auc(scores[:, 1] - scores[:, 0], labels.double())
    else:
        log_probs = torch.log_softmax(scores, dim=1)
        auc = sum(compute_roc_auc(log_probs[:, c], (labels == c).double()) for c in present) / len(present)
    return {"auc": float(auc), "accuracy": accuracy}
