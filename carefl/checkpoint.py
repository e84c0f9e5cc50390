"""Atomic save / load of the server state, one checkpoint per completed round.

Layout inside a run directory::

    checkpoints/round_001.pt   torch.save'd state after round 1
    checkpoints/round_002.pt
    checkpoints/latest         text: the file name of the newest complete checkpoint

Every file is written to a temporary file in the same directory, fsync'ed, then renamed over
the target (``os.replace``), so a crash leaves either the old file or the new one, never a
half-written one; ``latest`` is updated only after its checkpoint is durable.

The state is a plain dict (tensors, numbers, strings, None, lists, dicts), loaded back with
``torch.load(weights_only=True)`` so a checkpoint cannot run code. Keys (:data:`STATE_KEYS`):

=========== ===============================================================================
round       int, the last completed round (1-based)
global_model  state dict of the plain model (``{name: Tensor}``)
server_opt  server optimiser state (e.g. ``torch.optim.Optimizer.state_dict()``)
aggregator  aggregation rule state (dict; e.g. momentum of centred clipping)
reputation  per-hospital reputation / anomaly history (dict)
ledger_head hash of the ledger's last entry when this checkpoint was taken (str)
metrics     metrics history so far (caller-defined plain dict)
=========== ===============================================================================

A failed load raises :class:`~carefl.errors.CheckpointError` and never modifies or deletes
anything in the run directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from carefl.errors import CheckpointError

STATE_KEYS = ("round", "global_model", "server_opt", "aggregator", "reputation", "ledger_head", "metrics")
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_FIX = "start a new run without resume=..., or point resume= at a run directory containing checkpoints/"


def atomic_write(path: Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write ``path`` atomically (``write(f)`` on a temp file in its directory, fsync, ``os.replace``,
    directory fsync): a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # only our own temp file; the target is untouched
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making a file creation or rename inside it durable (POSIX)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` is either the old or the new file."""
    import torch  # here, not at the top: the receipts and the config check use this module's file helpers

    atomic_write(Path(path), "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write(Path(path), "w", lambda f: f.write(text))


def save_round_checkpoint(run_dir: str | os.PathLike, round: int, state: dict) -> Path:
    """Save the server state after ``round`` and point ``checkpoints/latest`` at it.

    ``state`` must hold every key of :data:`STATE_KEYS` but ``round`` (set from the argument;
    if present it must agree). Returns the checkpoint's path.
    """
    missing = [k for k in STATE_KEYS if k != "round" and k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}; it needs {list(STATE_KEYS)}")
    if state.get("round", round) != round:
        raise ValueError(f"state['round']={state['round']} disagrees with round={round}")
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"round_{round:03d}.pt"  # zero-padded: names sort by round up to 999
    atomic_save({**state, "round": round}, path)
    atomic_write_text(ckpt_dir / LATEST, path.name + "\n")
    return path


def load_latest_checkpoint(run_dir: str | os.PathLike) -> dict:
    """The state saved by the newest :func:`save_round_checkpoint` of ``run_dir``.

    Raises:
        CheckpointError: the run directory, ``checkpoints/latest`` or the checkpoint it names
            is missing, unreadable (e.g. truncated) or lacks a key of :data:`STATE_KEYS`.
            The message names the file and the fix; nothing is modified or deleted.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={run_dir}: run directory not found; {_FIX}")
    latest = run_dir / CHECKPOINT_DIR / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {latest} not found (no round completed); {_FIX}")
    name = latest.read_text(encoding="utf-8").strip()
    path = latest.parent / name
    if not name or Path(name).name != name or not path.is_file():
        raise CheckpointError(f"{latest} names {name!r}, which is not a file in {latest.parent}; {_FIX}")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, non-plain object: all "unreadable"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's weights-only refusal buries the cause ("Unsupported global ...") in a later line
        reason = next((line for line in lines if line.startswith("WeightsUnpickler")), lines[0]).split(". ")[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason}); {_FIX}") from err
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {missing}; {_FIX}")
    return state
