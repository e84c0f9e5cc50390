"""Preprocessed records cached once on the hospital's disk, so later rounds skip reading and resampling.

    cache = DiskCache(records, prepare, directory, config_key, hospital="st-mary")
    cache[i]          # {"image": Tensor (C, *spatial), "label": Tensor (1, *spatial) | "class": int}
    cache.cards[i]    # the record's data-card figures (native shape, spacing, intensities, labels)
    cache.problems    # [(entry name, message)] of records that could not be prepared

One file per record, ``<directory>/<sha256>.pt``, the hash covering the record's files (path,
mtime, size), its label and ``config_key`` (the preprocessing preset's digest and the task keys
the tensors depend on): editing a file or a preset makes new entries, never stale reads. Files
are written atomically (temp file + rename), so a crash leaves no half-written entry. Items are
read back with ``torch.load(weights_only=True)`` on access: memory holds one record at a time,
whatever the size of the datalist.

Written here rather than with MONAI's ``PersistentDataset``: that one prepares a record on its
first access, in the middle of a training epoch, and stops at the first bad file; a hospital
needs every record prepared and every problem reported before it trains (``carefl-data check``),
and its policy may skip a few bad files (``max-bad-files``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from carefl.checkpoint import atomic_save, atomic_write_text
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
            path = self.directory / f"{key}.pt" if self.directory is not None else None
            card_path = path.with_suffix(".json") if path is not None else None
            if path is not None and path.is_file() and card_path.is_file():
                self._keep(record, path, json.loads(card_path.read_text()))
                continue
            try:
                item, card = prepare(record)
            except DataError as e:
                self.problems.append((record["name"], str(e)))
                continue
            done += 1
            if path is None:
                self._keep(record, item, card)
            else:
                atomic_save(item, path)
                atomic_write_text(card_path, json.dumps(card))
                self._keep(record, path, card)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                rate = (now - start) / done
                log.info("%s: preprocessed %d/%d records (about %.0f s left)", hospital or "data", i + 1,
                         len(records), rate * (len(records) - i - 1))
                last = now

    def _keep(self, record: dict, entry: Path | dict, card: dict) -> None:
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
        try:
            return torch.load(entry, weights_only=True)
        except Exception as err:  # damaged on disk since it was written: prepare the record again
            log.warning("cache entry %s of %s is unreadable (%s); preparing it again", entry.name, self.names[i],
                        type(err).__name__)
            item, _ = self._prepare(self._records[i])
            atomic_save(item, entry)
            return item

