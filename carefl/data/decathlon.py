"""A hospital's Decathlon-style datalist: NIfTI (.nii, .nii.gz) or PNG images, read by MONAI.

    {"training":   [{"image": "img/p1.nii.gz", "label": "lbl/p1.nii.gz"}, ...],
     "test":       [{"image": ..., "label": ...}, ...]}      # or "validation"; optional

Paths are relative to the datalist's directory and must stay inside it (an entry such as
``../../etc/x`` or an absolute path elsewhere is rejected). Segmentation labels are files,
binarised (> 0 -> 1); classification labels are ints in ``[0, task.num_classes)``. Without a
test list, ``data.test_fraction`` of the training entries is split off (seeded by ``cfg.seed``).

Every image is loaded once (``LoadImage`` with channel first, ``ScaleIntensity`` to [0, 1],
``Resize`` to ``data.spatial_size``; labels with nearest-neighbour resizing) and the tensors
are cached in-process, keyed on the datalist's path, mtime and size.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage, Resize, ScaleIntensity
from monai.utils import convert_to_tensor
from torch.utils.data import TensorDataset

from carefl.data.files import data_error, file_stamp
from carefl.errors import ConfigError

_TEST_KEYS = ("test", "validation")


def load_decathlon(data: dict, task: dict, seed: int, hospital: str, path: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets from the datalist JSON at ``path``.

    Items: image float32 ``(task.in_channels, *data.spatial_size)`` in [0, 1]; label float32
    ``(1, *spatial_size)`` in {0, 1} (segmentation) or int64 ``()`` (classification).
    """
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
    train, test = _load(
        hospital, *file_stamp(hospital, path, "datalist"), task["kind"], int(task["in_channels"]),
        int(task["num_classes"]), spatial_size, fraction, int(seed),
    )
    return TensorDataset(*train), TensorDataset(*test)


@functools.lru_cache(maxsize=64)
def _load(
    hospital: str, path: str, _mtime_ns: int, _size: int, kind: str, in_channels: int,
    num_classes: int, spatial_size: tuple[int, ...], fraction: float, seed: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Cached ((train images, labels), (test images, labels)); mtime/size only key the cache."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data_error(hospital, path, f"is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise data_error(hospital, path, 'is not a datalist; expected {"training": [...], "test": [...]}')
    segmentation = kind == "segmentation"
    training = _entries(hospital, path, raw, "training", segmentation, num_classes)
    test_key = next((k for k in _TEST_KEYS if k in raw), None)
    if test_key is not None:
        test = _entries(hospital, path, raw, test_key, segmentation, num_classes)
    else:
        if len(training) < 2:
            raise data_error(
                hospital, path,
                f"'training' has {len(training)} entry and there is no 'test' list; "
                "give at least 2 entries or a 'test' list",
            )
        order = np.random.default_rng(seed).permutation(len(training))
        n_test = min(max(1, round(fraction * len(training))), len(training) - 1)
        test = [training[i] for i in order[:n_test]]
        training = [training[i] for i in order[n_test:]]
    load = functools.partial(_load_entries, hospital, path, segmentation, in_channels, spatial_size)
    return load(training), load(test)


def _entries(
    hospital: str, path: str, raw: dict, key: str, segmentation: bool, num_classes: int
) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, entry)]`` of list ``key`` with absolute paths, checked to stay in the datalist's dir."""
    items = raw.get(key)
    if not isinstance(items, list) or not items:
        problem = "is missing" if items is None else "is empty" if items == [] else "is not a list"
        raise data_error(hospital, path, f"the {key!r} list {problem}; list at least one {{'image', 'label'}} entry")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise data_error(
                hospital, path, f"entry {key}[{i}] = {item!r} needs an 'image' and a 'label' "
                "(a file for segmentation, an int for classification)"
            )
    base = os.path.dirname(path)
    entries = load_decathlon_datalist(path, is_segmentation=segmentation, data_list_key=key, base_dir=base)
    named = []
    for i, entry in enumerate(entries):
        name = f"{key}[{i}]"
        files = [entry["image"]] if isinstance(entry["image"], str) else list(entry["image"])
        if segmentation:
            files.append(entry["label"])
        elif isinstance(entry["label"], bool) or not isinstance(entry["label"], int) \
                or not 0 <= entry["label"] < num_classes:
            raise data_error(
                hospital, path, f"entry {name} has label {entry['label']!r}; classification labels "
                f"are ints in [0, task.num_classes={num_classes})"
            )
        for file in files:
            if not isinstance(file, str) or os.path.commonpath([base, os.path.abspath(file)]) != base:
                raise data_error(
                    hospital, path, f"entry {name} points outside the datalist's directory ({file!r}); "
                    f"keep image and label files under {base}"
                )
        named.append((name, entry))
    return named


def _load_entries(
    hospital: str, path: str, segmentation: bool, in_channels: int, spatial_size: tuple[int, ...],
    entries: list[tuple[str, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked images float32 (N, C, *spatial_size) and labels of ``entries``."""
    dims = len(spatial_size)
    reader = LoadImage(image_only=True, ensure_channel_first=True)

    def read(name: str, role: str, file: str | list[str]) -> torch.Tensor:
        """(C, *spatial) float32; a trailing singleton axis (2D slice saved as 3D) is dropped."""
        try:
            img = convert_to_tensor(reader(file), dtype=torch.float32, track_meta=False)
        except Exception as e:  # MONAI wraps reader errors in several types; all mean "unreadable"
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise data_error(hospital, path, f"entry {name} {role} {file}: cannot read it ({cause})") from e
        if img.ndim == dims + 2 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != dims + 1:
            raise data_error(
                hospital, path, f"entry {name} {role} {file} has shape {tuple(img.shape[1:])} (channel first: "
                f"{tuple(img.shape)}), which is not {dims}D; set task.spatial_dims or fix the file"
            )
        return img

    images, labels = [], []
    for name, entry in entries:
        image = read(name, "image", entry["image"])
        if image.shape[0] != in_channels:
            raise data_error(
                hospital, path, f"entry {name} image {entry['image']} has {image.shape[0]} channels but "
                f"task.in_channels={in_channels}; set task.in_channels to match"
            )
        images.append(convert_to_tensor(Resize(spatial_size)(ScaleIntensity()(image)), track_meta=False))
        if segmentation:
            label = read(name, "label", entry["label"])
            if label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
                raise data_error(
                    hospital, path, f"entry {name}: image {entry['image']} has shape {tuple(image.shape)} but "
                    f"label {entry['label']} has {tuple(label.shape)}; they must match (channel first)"
                )
            labels.append((convert_to_tensor(Resize(spatial_size, mode="nearest")(label), track_meta=False) > 0).float())
        else:
            labels.append(torch.tensor(entry["label"], dtype=torch.int64))
    return torch.stack(images).float(), torch.stack(labels)
