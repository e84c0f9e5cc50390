"""What the real-data loaders share: one error format and the cache key of a data file."""

from __future__ import annotations

import os

from carefl.errors import DataError


def data_error(hospital: str, path: str, problem: str) -> DataError:
    """``DataError`` naming the hospital, the file and the problem (with its fix)."""
    return DataError(f"hospital {hospital!r}, {path}: {problem}")


def file_stamp(hospital: str, path: str, what: str) -> tuple[str, int, int]:
    """``(absolute path, mtime_ns, size)`` of a hospital's data file: the in-process cache key.

    Raises ``DataError`` when the file does not exist (``what`` says which file was expected).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise data_error(hospital, path, f"{what} does not exist; fix data-path or the data config")
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size
