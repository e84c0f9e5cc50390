"""One hospital's data, whatever its source: synthetic consortium, Decathlon datalist, MedMNIST npz.

    from carefl.data import load_hospital
    hd = load_hospital(cfg, "st-mary", 0)              # simulation: cfg.data says where
    hd = load_hospital(cfg, "st-mary", 0, "/data/x")   # deployment: the SuperNode's data-path

Datasets are map-style and return ``(image, label)``: image float32 ``(C, *spatial)`` with
spatial ``(H, W)`` or ``(D, H, W)``; segmentation label float32 ``(1, *spatial)`` ({0, 1} for
``task.num_classes=1``, class indices otherwise); classification label int64 ``()``. Loaded
data is cached in-process (Flower re-creates the ClientApp every round in the same worker), and
real data also on the hospital's disk (:mod:`carefl.data.cache`), so treat tensors as read-only.
``HospitalData.window`` is set when test images are evaluated with sliding windows (real
segmentation data at native resolution); otherwise the test images have the network's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from carefl.errors import ConfigError, DataError

__all__ = ["DataError", "HospitalData", "load_hospital"]


@dataclass
class HospitalData:
    """A hospital's training and held-out test data (both non-empty)."""

    name: str
    train: Dataset
    test: Dataset
    window: Any = None  # carefl.data.decathlon.SlidingWindow | None
    card: dict | None = None  # the data card of a datalist (carefl.data.card); None for other sources


def load_hospital(cfg: DictConfig | dict, hospital: str, index: int, data_path: str | None = None,
                  cache_dir: Path | None = None, max_bad_files: int = 0) -> HospitalData:
    """Load ``hospital``'s (train, test) datasets as ``cfg.data`` describes.

    Args:
        cfg: the composed config (a ``DictConfig`` or the same nested ``dict``); reads
            ``data`` (``name`` synthetic | decathlon | medmnist and its keys), ``task`` and ``seed``.
        hospital: the hospital's name (used in error messages and the ``cfg.data`` maps).
        index: its position in ``federation.hospitals`` (picks the synthetic site profile).
        data_path: the SuperNode's ``data-path`` node config; when given it replaces the path
            ``cfg.data`` names (a datalist JSON for decathlon, an .npz for medmnist).
        cache_dir: where preprocessed real data is kept (the hospital's ``cache-dir``); None
            keeps it in memory.
        max_bad_files: datalist records that may fail to load and be skipped (``max-bad-files``).

    Raises:
        ConfigError: ``data.name`` or a task key the data source cannot serve.
        DataError: the hospital's data is missing, unreadable or inconsistent.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    data, task, seed = cfg["data"], cfg["task"], int(cfg.get("seed", 0))
    name = data.get("name")
    if name == "synthetic":
        from carefl.data.synthetic import load_synthetic

        train, test = load_synthetic(data, task, seed, index)
    elif name == "decathlon":
        from carefl.data.decathlon import load_decathlon

        train, test, window, card = load_decathlon(data, task, seed, hospital,
                                                   _data_file(data, "datalists", hospital, data_path), cache_dir,
                                                   max_bad_files)
        return HospitalData(hospital, train, test, window, card)
    elif name == "medmnist":
        from carefl.data.medmnist import load_medmnist

        train, test = load_medmnist(task, hospital, _data_file(data, "files", hospital, data_path))
    else:
        raise ConfigError(f"data.name={name!r}; use synthetic, decathlon or medmnist")
    return HospitalData(hospital, train, test)


def _data_file(data: dict[str, Any], key: str, hospital: str, data_path: str | None) -> str:
    """The file holding ``hospital``'s data: ``data_path`` if given, else ``data.<key>[hospital]``."""
    if data_path:
        return str(data_path)
    path = (data.get(key) or {}).get(hospital)
    if not path:
        raise DataError(
            f"hospital {hospital!r}: no data configured; set data.{key}.{hospital}=<file> (simulation) "
            f"or the SuperNode node config data-path=<file> (deployment)"
        )
    return str(path)
