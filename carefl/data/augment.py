"""Per-draw data work made cheap: one random patch by index arithmetic, and the preset's
augmentation applied to a whole collated batch.

    patch = pos_neg_patch(item, spatial_size, pos=1.0, neg=1.0, rand=np.random)   # one patch
    collate = BatchAugment(augment)          # augment: the preset's monai Compose
    images, labels = collate([(x0, y0), (x1, y1), ...])

**Patch.** The same distribution as MONAI's ``RandCropByPosNegLabeld(num_samples=1)``: with
probability ``pos / (pos + neg)`` the centre is a uniformly drawn foreground voxel (label > 0),
else a uniformly drawn background voxel (label == 0); the one present class is used when the
other is absent; the centre is then moved so the patch fits (MONAI's ``correct_crop_centers``).
MONAI lists every foreground and background index on every draw (2 ms for 256x256, ~50 ms for
120^3); here a uniform voxel of a class is drawn by rejection when that class covers at least
1/8 of the image (a uniform voxel, kept if it belongs to the class: uniform over the class) and
from the class's index list otherwise, which is small then.

**Batch augmentation.** :class:`BatchAugment` is the DataLoader's ``collate_fn`` (so it also
serves Opacus' Poisson loader, which keeps the plain loader's ``collate_fn`` and answers an
empty batch itself). It collates, then applies each of the preset's random transforms to the
batch with every sample drawing its own decision and parameters, the distribution MONAI's
per-sample transform declares:

- ``RandFlipd``: flip the ``spatial_axis`` (all axes when None) with probability ``prob``;
- ``RandRotated``: with probability ``prob``, angles uniform in ``range_x/y/z``, MONAI's rotation
  matrix (``create_rotate``) about the image centre, same size, per-key ``mode`` and
  ``padding_mode``, ``align_corners=False``: one ``grid_sample`` for the rotated samples
  (checked against ``monai.transforms.Rotate`` in ``tests/test_clinical_data.py``);
- ``RandScaleIntensityd``: ``x * (1 + f)``, f uniform in ``factors``, per channel if ``channel_wise``;
- ``RandShiftIntensityd``: ``x + o``, o uniform in ``offsets``, per channel if ``channel_wise``.

Any other transform, or these with options not listed here, runs as MONAI's own object on each
sample of the batch in turn: slower, never different. Random numbers come from torch's global
generator (seeded by ``torch.manual_seed`` like the rest of training).

**DP.** Dataset index i still returns exactly one patch of record i and the collate function
maps a batch of k samples to k augmented samples, each from its own sample only: the
"one record, one patch" argument of :mod:`carefl.data.decathlon` is unchanged.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandFlipd, RandRotated, RandScaleIntensityd, RandShiftIntensityd)
from monai.transforms.utils import correct_crop_centers, create_rotate
from torch.utils.data import default_collate

__all__ = ["BatchAugment", "pos_neg_patch"]

#: a class covering at least this fraction of the image is sampled by rejection
REJECTION_FRACTION = 1 / 8


# ---- one patch per draw ---------------------------------------------------------------------


def _uniform_voxel(label: torch.Tensor, foreground: bool, count: int, rand: np.random.RandomState) -> int:
    """Flat index of a uniformly drawn voxel of ``label`` (``(1, *spatial)``) that is foreground
    (> 0) or background (== 0); ``count`` voxels of that class exist (> 0)."""
    flat = label.reshape(-1)
    if count >= REJECTION_FRACTION * flat.numel():
        while True:  # expected <= 8 / 64 rounds
            idx = rand.randint(flat.numel(), size=64)
            hit = (flat[torch.from_numpy(idx)] > 0) == foreground
            if bool(hit.any()):
                return int(idx[int(hit.int().argmax())])
    members = torch.nonzero((flat > 0) if foreground else (flat == 0)).reshape(-1)
    return int(members[rand.randint(len(members))])


def pos_neg_patch(item: dict, spatial_size: tuple[int, ...], pos: float, neg: float,
                  rand: np.random.RandomState, fg_count: int | None = None) -> dict:
    """One ``spatial_size`` patch of ``item`` (``image`` ``(C, *spatial)``, ``label``
    ``(1, *spatial)``, spatial >= ``spatial_size``), drawn as ``RandCropByPosNegLabeld`` with
    ``num_samples=1`` would (module docstring). ``fg_count``: the label's foreground voxel
    count if known (saves a pass)."""
    image, label = item["image"], item["label"]
    shape = tuple(label.shape[1:])
    if shape == tuple(spatial_size):  # only one patch fits: the whole image
        return {"image": image, "label": label}
    n = label.numel()
    fg = int(torch.count_nonzero(label)) if fg_count is None else fg_count
    if fg == 0 and n - fg == 0:
        raise ValueError("No sampling location available.")
    ratio = pos / (pos + neg) if fg and n - fg else float(fg > 0)
    foreground = rand.rand() < ratio
    idx = _uniform_voxel(label, foreground, fg if foreground else n - fg, rand)
    centre = [int(c) for c in np.unravel_index(idx, shape)]
    centre = correct_crop_centers(centre, spatial_size, shape, True)
    box = tuple(slice(int(c) - s // 2, int(c) - s // 2 + s) for c, s in zip(centre, spatial_size))
    return {"image": image[(slice(None), *box)], "label": label[(slice(None), *box)]}


# ---- the preset's augmentation on a batch ---------------------------------------------------


def _draw(prob: float, n: int) -> torch.Tensor:
    """Which of ``n`` samples are transformed: Bernoulli(prob) each (MONAI: ``R.rand() < prob``)."""
    return torch.rand(n) < prob


def _uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, dtype=torch.float64)


def _flip(t: RandFlipd) -> Callable[[dict], dict] | None:
    axis = t.flipper.spatial_axis

    def op(batch: dict) -> dict:
        x0 = batch["image"]
        dims = tuple(range(2, x0.ndim)) if axis is None else tuple(2 + a for a in np.atleast_1d(axis).tolist())
        chosen = _draw(t.prob, len(x0)).view(-1, *([1] * (x0.ndim - 1)))
        for k in _keys(t, batch):
            batch[k] = torch.where(chosen, batch[k].flip(dims), batch[k])
        return batch

    return op


def _rotate(t: RandRotated) -> Callable[[dict], dict] | None:
    r = t.rand_rotate
    if not r.keep_size or any(t.align_corners) or any(p not in ("zeros", "border", "reflection") for p in t.padding_mode):
        return None
    modes = dict(zip(t.keys, zip(t.mode, t.padding_mode)))
    if any(m not in ("bilinear", "nearest") for m, _ in modes.values()):
        return None

    def op(batch: dict) -> dict:
        x0 = batch["image"]
        n, spatial = len(x0), tuple(x0.shape[2:])
        dims = len(spatial)
        chosen = torch.nonzero(_draw(t.prob, n)).reshape(-1)
        if len(chosen) == 0:
            return batch
        angles = torch.stack([_uniform(*r.range_x, n), _uniform(*r.range_y, n), _uniform(*r.range_z, n)], 1)[chosen]
        mats = torch.stack([torch.as_tensor(create_rotate(dims, a[0].item() if dims == 2 else a.tolist()),
                                            dtype=torch.float64)[:dims, :dims] for a in angles])
        # output voxel p (centred c = p - (s-1)/2) samples input voxel R c + (s-1)/2, as MONAI's Rotate
        axes = [torch.arange(s, dtype=torch.float64) - (s - 1) / 2 for s in spatial]
        centred = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*spatial, dims)
        src = torch.einsum("bij,...j->b...i", mats, centred) + torch.tensor([(s - 1) / 2 for s in spatial],
                                                                             dtype=torch.float64)
        size = torch.tensor(spatial, dtype=torch.float64)
        grid = ((2 * src + 1) / size - 1).flip(-1).to(x0.dtype)  # align_corners=False; grid is (x, y[, z])
        for k in _keys(t, batch):
            mode, padding = modes[k]
            x = batch[k].clone()
            x[chosen] = F.grid_sample(batch[k][chosen], grid, mode=mode, padding_mode=padding, align_corners=False)
            batch[k] = x
        return batch

    return op


def _intensity(t, inner, lo_hi: tuple[float, float], apply) -> Callable[[dict], dict] | None:
    channel_wise = inner.channel_wise

    def op(batch: dict) -> dict:
        for k in _keys(t, batch):
            x = batch[k]
            chosen = _draw(t.prob, len(x)).view(-1, *([1] * (x.ndim - 1)))
            value = _uniform(*lo_hi, len(x), x.shape[1] if channel_wise else 1).view(
                len(x), -1, *([1] * (x.ndim - 2))).to(x.dtype)
            batch[k] = torch.where(chosen, apply(x, value), x)
        return batch

    return op


def _scale(t: RandScaleIntensityd):
    return _intensity(t, t.scaler, t.scaler.factors, lambda x, f: x * (1 + f))


def _shift(t: RandShiftIntensityd):
    if any(k is not None for k in t.factor_key):
        return None
    return _intensity(t, t.shifter, t.shifter.offsets, lambda x, o: x + o)


_BATCHED = {RandFlipd: _flip, RandRotated: _rotate, RandScaleIntensityd: _scale, RandShiftIntensityd: _shift}


def _keys(t, batch: dict) -> list[str]:
    return [k for k in t.keys if k in batch]


def _per_sample(t) -> Callable[[dict], dict]:
    """MONAI's own transform on each sample in turn (plain tensors, no metadata)."""
    from carefl.data.decathlon import _no_meta, _plain

    def op(batch: dict) -> dict:
        out: dict[str, list[torch.Tensor]] = {k: [] for k in batch}
        with _no_meta():
            for i in range(len(batch["image"])):
                item = t({k: v[i] for k, v in batch.items()})
                for k in batch:
                    out[k].append(_plain(item[k]))
        return {k: torch.stack(v) for k, v in out.items()}

    return op


class BatchAugment:
    """``collate_fn`` that collates ``(image, label)`` samples and applies the preset's
    ``augment`` to the batch, each sample independently (module docstring).

    Args:
        augment: the preset's augmentation (``monai.transforms.Compose``, from
            :func:`carefl.data.presets.build_transforms`).
    """

    def __init__(self, augment: Compose):
        self.augment = augment
        self.ops = []
        for t in augment.transforms:
            make = _BATCHED.get(type(t))
            op = make(t) if make is not None else None
            self.ops.append(op if op is not None else _per_sample(t))

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(samples)
        segmentation = labels.ndim == images.ndim
        batch = {"image": images, **({"label": labels} if segmentation else {})}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", UserWarning)
            for op in self.ops:
                batch = op(batch)
        return batch["image"].contiguous(), batch["label"].contiguous() if segmentation else labels


