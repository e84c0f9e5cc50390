"""Local training and evaluation loops, shared by hospitals and the server's baselines.

A reader can follow the whole local path here: ``make_optimizer`` -> (optionally
``carefl.privacy.make_private``) -> ``train_epochs`` -> ``evaluate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, Dataset

from carefl.errors import ConfigError
from carefl.tasks import build_loss, compute_metrics, segmentation_scores, segmentation_summary


class Progress:
    """Periodic progress lines of a long local training: ``<what>: step s/S (p%), t s, ~r s
    left`` at most every ``every_s`` seconds and once at the end, on ``log`` (INFO). ``total``:
    the steps planned (a Poisson loader runs exactly that many, :func:`carefl.hospital.local_steps`).
    The estimate assumes the remaining steps cost what the done ones did."""

    def __init__(self, log: logging.Logger, what: str, total: int, every_s: float = 10.0) -> None:
        self.log, self.what, self.total, self.every_s = log, what, max(total, 1), every_s
        self.start = self.last = time.monotonic()

    def __call__(self, steps: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and steps < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / steps * max(self.total - steps, 0) if steps else float("nan")
        self.log.info("%s: step %d/%d (%.0f%%), %.0f s, ~%.0f s left", self.what, steps, self.total,
                      100 * steps / self.total, elapsed, left)


@dataclass
class TrainResult:
    """What one local training call produced.

    ``loss`` is the mean task loss (without FedProx's proximal term) over the steps whose batch
    had records (0.0 if none had); ``steps`` the optimizer steps taken, empty Poisson batches
    included; ``num_examples`` the size of the training set (not the number of batches).
    """

    loss: float
    steps: int
    num_examples: int


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """Optimizer by name (``federation.optimizer``): ``adam`` or ``sgd`` (momentum 0.9)."""
    if lr <= 0:
        raise ConfigError(f"federation.lr={lr} must be > 0, e.g. federation.lr=0.003")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ConfigError(f"federation.optimizer={name!r} is unknown; use adam or sgd")


def make_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, workers: int = 0) -> DataLoader:
    """A seeded DataLoader (``(image, label)`` batches). DP replaces it by a Poisson loader that
    keeps its ``collate_fn``: the dataset's own when it has one (training augmentation applied
    to the whole batch, :class:`carefl.data.augment.BatchAugment`) and its ``workers``: worker
    processes (forked, kept for the loader's life) that prepare the next batches while the
    model trains on this one (a hospital's ``data-workers``; 0: in this process)."""
    if batch_size < 1:
        raise ConfigError(f"federation.batch_size={batch_size} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=getattr(dataset, "collate_fn", None), num_workers=workers,
                      persistent_workers=workers > 0)


def train_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    task,
    epochs: int,
    prox_mu: float = 0.0,
    progress: Callable[[int], None] | None = None,
    anchor: Sequence[torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``epochs`` passes over ``loader``; return the mean loss and the step count.
    ``progress(steps done)`` is called after every step (e.g. a :class:`Progress`).

    One optimizer step per batch. Under DP-SGD (``optimizer`` is Opacus' ``DPOptimizer``) every
    step is one Poisson-sampled Gaussian step, the one the accountant records:

    - a batch with records: p.grad = (sum of per-sample gradients, each clipped to C, + noise)
      / expected batch size;
    - an empty Poisson batch (each record joins on its own with probability <= q, so all may
      stay out) is a noise-only step: the model is not run (MONAI's GroupNorm nets fail on a
      batch of 0 in Opacus' per-sample path), Opacus' own empty-batch path gives
      p.grad = noise / expected batch size, and the accountant records the step like any other.

    ``prox_mu > 0`` is FedProx: the gradient of ``mu/2 * ||w - w_global||^2``, i.e.
    ``mu * (w - w_global)``, is added to every step's gradient, where ``w_global`` are the
    parameters at entry (the global model this round started from), or ``anchor`` when given
    (one tensor per trainable parameter, in ``model.parameters()`` order): Ditto's personal
    step passes the received global model while it trains the personal model v, so its
    ``lambda * (v - w_global)`` is this same term (:func:`carefl.hospital.ditto_step`). Under DP it is added AFTER
    privatisation, to the clipped, noised gradient: a term that is not a per-sample loss would
    never reach Opacus' per-sample gradients (Opacus replaces p.grad, so a proximal loss term
    was silently dropped). Adding it afterwards is post-processing -- it depends only on the
    public global model and the current weights, which are themselves DP outputs -- so the
    (epsilon, delta) guarantee is exactly the one of DP-SGD without it.
    """
    loss_fn = build_loss(task)
    private = isinstance(optimizer, DPOptimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if prox_mu > 0:
        anchor = [a.detach().clone() for a in (anchor if anchor is not None else params)]
        if [a.shape for a in anchor] != [p.shape for p in params]:
            raise ValueError("train_epochs: anchor must hold one tensor per trainable parameter, in order")
    else:
        anchor = None
    model.train()
    total, with_records, steps = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # no record joined this Poisson batch (only DP loaders sample so)
                if not private:
                    continue
                for p in optimizer.params:  # Opacus' own empty-batch path: nothing to clip, noise only
                    p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                loss = loss_fn(model(images), labels)
                loss.backward()
                total += float(loss.detach())
                with_records += 1
            if private and not optimizer.pre_step():  # clip, noise, account; p.grad is private now
                continue  # Opacus skips a step only for virtual batches, which CareFL never asks for
            if anchor is not None:  # FedProx / Ditto after privatisation: post-processing, see above
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        prox = prox_mu * (p - a)
                        p.grad = prox if p.grad is None else p.grad.add_(prox)
            (optimizer.original_optimizer if private else optimizer).step()
            steps += 1
            if progress is not None:
                progress(steps)
    return TrainResult(loss=total / max(with_records, 1), steps=steps, num_examples=len(loader.dataset))


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, batch_size: int = 32):
    """Stacked ``(logits, labels)`` of a whole dataset, in order."""
    model.eval()
    logits, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits.append(model(images))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, task, batch_size: int = 32, window=None) -> dict[str, float]:
    """Task metrics (:func:`carefl.tasks.metric_names`) of ``model`` on ``dataset``.

    ``window`` (:class:`carefl.data.decathlon.SlidingWindow`, segmentation): images of any size
    are evaluated one at a time at their own resolution with MONAI ``sliding_window_inference``
    (windows of ``roi_size``, ``overlap``, ``sw_batch_size`` per pass; an image smaller than the
    window is padded and the padding cropped off again), so Dice is computed on the native label.
    """
    if window is None:
        return compute_metrics(task, *predict(model, dataset, batch_size))
    from monai.inferers import sliding_window_inference

    model.eval()
    scores: dict[str, list[torch.Tensor]] = {}
    for i in range(len(dataset)):
        image, label = dataset[i]
        logits = sliding_window_inference(image[None], window.roi_size, window.sw_batch_size, model,
                                          overlap=window.overlap)
        for name, rows in segmentation_scores(task, torch.as_tensor(logits), label[None]).items():
            scores.setdefault(name, []).append(rows)
    return segmentation_summary(task, {name: torch.cat(rows) for name, rows in scores.items()})
