"""Preprocessed records cached once on the hospital's disk, so later rounds skip reading and resampling.

    cache = DiskCache(records, prepare, directory, config_key, hospital="st-mary")
    cache[i]          # {"image": Tensor (C, *spatial), "label": Tensor (1, *spatial) | "class": int}, read-only
    cache.cards[i]    # the record's data-card figures (native shape, spacing, intensities, labels)
    cache.problems    # [(entry name, message)] of records that could not be prepared

Per record, ``<directory>/<sha256>.image.npy`` (and ``.label.npy`` for segmentation) and
``<sha256>.json`` (the data card, the class of a classification record, the array names), the
hash covering the record's files (path, mtime, size), its label and ``config_key`` (the
preprocessing preset's digest and the task keys the tensors depend on): editing a file or a
preset makes new entries, never stale reads. Files are written atomically (temp file + rename),
the JSON last, so a crash leaves no half-written entry. Arrays are plain ``.npy`` (no pickle:
``allow_pickle=False``) memory-mapped on access, through the dtype, shape and data offset the
JSON records (:func:`_map`): a draw reads only the pages its patch touches, memory holds no more
than the records in use, and opening costs tens of microseconds (``torch.load(weights_only=True)``
of a 256x256 pair cost ~1 ms, which made the disk cache most of an epoch's data time). Items are
read-only tensors over the mapping.

Written here rather than with MONAI's ``PersistentDataset``: that one prepares a record on its
first access, in the middle of a training epoch, and stops at the first bad file; a hospital
needs every record prepared and every problem reported before it trains (``carefl-data check``),
and its policy may skip a few bad files (``max-bad-files``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from carefl.checkpoint import atomic_write, atomic_write_text
from carefl.errors import DataError

log = logging.getLogger("carefl.data")
#: seconds between progress lines while records are prepared
PROGRESS_EVERY_S = 10.0


def record_key(record: dict, config_key: str) -> str:
    """sha256 hex of a record's files (path, mtime_ns, size), label and ``config_key``."""
    files = list(record["image"]) + ([record["label"]] if isinstance(record["label"], str) else [])
    stamps = []
    for f in files:
        try:
            st = os.stat(f)
            stamps.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((f, None, None))  # missing: the reader reports it when preparing
    label = record["label"] if not isinstance(record["label"], str) else None
    return hashlib.sha256(json.dumps([config_key, stamps, label]).encode()).hexdigest()


class DiskCache(Dataset):
    """The prepared records of one split (see the module docstring).

    Args:
        records: datalist records (``name``, ``image`` list, ``label``).
        prepare: record -> ``(item, card)``: item a dict of tensors (and ints), card a JSON-able
            dict; raises :class:`DataError` for a record that cannot be used.
        directory: cache directory (created); None keeps prepared items in memory instead.
        config_key: what the tensors depend on besides the files (see :func:`record_key`).
        hospital: for progress lines.
    """

    def __init__(self, records: list[dict], prepare: Callable[[dict], tuple[dict, dict]], directory: Path | None,
                 config_key: str, hospital: str = ""):
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.cards: list[dict] = []
        self.problems: list[tuple[str, str]] = []
        self._entries: list[Path | dict] = []
        self._records: list[dict] = []
        self._prepare = prepare
        start = last = time.monotonic()
        done = 0
        for i, record in enumerate(records):
            key = record_key(record, config_key)
            stem = self.directory / key if self.directory is not None else None
            if stem is not None and stem.with_suffix(".json").is_file():
                meta = json.loads(stem.with_suffix(".json").read_text())
                self._keep(record, (stem, meta), meta["card"])
                continue
            try:
                item, card = prepare(record)
            except DataError as e:
                self.problems.append((record["name"], str(e)))
                continue
            done += 1
            if stem is None:
                self._keep(record, item, card)
            else:
                self._keep(record, (stem, _save(item, card, stem)), card)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                rate = (now - start) / done
                log.info("%s: preprocessed %d/%d records (about %.0f s left)", hospital or "data", i + 1,
                         len(records), rate * (len(records) - i - 1))
                last = now

    def _keep(self, record: dict, entry: tuple | dict, card: dict) -> None:
        self.names.append(record["name"])
        self._records.append(record)
        self._entries.append(entry)
        self.cards.append(card)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> dict:
        entry = self._entries[i]
        if isinstance(entry, dict):
            return dict(entry)
        stem, meta = entry
        try:
            return _load(stem, meta)
        except Exception as err:  # damaged on disk since it was written: prepare the record again
            log.warning("cache entry %s of %s is unreadable (%s); preparing it again", stem.name, self.names[i],
                        type(err).__name__)
            item, card = self._prepare(self._records[i])
            self._entries[i] = (stem, _save(item, card, stem))
            return item


def _save(item: dict, card: dict, stem: Path) -> dict:
    """Write ``item``'s tensors as ``<stem>.<name>.npy``, then ``<stem>.json``; returns the JSON's
    content, which also holds each array's layout (dtype, shape, byte offset of its data) so
    :func:`_load` can map it without parsing the ``.npy`` header again."""
    arrays = [name for name, value in item.items() if isinstance(value, torch.Tensor)]
    layout = {}
    for name in arrays:
        array = item[name].detach().cpu().contiguous().numpy()
        path = stem.with_name(f"{stem.name}.{name}.npy")
        atomic_write(path, "wb", lambda f, a=array: np.save(f, a, allow_pickle=False))
        # a C-order .npy is its header followed by the raw bytes: the data starts nbytes from the end
        layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                        "offset": path.stat().st_size - array.nbytes}
    meta = {"card": card, "arrays": arrays, "values": {k: v for k, v in item.items() if k not in arrays},
            "layout": layout}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta))
    return meta


def _map(path: str, dtype: str, shape: list[int], offset: int) -> np.ndarray:
    """A read-only array over the bytes of ``path`` from ``offset`` (its layout as :func:`_save`
    recorded it). Opening costs one ``open`` and one ``mmap``, against ~0.3 ms for
    ``np.load(mmap_mode="r")``, which parses the header (``ast.literal_eval``) and opens the file
    twice: that was half of a 2D epoch's data time. The file's size must match the layout
    exactly, so a truncated or rewritten file is caught here (and prepared again)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if dt.hasobject or size != offset + count * dt.itemsize:
            raise ValueError(f"{path}: {size} bytes, not the recorded layout {dtype} {shape} at {offset}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dt, count=count, offset=offset).reshape(shape)


def _load(stem: Path, meta: dict) -> dict:
    """The item :func:`_save` wrote: read-only tensors over memory-mapped ``.npy`` files (an entry
    written before layouts were recorded is opened with ``np.load``)."""
    item: dict = dict(meta["values"])
    layout = meta.get("layout", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only by contract
        for name in meta["arrays"]:
            path = f"{stem}.{name}.npy"
            if name in layout:
                array = _map(path, **layout[name])
            else:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            item[name] = torch.from_numpy(array)
    return item
