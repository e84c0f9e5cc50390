"""Losses and metrics per task kind, built from MONAI by name.

Segmentation, by ``task.num_classes`` = K:

- K = 1 (binary): the model outputs one foreground logit map ``(N, 1, *spatial)``; labels are
  float ``(N, 1, *spatial)`` in {0, 1}; the loss is MONAI ``DiceLoss``/``DiceCELoss`` on the
  sigmoid; the metric ``dice`` is the Dice of the mask thresholded at 0.5 (MONAI ``DiceMetric``),
  averaged over images.
- K >= 2 (multi-class, background is class 0): logits ``(N, K, *spatial)``; labels hold the
  class index, ``(N, 1, *spatial)`` with values in {0..K-1}; the loss is
  ``DiceLoss``/``DiceCELoss(to_onehot_y=True, softmax=True)``; the prediction is the argmax.
  Metrics: ``dice_c`` = Dice of foreground class c (1..K-1) averaged over images, and ``dice``
  = their mean (mean foreground Dice; background is left out, as in the Decathlon and BraTS).

Both also report boundary metrics (MONAI), averaged over images and foreground classes:
``hd95``, the 95th-percentile Hausdorff distance in voxels of the evaluated grid (after the
preset's resampling, e.g. 1.5 x 1.5 x 2 mm for ``ct``), and ``surface_dice``, the fraction of
both boundaries within 1 voxel of the other (normalised surface Dice). Where a class is absent
from mask and prediction both, hd95 = 0 and surface Dice = 1 (nothing to miss); where it is in
one of them only, hd95 = the image's diagonal (the largest distance it can have) and surface
Dice = 0, so an image never makes a metric NaN and a miss is the worst score, not a skip.

Classification also reports ``sensitivity`` and ``specificity`` of the argmax decision
(MONAI confusion-matrix metrics): for K = 2 of class 1; for K > 2 one-vs-rest per class
present in the split, averaged.

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

from carefl.choices import CLASSIFICATION, LOSSES, SEGMENTATION
from carefl.errors import ConfigError, DataError

log = logging.getLogger("carefl.tasks")



def metric_names(task) -> tuple[str, ...]:
    """The metric keys a task reports (``metrics.json`` and evaluation replies use exactly these):
    ``("dice",)`` for binary segmentation, ``("dice", "dice_1", ..., "dice_{K-1}")`` for K-class
    segmentation, ``("auc", "accuracy")`` for classification."""
    if task.kind == CLASSIFICATION:
        return ("auc", "accuracy", "sensitivity", "specificity")
    k = int(task.num_classes)
    return ("dice", *(f"dice_{c}" for c in range(1, k) if k >= 2), *BOUNDARY)


def ci_names(task) -> tuple[str, str]:
    """The keys of the headline metric's 95% bootstrap interval (:func:`bootstrap_ci`)."""
    head = HEADLINE[task.kind]
    return f"{head}_ci_low", f"{head}_ci_high"


#: bootstrap resamples of a confidence interval, and the seed of their draws (fixed: the
#: interval of a given test split is reproducible)
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


#: index entries drawn per block of resamples (int64: 32 MiB), so a large split's interval
#: never holds all BOOTSTRAP_RESAMPLES x n indices at once
BOOTSTRAP_BLOCK = 1 << 22


def bootstrap_ci(statistic, n: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``statistic`` over a split of ``n`` examples
    (images): :data:`BOOTSTRAP_RESAMPLES` resamples of n indices drawn with replacement; the
    2.5th and 97.5th percentiles of the statistic. It describes how much the metric depends on
    which test images a hospital happened to have, not the training's randomness.

    ``statistic``: int64 indices ``(m, n)``, one resample per row -> float64 ``(m,)``, the
    statistic of each resample (vectorised: the resamples come in blocks of m rows)."""
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    rows = max(1, BOOTSTRAP_BLOCK // max(n, 1))
    values = torch.cat([statistic(torch.randint(0, n, (min(rows, BOOTSTRAP_RESAMPLES - start), n), generator=gen))
                        .double() for start in range(0, BOOTSTRAP_RESAMPLES, rows)])
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(low), float(high)


def resampled_auc(scores: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The ``auc`` of :func:`compute_metrics` on each resample: ``scores`` float64 ``(n, K)``
    (finite), ``labels`` int64 ``(n,)``, ``idx`` int64 ``(m, n)`` (one resample per row) ->
    float64 ``(m,)``.

    A resample is the split listed with multiplicities w (w_i = how often example i was
    drawn). For a class c present in it (P = sum of w over its positives > 0, N over the rest),
    the one-vs-rest AUC is the Mann-Whitney statistic with ties counting 1/2,

        AUC_c = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (P N),

    which is exactly the trapezoidal ROC area MONAI's ``compute_roc_auc`` computes on the
    resample written out (``tests/test_tasks_training.py`` checks them equal). It is summed per
    distinct score level -- the weight of positives above each negative's level, plus half at
    it -- in O(m (n + L)) per class for L levels. Written here because MONAI scores one vector
    per call: 1000 resamples x K classes took about 1 s per evaluation (108 s of a 149 s
    10-hospital digits federation). The averaging over the classes present, the binary case
    (score logit 1 - logit 0) and the one-class fallback (fraction classified correctly) are
    :func:`compute_metrics`'."""
    m, n = idx.shape
    k = scores.shape[1]
    y = labels[idx]
    correct = (scores.argmax(dim=1) == labels).double()[idx].mean(dim=1)
    columns = {1: scores[:, 1] - scores[:, 0]} if k == 2 else dict(enumerate(torch.log_softmax(scores, dim=1).T))
    total = torch.zeros(m, dtype=torch.float64)
    present = torch.zeros(m, dtype=torch.float64)
    rows = torch.arange(m).unsqueeze(1)
    for c, column in columns.items():
        levels, level = torch.unique(column, return_inverse=True)
        cell = (rows * len(levels) + level[idx]).reshape(-1)  # (resample, level) of every draw
        pos = (y == c).double().reshape(-1)
        w_pos = torch.bincount(cell, weights=pos, minlength=m * len(levels)).reshape(m, -1)
        w_neg = torch.bincount(cell, weights=1.0 - pos, minlength=m * len(levels)).reshape(m, -1)
        p, q = w_pos.sum(dim=1), w_neg.sum(dim=1)
        above = p.unsqueeze(1) - w_pos.cumsum(dim=1)  # positives' weight strictly above each level
        auc_c = (w_neg * (above + 0.5 * w_pos)).sum(dim=1) / (p * q).clamp_min(1.0)
        if k == 2:
            return torch.where((p > 0) & (q > 0), auc_c, correct)
        total += torch.where(p > 0, auc_c, 0.0)
        present += (p > 0).double()
    return torch.where(present > 1, total / present.clamp_min(1.0), correct)


#: segmentation boundary metrics (see the module docstring); ``hd95`` is a distance, not in [0, 1]
BOUNDARY = ("hd95", "surface_dice")
#: metrics that are not fractions in [0, 1] (a reply's value must be finite and >= 0)
UNBOUNDED = ("hd95",)


#: the metric that summarises a run (progress lines, plots' headline, robustness table)
HEADLINE = {SEGMENTATION: "dice", CLASSIFICATION: "auc"}


def build_loss(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss ``(logits, labels) -> scalar`` for ``cfg.task``.

    Segmentation labels are float ``(N, 1, *spatial)``: in {0, 1} for K = 1, class indices
    for K >= 2 (see the module docstring); classification labels int64 ``(N,)``.
    """
    kind, name = task.kind, task.loss
    if kind == SEGMENTATION and name in ("dice", "dice_ce"):
        head = {"sigmoid": True} if int(task.num_classes) == 1 else {"softmax": True, "to_onehot_y": True}
        if name == "dice":
            return DiceLoss(**head, smooth_nr=1e-5, smooth_dr=1e-5)
        return DiceCELoss(**head)
    if kind == CLASSIFICATION and name == "ce":
        return torch.nn.CrossEntropyLoss()
    raise ConfigError(f"task.loss={name!r} is not a {kind} loss; use task.loss={' | '.join(LOSSES[kind])}")


_ONE_CLASS_WARNED: set[int] = set()  # classes whose one-class-split warning was logged


@torch.no_grad()
def compute_metrics(task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of a whole test split from stacked ``logits`` and ``labels``.

    Segmentation: :func:`dice_summary` of :func:`dice_per_image` (an image whose mask and
    prediction of a class are both empty counts as Dice 1 for that class).

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
        return segmentation_summary(task, segmentation_scores(task, logits, labels))
    if len(labels) == 0:
        raise DataError("the test split has no examples: nothing to evaluate; give the hospital a test split")
    big = float(torch.finfo(torch.float32).max)
    scores = torch.nan_to_num(logits.double(), nan=-big, posinf=big, neginf=-big)
    labels = labels.long().reshape(-1)
    accuracy = float((scores.argmax(dim=1) == labels).double().mean())
    present = labels.unique().tolist()
    if len(present) == 1 and present[0] not in _ONE_CLASS_WARNED:  # once per class and process
        _ONE_CLASS_WARNED.add(present[0])
        log.warning("AUC is undefined on a test split whose labels are all %d; auc reports the fraction "
                    "classified correctly instead (%.3f now; said once)", present[0], accuracy)
    rates = _sensitivity_specificity(scores.argmax(dim=1), labels, scores.shape[1], present)

    if len(present) == 1:  # the documented fallback
        auc = accuracy
    elif scores.shape[1] == 2:  # binary: AUC of the positive-class score
        auc = float(compute_roc_auc(scores[:, 1] - scores[:, 0], labels.double()))
    else:  # one-vs-rest over the classes present
        log_probs = torch.log_softmax(scores, dim=1)
        auc = float(sum(compute_roc_auc(log_probs[:, c], (labels == c).double()) for c in present) / len(present))
    return {"auc": auc, "accuracy": accuracy, **rates,
            **dict(zip(ci_names(task), bootstrap_ci(lambda idx: resampled_auc(scores, labels, idx), len(labels))))}


def _sensitivity_specificity(pred: torch.Tensor, labels: torch.Tensor, k: int, present: list[int]) -> dict[str, float]:
    """MONAI confusion-matrix sensitivity and specificity of the decisions ``pred`` (see the
    module docstring); a rate with no case to count (e.g. no positive in the split) is left out
    of the mean, and 1.0 when no class has one."""
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    onehot = lambda x: torch.nn.functional.one_hot(x, k).float()  # noqa: E731
    matrix = get_confusion_matrix(onehot(pred), onehot(labels), include_background=True).sum(dim=0)  # (K, 4)
    classes = [1] if k == 2 else present
    out = {}
    for name in ("sensitivity", "specificity"):
        values = compute_confusion_matrix_metric(name, matrix)[classes]
        values = values[torch.isfinite(values)]
        out[name] = float(values.mean()) if len(values) else 1.0
    return out


def _onehots(task, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, mask) one-hot ``(N, F, *spatial)`` over the foreground classes only."""
    if len(labels) == 0:
        raise DataError("the test split has no images: nothing to evaluate; give the hospital a test split")
    k = int(task.num_classes)
    if k == 1:
        return (torch.sigmoid(logits) > 0.5).float(), labels.float()
    pred = torch.nn.functional.one_hot(logits.argmax(dim=1), k).movedim(-1, 1).float()
    mask = torch.nn.functional.one_hot(labels[:, 0].long(), k).movedim(-1, 1).float()
    return pred[:, 1:], mask[:, 1:]


@torch.no_grad()
def segmentation_scores(task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image and foreground class, float64 ``(N, F)``: ``dice`` (as :func:`dice_per_image`),
    ``hd95`` and ``surface_dice`` (MONAI; the empty-class rules of the module docstring)."""
    import warnings

    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, mask = _onehots(task, logits, labels)
    dice = _dice(pred, mask)
    with warnings.catch_warnings():  # MONAI warns for every empty class; the rules below handle them
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred, mask, include_background=True, percentile=95).double()
        sd = compute_surface_dice(pred, mask, [1.0] * pred.shape[1], include_background=True).double()
    has_pred = pred.flatten(2).any(dim=2)
    has_mask = mask.flatten(2).any(dim=2)
    diagonal = float(torch.tensor(labels.shape[2:], dtype=torch.float64).norm())
    both_empty, one_empty = ~has_pred & ~has_mask, has_pred ^ has_mask
    hd = torch.where(both_empty, 0.0, torch.where(one_empty, diagonal, torch.nan_to_num(hd, nan=diagonal)))
    sd = torch.where(both_empty, 1.0, torch.where(one_empty, 0.0, torch.nan_to_num(sd, nan=0.0)))
    return {"dice": dice, "hd95": hd.clamp(max=diagonal), "surface_dice": sd}


def segmentation_summary(task, scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`dice_summary` plus ``hd95`` and ``surface_dice`` averaged over images and classes,
    from :func:`segmentation_scores` rows (concatenated over images)."""
    per_image = scores["dice"].mean(dim=1)  # mean foreground Dice of each image; its mean is ``dice``
    low, high = bootstrap_ci(lambda idx: per_image[idx].mean(dim=1), len(per_image))
    return {**dice_summary(task, scores["dice"]), **{m: float(scores[m].mean()) for m in BOUNDARY},
            **dict(zip(ci_names(task), (low, high)))}


@torch.no_grad()
def dice_per_image(task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice of each image and foreground class, float64 ``(N, F)`` with F = max(1, K - 1).

    Args:
        task: ``cfg.task`` (segmentation; ``num_classes`` = K).
        logits: ``(N, K, *spatial)`` (K = 1: one foreground logit).
        labels: ``(N, 1, *spatial)``: {0, 1} for K = 1, class indices 0..K-1 otherwise.
    Column c-1 is foreground class c (K = 1: the one foreground). MONAI ``DiceMetric`` with
    ``ignore_empty=False``: a class absent from both mask and prediction scores 1.
    """
    return _dice(*_onehots(task, logits, labels))


def _dice(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MONAI Dice per image and class of one-hot ``pred`` and ``mask`` (empty in both: 1)."""
    return DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred=pred, y=mask).double()


def dice_summary(task, scores: torch.Tensor) -> dict[str, float]:
    """``dice`` (mean over images of the mean foreground Dice) and, for K >= 2, ``dice_c`` per
    foreground class (mean over images), from :func:`dice_per_image` rows ``(N, F)``."""
    per_class = scores.mean(dim=0)
    out = {"dice": float(per_class.mean())}
    if int(task.num_classes) >= 2:
        out.update({f"dice_{c + 1}": float(v) for c, v in enumerate(per_class)})
    return out


@torch.no_grad()
def trivial_metrics(task, dataset) -> dict[str, float]:
    """The headline metric of a rule that needs no model, on ``dataset`` (``(image, label)`` items):

    - segmentation: every voxel foreground (class 1 for K >= 2), i.e. "label all tissue":
      ``{"dice": ...}`` (mean foreground Dice as :func:`dice_summary`);
    - classification: every example the split's most frequent class: ``{"accuracy": ...}``.

    A model whose metric is not above this has learnt nothing a clinician could use.
    """
    if task.kind == CLASSIFICATION:
        labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).reshape(-1)
        return {"accuracy": float(labels.bincount().max()) / len(labels)}
    k = int(task.num_classes)
    scores = []
    for i in range(len(dataset)):
        label = torch.as_tensor(dataset[i][1])[None]
        logits = torch.zeros((1, k, *label.shape[2:]))
        logits[:, 0 if k == 1 else 1] = 1.0  # sigmoid(1) > 0.5; argmax = class 1
        scores.append(dice_per_image(task, logits, label))
    return {"dice": dice_summary(task, torch.cat(scores))["dice"]}
