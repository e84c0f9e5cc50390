"""A hospital's Decathlon-style datalist: NIfTI, PNG or DICOM at native resolution, through MONAI.

    {"training":   [{"image": "img/p1.nii.gz", "label": "lbl/p1.nii.gz"},
                    {"image": ["t1/p2.nii.gz", "t2/p2.nii.gz"], "label": "lbl/p2.nii.gz"},   # 2 channels
                    {"image": "dicom/p3/", "label": "lbl/p3.nii.gz"}, ...],                 # a DICOM series
     "test":       [{"image": ..., "label": ...}, ...]}      # or "validation"; optional

Paths are relative to the datalist's directory and must stay inside it (an entry such as
``../../etc/x`` or an absolute path elsewhere is rejected). Segmentation labels are files
(:mod:`carefl.data.reading`: geometry and values checked); classification labels are ints in
``[0, task.num_classes)``. Without a test list, ``data.test_fraction`` of the training entries is
split off (seeded by ``cfg.seed``).

Pipeline per record: read (:func:`carefl.data.reading.read_record`) -> the preset's ``steps``
(:mod:`carefl.data.presets`, ``data.preprocess``) -> classification only: ``Resized`` to
``data.spatial_size``. That much runs once and is cached on disk (:mod:`carefl.data.cache`,
the hospital's ``cache-dir``). Then, per draw:

- segmentation, training: pad to at least ``data.spatial_size``, ONE patch of that size
  (drawn as ``RandCropByPosNegLabeld``, ``num_samples=1``, the preset's pos/neg weights, by
  :func:`carefl.data.augment.pos_neg_patch`), then the preset's ``augment`` on the collated
  batch (:class:`carefl.data.augment.BatchAugment`, the loader's ``collate_fn``); evaluation: the whole image at native resolution, with sliding windows of
  ``data.spatial_size`` (``data.sw_overlap``, ``data.sw_batch_size``; :class:`SlidingWindow`);
- classification: the preset's ``augment`` on the batch (training), nothing (evaluation).

**DP with patches.** The privacy unit stays one record (one patient study): the training set's
length is the number of records, and drawing index i returns exactly one patch of record i.
Opacus' Poisson sampler puts each index in a batch independently with probability q, at most
once, so a batch holds at most one patch per record; that patch's gradient is the record's
per-sample gradient, clipped to C. Adding or removing a record changes the batch sum by at most
C, exactly as with whole images, so q = B/N, the step count and the accountant's epsilon are
those of whole-image DP-SGD. (Several patches of one record per draw would have to be summed
into one clipped gradient; CareFL draws one.) ``tests/test_clinical_data.py`` checks that a
Poisson batch never holds two patches of one record.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, load_decathlon_datalist, set_track_meta
from monai.transforms import Resized, SpatialPadd
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from carefl.checkpoint import atomic_write_text
from carefl.data.augment import BatchAugment, pos_neg_patch
from carefl.data.cache import DiskCache
from carefl.data.card import data_card
from carefl.data.files import data_error, file_stamp
from carefl.data.presets import Preset, build_transforms, load_preset
from carefl.data.reading import geometry, read_record
from carefl.errors import ConfigError, DataError

log = logging.getLogger("carefl.data")
_TEST_KEYS = ("test", "validation")
#: the data card's file name in the cache dir (carefl.data.card)
CARD_FILE = "data_card.json"
#: bump when the cached tensors' meaning changes (invalidates every hospital's cache)
CACHE_VERSION = 2  # 2: .npy arrays opened memory-mapped (carefl.data.cache)


@dataclass(frozen=True)
class SlidingWindow:
    """MONAI ``sliding_window_inference`` settings: window ``roi_size`` (voxels per side),
    ``overlap`` in [0, 1) and ``sw_batch_size`` windows per forward pass."""

    roi_size: tuple[int, ...]
    overlap: float
    sw_batch_size: int


@dataclass
class Prepared:
    """A datalist's splits after preparation: cached records, problems, and what was skipped."""

    train: DiskCache
    test: DiskCache
    problems: list[tuple[str, str]]
    preset: Preset
    card: dict  # carefl.data.card.data_card


def load_decathlon(data: dict, task: dict, seed: int, hospital: str, path: str, cache_dir: Path | None = None,
                   max_bad_files: int = 0) -> tuple[Dataset, Dataset, SlidingWindow | None, dict]:
    """(train, test, window, card) from the datalist JSON at ``path``; ``card`` is the data card
    (:mod:`carefl.data.card`).

    Items: image float32 ``(task.in_channels, *spatial)``; segmentation label float32
    ``(1, *spatial)`` (binary {0, 1} or class indices, :mod:`carefl.tasks`); classification
    label int64 ``()``. Training patches / classification images have ``data.spatial_size``;
    segmentation test images keep their (preprocessed) native size, and ``window`` says how to
    evaluate them (None for classification).

    Args:
        cache_dir: where prepared records are kept (the hospital's ``cache-dir``); None: in memory.
        max_bad_files: how many records may fail to prepare and be skipped (the hospital's
            ``max-bad-files``); more raise :class:`DataError` listing the first problems.
    """
    prepared = _prepared(hospital, *file_stamp(hospital, path, "datalist"), json.dumps(data, sort_keys=True),
                         json.dumps(task, sort_keys=True), seed, str(cache_dir) if cache_dir is not None else None)
    if len(prepared.problems) > max_bad_files:
        first = "; ".join(msg for _, msg in prepared.problems[:3])
        raise data_error(hospital, path, f"{len(prepared.problems)} record(s) cannot be used (this hospital's "
                                         f"max-bad-files={max_bad_files}): {first}; run carefl-data check --data-path "
                                         f"{path} for the full list")
    for _, msg in prepared.problems:
        log.warning("hospital %s: skipped (max-bad-files=%d): %s", hospital, max_bad_files, msg)
    for split in ("train", "test"):
        if len(getattr(prepared, split)) == 0:
            raise data_error(hospital, path, f"no usable {split} record is left after skipping bad files")
    spatial_size, preset = tuple(int(s) for s in data["spatial_size"]), prepared.preset
    _, augment = build_transforms(preset)
    if task["kind"] == "segmentation":
        train = Patches(prepared.train, spatial_size, preset.spec["crop_pos"], preset.spec["crop_neg"], augment)
        window = SlidingWindow(spatial_size, float(data["sw_overlap"]), int(data["sw_batch_size"]))
        return train, Records(prepared.test, None), window, prepared.card
    return Records(prepared.train, augment), Records(prepared.test, None), None, prepared.card


def prepare_datalist(data: dict, task: dict, seed: int, hospital: str, path: str,
                     cache_dir: Path | None = None) -> Prepared:
    """Parse the datalist, then read, check and preprocess every record once (cached)."""
    dims = int(task["spatial_dims"])
    spatial_size = tuple(int(s) for s in data["spatial_size"])
    if len(spatial_size) != dims:
        raise ConfigError(
            f"data.spatial_size={list(spatial_size)} has {len(spatial_size)} values but "
            f"task.spatial_dims={dims}; give one size per spatial dimension"
        )
    fraction = float(data["test_fraction"])
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.test_fraction={fraction}; use a value strictly between 0 and 1")
    path, *_ = file_stamp(hospital, path, "datalist")
    segmentation = task["kind"] == "segmentation"
    train_records, test_records = _records(hospital, path, segmentation, int(task["num_classes"]), fraction, seed)
    preset = load_preset(data["preprocess"], data.get("preprocess_digest"))
    steps, _ = build_transforms(preset)
    resize = None if segmentation else Resized(["image"], spatial_size)
    config_key = json.dumps([CACHE_VERSION, preset.digest, task["kind"], dims, int(task["in_channels"]),
                             int(task["num_classes"]), None if segmentation else list(spatial_size)])

    def prepare(record: dict) -> tuple[dict, dict]:
        item = read_record(record, dims, int(task["in_channels"]), int(task["num_classes"]), segmentation)
        card = _card(item)
        try:
            item = steps(item)
            if resize is not None:
                item = resize(item)
        except Exception as e:  # a MONAI transform failing on this record's content
            cause = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise DataError(f"entry {record['name']}: preprocessing ({preset.name}) failed: {cause}") from e
        card["preprocessed_shape"] = [int(s) for s in item["image"].shape[1:]]
        out = {"image": _plain(item["image"])}
        out.update({"label": _plain(item["label"])} if segmentation else {"class": int(item["class"])})
        return out, card

    cache = Path(cache_dir) if cache_dir is not None else None
    train = DiskCache(train_records, prepare, cache, config_key, hospital)
    test = DiskCache(test_records, prepare, cache, config_key, hospital)
    prepared = Prepared(train, test, train.problems + test.problems, preset, {})
    prepared.card = data_card(prepared, task, {"train": train_records, "test": test_records})
    if cache is not None:  # the hospital's own copy, beside its cached images; never sent
        atomic_write_text(cache / CARD_FILE, json.dumps(prepared.card, indent=1))
    return prepared


@functools.lru_cache(maxsize=16)
def _prepared(hospital: str, path: str, _mtime_ns: int, _size: int, data: str, task: str, seed: int,
              cache_dir: str | None) -> Prepared:
    """:func:`prepare_datalist`, once per process and datalist version (Flower reuses its workers
    across rounds; the disk cache serves new processes)."""
    return prepare_datalist(json.loads(data), json.loads(task), seed, hospital, path, cache_dir and Path(cache_dir))


def _card(item: dict) -> dict:
    """Data-card figures of one read record (native geometry; no voxel values leave this dict
    except the image's min/max and the label's class counts)."""
    image = item["image"]
    card: dict[str, Any] = {**geometry(image), "channels": int(image.shape[0]),
                            "min": float(image.min()), "max": float(image.max())}
    if "label" in item:
        values, counts = torch.unique(item["label"], return_counts=True)
        card["label_voxels"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    else:
        card["class"] = int(item["class"])
    return {**card, "shape": list(card["shape"]), "spacing": list(card["spacing"])}


@contextlib.contextmanager
def _no_meta():
    """Per-draw transforms on plain tensors: MONAI's MetaTensor bookkeeping (affines, applied
    operations) would cost more than the crop and augmentation themselves, and a training patch
    needs no geometry (``monai.data.set_track_meta`` is process-wide, so it is restored)."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def _plain(x) -> torch.Tensor:
    """A contiguous float32 tensor without MONAI metadata (what the cache stores and batches hold)."""
    return convert_to_tensor(x, dtype=torch.float32, track_meta=False).contiguous()


class Records(Dataset):
    """Prepared records as ``(image, label)``. ``augment`` (the preset's, training only) runs on
    whole batches: the loader takes :attr:`collate_fn` (:class:`carefl.data.augment.BatchAugment`)."""

    def __init__(self, cache: DiskCache, augment):
        self.cache, self.augment = cache, augment
        self.collate_fn = BatchAugment(augment) if augment is not None else None

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.cache[i]
        if "class" in item:
            return _plain(item["image"]), torch.tensor(item["class"], dtype=torch.int64)
        return _plain(item["image"]), _plain(item["label"])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every prepared (not augmented) record stacked: ``(images, labels)``; same-size records only."""
        items = [self[i] for i in range(len(self))]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


class Patches(Records):
    """One random patch of ``spatial_size`` per record and draw (see "DP with patches" above),
    sampled as ``RandCropByPosNegLabeld(num_samples=1)`` with the preset's ``crop_pos``/``crop_neg``
    (:func:`carefl.data.augment.pos_neg_patch`); ``augment`` runs on the batch (:class:`Records`)."""

    def __init__(self, cache: DiskCache, spatial_size: tuple[int, ...], pos: float, neg: float, augment):
        super().__init__(cache, augment)
        self.spatial_size, self.pos, self.neg = tuple(spatial_size), float(pos), float(neg)
        self.pad = SpatialPadd(["image", "label"], spatial_size)
        # numpy's global generator, not a private RandomState: PyTorch reseeds the global one in
        # each DataLoader worker (a hospital's data-workers), where a private one would be forked
        # with the same state into every worker and draw the same patch positions in each
        self.rand = np.random
        self._fg: dict[int, int] = {}  # record -> foreground voxels (after padding), counted once

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.cache[i]
        if any(s < p for s, p in zip(item["image"].shape[1:], self.spatial_size)):
            with _no_meta():
                item = self.pad(item)
        if i not in self._fg:
            self._fg[i] = int(torch.count_nonzero(item["label"]))
        patch = pos_neg_patch(item, self.spatial_size, self.pos, self.neg, self.rand, self._fg[i])  # exactly one
        return _plain(patch["image"]), _plain(patch["label"])


@functools.lru_cache(maxsize=16)
def _parsed(hospital: str, path: str, _mtime_ns: int, _size: int) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data_error(hospital, path, f"is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise data_error(hospital, path, 'is not a datalist; expected {"training": [...], "test": [...]}')
    return raw


def _records(hospital: str, path: str, segmentation: bool, num_classes: int, fraction: float,
             seed: int) -> tuple[list[dict], list[dict]]:
    """(training, test) records: ``{"name", "image": [files], "label"}`` with absolute paths."""
    raw = _parsed(hospital, *file_stamp(hospital, path, "datalist"))
    training = _entries(hospital, path, raw, "training", segmentation, num_classes)
    test_key = next((k for k in _TEST_KEYS if k in raw), None)
    if test_key is not None:
        return training, _entries(hospital, path, raw, test_key, segmentation, num_classes)
    if len(training) < 2:
        raise data_error(
            hospital, path,
            f"'training' has {len(training)} entry and there is no 'test' list; give at least 2 entries or a 'test' list",
        )
    order = np.random.default_rng(seed).permutation(len(training))
    n_test = min(max(1, round(fraction * len(training))), len(training) - 1)
    return [training[i] for i in order[n_test:]], [training[i] for i in order[:n_test]]


def _entries(hospital: str, path: str, raw: dict, key: str, segmentation: bool, num_classes: int) -> list[dict]:
    """Records of list ``key`` with absolute paths, checked to stay in the datalist's dir."""
    items = raw.get(key)
    if not isinstance(items, list) or not items:
        problem = "is missing" if items is None else "is empty" if items == [] else "is not a list"
        raise data_error(hospital, path, f"the {key!r} list {problem}; list at least one {{'image', 'label'}} entry")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise data_error(
                hospital, path, f"entry {key}[{i}] = {item!r:.200} needs an 'image' and a 'label' "
                "(a file for segmentation, an int for classification)"
            )
    base = os.path.dirname(path)
    entries = load_decathlon_datalist(path, is_segmentation=segmentation, data_list_key=key, base_dir=base)
    records = []
    for i, entry in enumerate(entries):
        name = f"{key}[{i}]"
        files = [entry["image"]] if isinstance(entry["image"], str) else list(entry["image"])
        if not files:
            raise data_error(hospital, path, f"entry {name} has an empty image list; list one file per channel")
        if segmentation and not isinstance(entry["label"], str):
            raise data_error(hospital, path, f"entry {name} has label {entry['label']!r}; segmentation labels are files")
        if not segmentation and (isinstance(entry["label"], bool) or not isinstance(entry["label"], int)
                                 or not 0 <= entry["label"] < num_classes):
            raise data_error(
                hospital, path, f"entry {name} has label {entry['label']!r}; classification labels "
                f"are ints in [0, task.num_classes={num_classes})"
            )
        for file in files + ([entry["label"]] if segmentation else []):
            if not isinstance(file, str) or os.path.commonpath([base, os.path.abspath(file)]) != base:
                raise data_error(
                    hospital, path, f"entry {name} points outside the datalist's directory ({file!r}); "
                    f"keep image and label files under {base}"
                )
        records.append({"name": name, "image": [os.path.abspath(f) for f in files],
                        "label": os.path.abspath(entry["label"]) if segmentation else entry["label"]})
    return records
