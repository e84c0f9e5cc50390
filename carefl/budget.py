"""A hospital's privacy budget on disk: locked, written ahead, signed, checked against its receipts.

The budget is the Opacus accountant history of one training set (list of (sigma, q, steps)),
kept in ``<state-dir>/privacy_history.json`` across rounds AND runs: epsilon is spent on the
data, not on a run. What protects it, and against whom:

- **Races** (two runs, or two rounds, on one state dir at once): :func:`locked` holds an
  exclusive ``fcntl.flock`` on ``<state-dir>/.lock`` for the whole load -> check -> train ->
  save sequence, so the second waits for the first and accounts on top of it.
- **Crashes**: :func:`save` with ``base=`` writes the history *with the round's planned steps already
  added* before training starts (write-ahead); a crash during training can only over-count.
  Writes are atomic (tmp + fsync + rename), so a file is never torn.
- **Edits and resets** by anyone without the hospital's signing key (a careless operator, a
  script, a restore of the wrong file): the file carries an Ed25519 signature by the
  hospital's key (:mod:`carefl.receipts`) over the history and ``base`` (the hash of the
  committed history a write-ahead extends). :func:`load` refuses a file whose signature does
  not verify, a missing file when the hospital's receipt log shows it trained before, and a
  history that does not cover the one its last receipt signed (rolled back). The hospital
  then refuses to train until its operator restores the state dir from backup.

What it does not protect against: someone holding the hospital's key (it lives in the state
dir unless ``key-file`` points elsewhere) can sign any history; restoring an older backup of
the *whole* state dir (key, receipts and history together) rolls the budget back to that
backup. Keep the state dir on persistent, backed-up storage and the key readable only by the
hospital's service account; docs/SECURITY.md lists this as a residual risk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from carefl.checkpoint import atomic_write_text
from carefl.errors import ConfigError
from carefl.privacy import Step
from carefl.receipts import ReceiptLog, SigningKey, history_hash, verify_signature

HISTORY_FILE = "privacy_history.json"
LOCK_FILE = ".lock"
#: how long a round waits for another process holding the state dir (seconds)
LOCK_WAIT_S = 900.0


def run_file(state_dir: str | os.PathLike, folder: str, run_id: str) -> Path:
    """``<state_dir>/<folder>/<16 hex of sha256(run_id)>.pt``: a hospital's per-run working file
    (secure aggregation's round in progress, top-k's error feedback), one per run."""
    return Path(state_dir) / folder / f"{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.pt"


@contextmanager
def locked(state_dir: str | os.PathLike, wait_s: float = LOCK_WAIT_S) -> Iterator[Path]:
    """Hold ``<state_dir>/.lock`` exclusively (created with its directory if missing).

    Raises:
        ConfigError: another process held it for ``wait_s`` seconds (the round is refused).
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"state dir {directory} is in use by another training process for over {wait_s:.0f} s "
                        "(two runs on one state dir); this round is refused"
                    ) from None
                time.sleep(0.2)
        try:
            yield directory
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _restore(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"privacy accountant history {path} {what}; this hospital refuses to train until its operator "
        "restores the state dir from backup (training on would under-count epsilon)"
    )


def _parse(raw: object) -> list[Step]:
    history = [(float(s), float(q), int(n)) for s, q, n in raw]  # type: ignore[union-attr]
    if any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
        raise ValueError("an entry outside sigma > 0, 0 < q <= 1, steps >= 1")
    return history


def load(state_dir: str | os.PathLike, key: SigningKey, log: ReceiptLog) -> list[Step]:
    """The signed accountant history, checked against the hospital's receipt log.

    Returns an empty history for a hospital that never trained on this state dir.
    Raises:
        ConfigError: the file is missing although receipts show DP training, unreadable,
            signed by another key (edited), or behind the last receipt (rolled back).
    """
    path = Path(state_dir) / HISTORY_FILE
    signed = [r["history_hash"] for r in log.receipts() if r.get("history_hash")]
    if not path.exists():
        if signed:
            raise _restore(path, f"is missing but {len(signed)} receipt(s) in {log.path} show this hospital trained with DP")
        return []
    try:
        raw = json.loads(path.read_text())
        payload = {"history": raw["history"], "base": raw["base"]}
        history = _parse(raw["history"])
        signature = raw["signature"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _restore(path, f"is unreadable ({type(err).__name__}: {err})") from None
    if not verify_signature(key.public_b64, payload, signature):
        raise _restore(path, "does not carry this hospital's signature: it was edited, or copied from elsewhere")
    if signed and signed[-1] not in (history_hash(history), raw["base"]):
        raise _restore(path, f"is not the history this hospital's last receipt signed ({log.path}): it was rolled back")
    return history


def save(state_dir: str | os.PathLike, key: SigningKey, history: list[Step], base: list[Step] | None = None) -> Path:
    """Write ``history`` signed, atomically. ``base``: the committed history it extends when
    this is a write-ahead reservation (None: ``history`` itself is committed)."""
    path = Path(state_dir) / HISTORY_FILE
    plain = [[float(s), float(q), int(n)] for s, q, n in history]
    payload = {"history": plain, "base": history_hash(base if base is not None else history)}
    atomic_write_text(path, json.dumps({**payload, "signature": key.sign(payload)}))
    return path
