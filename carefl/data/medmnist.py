"""A hospital's MedMNIST-format ``.npz`` (classification).

Keys ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` (``val_images`` /
``val_labels`` optional: they join the training split, since the federation has no use for a
separate validation split). Images are 2D ``(N, H, W)`` / ``(N, H, W, C)`` or 3D
``(N, D, H, W)`` / ``(N, D, H, W, C)`` as ``task.spatial_dims`` says; uint8 is scaled to [0, 1].
Labels are ``(N,)`` or ``(N, 1)`` ints in ``[0, task.num_classes)``. Loaded arrays are cached
in-process, keyed on the file's path, mtime and size.
"""

from __future__ import annotations

import functools
import zipfile

import numpy as np
import torch
from torch.utils.data import TensorDataset

from carefl.data.files import data_error, file_stamp
from carefl.errors import ConfigError

_REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")


def load_medmnist(task: dict, hospital: str, path: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets from the npz at ``path``.

    Items: image float32 ``(task.in_channels, *spatial)``, label int64 ``()``.
    """
    if task["kind"] != "classification":
        raise ConfigError(
            f"data=medmnist holds class labels but task.kind={task['kind']}; choose task=cls2d or task=cls3d"
        )
    train, test = _load(
        hospital, *file_stamp(hospital, path, "npz file"), int(task["spatial_dims"]),
        int(task["in_channels"]), int(task["num_classes"]),
    )
    return TensorDataset(*train), TensorDataset(*test)


@functools.lru_cache(maxsize=64)
def _load(
    hospital: str, path: str, _mtime_ns: int, _size: int, dims: int, in_channels: int, num_classes: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Cached ((train images, labels), (test images, labels)); mtime/size only key the cache."""
    if not zipfile.is_zipfile(path):  # also catches a plain .npy, which np.load reads as one array
        raise data_error(hospital, path, "is not an .npz archive (a zip of named arrays, as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise data_error(hospital, path, f"is not a readable .npz archive ({e})") from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise data_error(
            hospital, path, f"lacks {missing}; found keys {sorted(arrays)}, expected {list(_REQUIRED)} "
            "(val_images/val_labels optional)"
        )
    splits = ["train", "val"] if "val_images" in arrays and "val_labels" in arrays else ["train"]
    train = [_split(hospital, path, arrays, s, dims, in_channels, num_classes) for s in splits]
    test = _split(hospital, path, arrays, "test", dims, in_channels, num_classes)
    return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])), test


def _split(
    hospital: str, path: str, arrays: dict[str, np.ndarray], split: str, dims: int, in_channels: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 (N, C, *spatial) and labels int64 (N,) of one split, checked."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    expected = f"(N, {'D, ' if dims == 3 else ''}H, W) or (N, {'D, ' if dims == 3 else ''}H, W, {in_channels})"
    if images.ndim == dims + 1:
        images = images[:, None]
    elif images.ndim == dims + 2 and images.shape[-1] == in_channels:
        images = np.moveaxis(images, -1, 1)
    else:
        raise data_error(
            hospital, path, f"{split}_images has shape {images.shape}; task.spatial_dims={dims} and "
            f"task.in_channels={in_channels} expect {expected}"
        )
    if images.shape[0] == 0:
        raise data_error(hospital, path, f"the {split} split is empty; it needs at least one image")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise data_error(
            hospital, path, f"{split}_labels has shape {labels.shape} for {images.shape[0]} images; "
            f"expected ({images.shape[0]},) or ({images.shape[0]}, 1) (one class per image)"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise data_error(
            hospital, path, f"{split}_labels ({labels.dtype}, {labels.min()}..{labels.max()}) must be ints in "
            f"[0, task.num_classes={num_classes}); set task.num_classes to match"
        )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return torch.from_numpy(images.astype(np.float32) / scale), torch.from_numpy(labels.astype(np.int64))
