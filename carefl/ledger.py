"""Hash-chained audit ledger of a run, and ``carefl-verify``.

``outputs/<run-id>/ledger.jsonl`` holds one JSON object per line (UTF-8, keys sorted, no
spaces: the *canonical JSON* of :func:`canonical_json`). Entry schema:

============ ==========================================================================
index        int, position in the file (0, 1, 2, ...)
kind         ``start`` (entry 0 only) | ``round`` | ``end`` (nothing may follow it)
round        int: 0 for ``start``, the round number for ``round``, the last round for ``end``
time         str, UTC ISO-8601 time of writing (e.g. ``2025-05-01T12:00:00.000+00:00``)
config_hash  str, :func:`hash_config` of the resolved config
model_before str | null, :func:`hash_state_dict` of the global model before the entry's step
model_after  str, :func:`hash_state_dict` of the global model after it (for ``end``: the
             model saved as ``model_final.pt``)
hospitals    {hospital name: :class:`HospitalRecord`}; ``{}`` when no hospital took part.
             A record: ``update_hash`` (str | null, :func:`hash_state_dict` of the state dict
             the hospital sent; null if none arrived), ``norm`` (float | null, L2 norm of the
             update), ``accepted`` (bool), ``reason`` (str | null, required when not
             accepted), ``epsilon`` (float | null, the hospital's reported DP epsilon),
             ``receipt`` (object | null, the hospital's signed receipt stored verbatim, see
             :mod:`carefl.receipts`; null when it sent no valid one)
outputs      {file name: sha256 hex of its bytes} of the run's result files (``metrics.json``,
             ``summary.md``), written before the ``end`` entry; null on other entries. A
             ledger written before this field existed has no ``outputs`` key at all.
secure_buckets  (``round`` entries of a securely aggregated run only) a list, one item per
             bucket: ``members`` (its hospitals), ``survivors`` (whose masked inputs its sum
             holds; ``[]`` when it failed), ``failed`` (str | null, why it gave no mean). The
             server saw only these buckets' means, never a member's update.
prev_hash    str, the previous entry's ``hash``; :data:`GENESIS` (64 zeros) for entry 0
hash         str, sha256 hex of the canonical JSON of the entry without ``hash``
============ ==========================================================================

Every hash is a 64-character lowercase sha256 hex digest. Editing, deleting, reordering or
inserting an entry breaks a ``hash`` or ``prev_hash``; :func:`verify_run` also checks that
``model_final.pt`` is the model the last entry recorded, that ``config.yaml`` is the config whose
hash every entry carries, and that each result file is the one ``outputs`` recorded. A hash chain cannot stop someone
from rewriting the *whole* file consistently: keep the head hash (printed in the run's logs
and stored in every checkpoint as ``ledger_head``) somewhere the writer does not control.
The hospitals do: ``carefl-verify RUN_DIR --receipts LOG ...`` (:func:`verify_receipts`)
checks the ledger against each hospital's signed receipts (:mod:`carefl.receipts`, which
states what that guarantees and what it does not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from carefl.checkpoint import fsync_dir
from carefl.errors import CareFLError

if TYPE_CHECKING:  # torch is imported where tensors are hashed: the config check imports this module
    from torch import Tensor

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
MODEL_FILE = "model_final.pt"
KINDS = ("start", "round", "end")
ENTRY_KEYS = (
    "index", "kind", "round", "time", "config_hash", "model_before", "model_after", "hospitals", "outputs",
    "prev_hash", "hash",
)
CONFIG_FILE = "config.yaml"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class HospitalRecord(TypedDict):
    """What the ledger records about one hospital in one round."""

    update_hash: str | None  # hash_state_dict of the state dict the hospital sent; null if none arrived
    norm: float | None  # L2 norm of the update (weights' units); null if none or not finite
    accepted: bool  # whether the update entered the aggregate
    reason: str | None  # why it was left out (required when accepted is false)
    epsilon: float | None  # the hospital's reported DP epsilon so far; null without DP
    receipt: dict | None  # the hospital's signed receipt (carefl.receipts), verbatim; null if none valid


class LedgerError(CareFLError):
    """A ledger cannot be opened or verified (message names the file and the fix)."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_run`.

    ``entries``: lines in the ledger; ``first_bad``: index of the first entry that fails
    (``entries`` itself when an entry is missing at the end), None when ``ok`` or when the
    chain is intact but the run has no verifiable final model; ``reason``: one line.
    """

    ok: bool
    entries: int
    first_bad: int | None
    reason: str


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text, no NaN/inf; mappings / sequences (e.g. a Hydra
    ``DictConfig`` / ``ListConfig``) are written as JSON objects / arrays."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return list(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=plain)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_config(cfg: Mapping) -> str:
    """sha256 of the canonical JSON of the resolved config (a dict or a ``DictConfig``)."""
    return _sha256(canonical_json(cfg))


def hash_file(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_state_dict(state: Mapping[str, Tensor]) -> str:
    """sha256 over the tensors of a state dict, in sorted key order.

    Each tensor contributes a length-prefixed header (key, dtype, shape) and its raw bytes
    (row-major, native byte order), so the digest does not depend on device, strides,
    ``requires_grad`` or storage sharing: a state dict saved with ``torch.save`` and loaded
    back hashes the same.
    """
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state[{key!r}] is a {type(tensor).__name__}, not a Tensor")
        tensor = tensor.detach().cpu().contiguous()
        header = canonical_json({"key": key, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}).encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def entry_hash(entry: Mapping) -> str:
    """The ``hash`` an entry must carry: sha256 of its canonical JSON without ``hash``."""
    return _sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"}))


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_problem(name: str, rec: Any, round: int) -> str | None:
    from carefl.receipts import receipt_problem  # here, not at the top: carefl.receipts imports this module

    if not isinstance(rec, dict) or set(rec) != set(HospitalRecord.__annotations__):
        return f"hospital {name!r}: record must have exactly the keys {sorted(HospitalRecord.__annotations__)}"
    checks = {
        "update_hash": rec["update_hash"] is None or _is_hex(rec["update_hash"]),
        "norm": rec["norm"] is None or _is_number(rec["norm"]),
        "accepted": isinstance(rec["accepted"], bool),
        "reason": rec["reason"] is None or isinstance(rec["reason"], str),
        "epsilon": rec["epsilon"] is None or _is_number(rec["epsilon"]),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        return f"hospital {name!r}: bad {bad} (see HospitalRecord)"
    if not rec["accepted"] and not rec["reason"]:
        return f"hospital {name!r}: a rejected update needs a reason"
    receipt = rec["receipt"]
    if receipt is not None and (problem := receipt_problem(receipt)):
        return f"hospital {name!r}: receipt: {problem}"
    if receipt is not None and (receipt["hospital"], receipt["round"]) != (name, round):
        return f"hospital {name!r}: holds the receipt of {receipt['hospital']!r} for round {receipt['round']}"
    return None


def _schema_problem(entry: Any) -> str | None:
    """Why ``entry`` does not follow the schema in the module docstring, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if set(entry) not in (set(ENTRY_KEYS), set(ENTRY_KEYS) - {"outputs"}, {*ENTRY_KEYS, "secure_buckets"}):
        return f"fields are {sorted(entry)}, expected {sorted(ENTRY_KEYS)}"  # no outputs: an older ledger
    checks = {
        "index": isinstance(entry["index"], int) and not isinstance(entry["index"], bool),
        "kind": entry["kind"] in KINDS,
        "round": isinstance(entry["round"], int) and not isinstance(entry["round"], bool) and entry["round"] >= 0,
        "time": isinstance(entry["time"], str),
        "config_hash": _is_hex(entry["config_hash"]),
        "model_before": entry["model_before"] is None or _is_hex(entry["model_before"]),
        "model_after": _is_hex(entry["model_after"]),
        "hospitals": isinstance(entry["hospitals"], dict),
        "outputs": entry.get("outputs") is None or (
            isinstance(entry["outputs"], dict)
            and all(isinstance(k, str) and "/" not in k and _is_hex(v) for k, v in entry["outputs"].items())),
        "prev_hash": _is_hex(entry["prev_hash"]),
        "hash": _is_hex(entry["hash"]),
        "secure_buckets": "secure_buckets" not in entry or (entry["kind"] == "round" and _buckets_ok(entry["secure_buckets"])),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        return f"bad value for {bad}"
    hospitals = entry["hospitals"].items()
    return next((p for name, rec in hospitals if (p := _record_problem(name, rec, entry["round"]))), None)


def _buckets_ok(buckets: Any) -> bool:
    names = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
    return isinstance(buckets, list) and all(
        isinstance(b, dict) and set(b) == {"members", "survivors", "failed"} and names(b["members"])
        and names(b["survivors"]) and set(b["survivors"]) <= set(b["members"])
        and (b["failed"] is None or isinstance(b["failed"], str)) for b in buckets)


def _order_problem(index: int, kind: str, prev_kind: str | None) -> str | None:
    """Kinds must read start, round..., end."""
    if index == 0 and kind != "start":
        return f"the first entry is {kind!r}, not 'start'"
    if index > 0 and kind == "start":
        return "a 'start' entry after entry 0"
    if prev_kind == "end":
        return "an entry after the 'end' entry"
    return None


def _read_chain(path: Path) -> tuple[list[dict], int, int | None, str]:
    """``(intact entries, lines in the file, index of the first bad entry or None, reason)``."""
    *lines, tail = path.read_bytes().split(b"\n")
    if tail:
        lines.append(tail)
    entries: list[dict] = []
    prev_hash, prev_kind = GENESIS, None
    for i, line in enumerate(lines):
        if i == len(lines) - 1 and tail:
            return entries, len(lines), i, "the last line is cut off (no newline at the end): truncated"
        try:
            entry = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # not UTF-8 or not JSON (or absurdly deep / long)
            return entries, len(lines), i, f"not valid JSON ({err}): the line was truncated or edited"
        problem = _schema_problem(entry)
        if problem is None and entry["hash"] != entry_hash(entry):
            problem = "its hash does not match its content: the entry was edited or forged"
        if problem is None and entry["index"] != i:
            problem = f"its index is {entry['index']}, expected {i}: an entry was deleted, or entries were reordered"
        if problem is None and entry["prev_hash"] != prev_hash:
            problem = (
                "prev_hash is not the genesis hash: entries before it were removed"
                if i == 0
                else f"prev_hash does not match entry {i - 1}'s hash: entry {i - 1} was altered, "
                "or an entry was inserted, deleted or moved here"
            )
        problem = problem or _order_problem(i, entry["kind"], prev_kind)
        if problem:
            return entries, len(lines), i, problem
        entries.append(entry)
        prev_hash, prev_kind = entry["hash"], entry["kind"]
    return entries, len(lines), None, ""


def _finite_or_none(value: Any) -> float | None:
    """A Python float for JSON (accepts 0-d tensors, numpy scalars); NaN/inf -> None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Ledger:
    """Append-only writer of ``ledger.jsonl``; each append is flushed and fsync'ed.

    Opening an existing file verifies its chain and continues it (resume). ``expect_head``
    (a checkpoint's ``ledger_head``) must then be the hash of one of its entries; entries
    after it record rounds whose checkpoint was lost in a crash and stay in the audit trail.

    Raises:
        LedgerError: the existing file is broken, already ended, or lacks ``expect_head``.
    """

    #: fields :meth:`append` takes from its caller (the rest are computed)
    FIELDS = ("round", "config_hash", "model_before", "model_after", "hospitals", "outputs", "secure_buckets")
    REQUIRED = ("round", "config_hash", "model_after")

    def __init__(self, path: str | os.PathLike, expect_head: str | None = None) -> None:
        self.path = Path(path)
        entries: list[dict] = []
        if self.path.exists():
            entries, _, bad, reason = _read_chain(self.path)
            if bad is not None:
                raise LedgerError(
                    f"{self.path}: entry {bad}: {reason}; the audit trail is broken, so this run "
                    "cannot be continued: start a new run without resume="
                )
            if entries and entries[-1]["kind"] == "end":
                raise LedgerError(f"{self.path} already ends with an 'end' entry: the run finished; start a new run")
        if expect_head is not None and expect_head not in {e["hash"] for e in entries}:
            raise LedgerError(
                f"{self.path} has no entry with hash {expect_head[:12]}... (the checkpoint's ledger_head): "
                "the ledger and the checkpoint come from different runs, or the ledger was rewritten"
            )
        self._count = len(entries)
        self._last_kind = entries[-1]["kind"] if entries else None
        self._head = entries[-1]["hash"] if entries else GENESIS
        self._first = entries[0]["hash"] if entries else None

    @property
    def head(self) -> str:
        """Hash of the last entry (:data:`GENESIS` for an empty ledger)."""
        return self._head

    @property
    def first(self) -> str | None:
        """Hash of entry 0 (None for an empty ledger): the run id hospitals sign receipts for."""
        return self._first

    def __len__(self) -> int:
        return self._count

    def append(self, kind: str, **fields: Any) -> dict:
        """Write one entry and return it (as it reads back from the file, with its hash).

        ``fields``: ``round``, ``config_hash``, ``model_after`` (required), ``model_before``
        (default None), ``hospitals`` ({name: :class:`HospitalRecord`}, default {}),
        ``outputs`` ({file name in the run dir: :func:`hash_file`}, default None). ``norm``
        and ``epsilon`` may be tensors / numpy scalars; non-finite values are stored as null.

        Raises:
            TypeError: a field is missing or unknown. ValueError: a value breaks the schema
            or the order start, round..., end. Nothing is written then.
        """
        unknown = sorted(set(fields) - set(self.FIELDS))
        missing = [key for key in self.REQUIRED if key not in fields]
        if unknown or missing:
            raise TypeError(f"Ledger.append: unknown fields {unknown}, missing fields {missing}")
        hospitals = {
            name: {**rec, **{k: _finite_or_none(rec[k]) for k in ("norm", "epsilon") if k in rec}}
            for name, rec in dict(fields.get("hospitals", {})).items()
        }
        entry = {
            "index": self._count,
            "kind": kind,
            "round": fields["round"],
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "config_hash": fields["config_hash"],
            "model_before": fields.get("model_before"),
            "model_after": fields["model_after"],
            "hospitals": hospitals,
            "outputs": fields.get("outputs"),
            "prev_hash": self._head,
            **({"secure_buckets": fields["secure_buckets"]} if "secure_buckets" in fields else {}),
        }
        entry = json.loads(canonical_json(entry))  # exactly what a reader will parse
        entry["hash"] = entry_hash(entry)
        problem = _schema_problem(entry) or _order_problem(self._count, kind, self._last_kind)
        if problem:
            raise ValueError(f"ledger entry {self._count} not written: {problem}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(canonical_json(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._count == 0:
            fsync_dir(self.path.parent)  # the file's creation is durable too
            self._first = entry["hash"]
        self._count += 1
        self._last_kind = kind
        self._head = entry["hash"]
        return entry


def _ledger_path(run_dir: Path) -> Path:
    """``run_dir/ledger.jsonl``; LedgerError if there is none (nothing to verify)."""
    if not run_dir.is_dir():
        raise LedgerError(f"run directory {run_dir} not found; pass a run directory such as outputs/<run-id>")
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{path} not found: {run_dir} is not a CareFL run directory, or its run never started")
    return path


def run_id(run_dir: str | os.PathLike) -> str:
    """The run's id, the hash of its ledger's entry 0 (what hospitals sign receipts for).

    Raises:
        LedgerError: no ledger, or an empty or broken chain.
    """
    entries, n, bad, reason = _read_chain(_ledger_path(Path(run_dir)))
    if n == 0 or bad == 0:
        raise LedgerError(f"{run_dir}: no intact first ledger entry ({reason or 'the ledger is empty'})")
    return entries[0]["hash"]


def verify_run(run_dir: str | os.PathLike) -> VerifyResult:
    """Check ``run_dir/ledger.jsonl``'s chain and that ``run_dir/model_final.pt`` (a
    ``torch.save``'d state dict) hashes to the last entry's ``model_after``.

    Raises:
        LedgerError: ``run_dir`` or its ledger does not exist (nothing to verify).
    """
    run_dir = Path(run_dir)
    entries, n, bad, reason = _read_chain(_ledger_path(run_dir))
    if bad is not None:
        return VerifyResult(False, n, bad, reason)
    if n == 0:
        return VerifyResult(False, 0, 0, "the ledger is empty")
    last = entries[-1]
    model = run_dir / MODEL_FILE
    if not model.is_file():
        state = "the run ended, so the file was removed" if last["kind"] == "end" else "the run has not finished"
        reason = f"{MODEL_FILE} not found in {run_dir} ({state}); the chain of {n} entries is intact"
        return VerifyResult(False, n, None, reason)
    if last["kind"] != "end":
        reason = f"missing: the ledger stops at entry {n - 1} ({last['kind']!r}) although {MODEL_FILE} exists"
        return VerifyResult(False, n, n, reason + "; entries were removed from the end")
    import torch

    try:
        actual = hash_state_dict(torch.load(model, map_location="cpu", weights_only=True))
    except Exception as err:  # unreadable or not a state dict: cannot match either way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        return VerifyResult(False, n, n - 1, f"{MODEL_FILE} cannot be read as a state dict ({first})")
    if actual != last["model_after"]:
        reason = f"{MODEL_FILE} hashes to {actual[:12]}..., but the entry records {last['model_after'][:12]}..."
        return VerifyResult(False, n, n - 1, reason + " as model_after: the model file was replaced or altered")
    problem = _config_problem(run_dir, last["config_hash"]) or _outputs_problem(run_dir, last.get("outputs"))
    if problem:
        return VerifyResult(False, n, n - 1, problem)
    checked = [MODEL_FILE, CONFIG_FILE, *(last.get("outputs") or {})]
    return VerifyResult(True, n, None, f"chain intact, {', '.join(checked)} match entry {n - 1}")


def _config_problem(run_dir: Path, recorded: str) -> str | None:
    """Why ``run_dir/config.yaml`` is not the config whose hash the ledger records, or None."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return f"{CONFIG_FILE} not found in {run_dir}: the run's config was removed"
    try:
        actual = hash_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception as err:  # YAML / OmegaConf errors of a corrupt file: all "unreadable"
        return f"{CONFIG_FILE} is unreadable ({(str(err).strip().splitlines() or [type(err).__name__])[0][:200]})"
    if actual != recorded:
        return (f"{CONFIG_FILE} hashes to {actual[:12]}..., but the ledger records config_hash {recorded[:12]}...: "
                "the config was edited after the run")
    return None


def _outputs_problem(run_dir: Path, outputs: Mapping[str, str] | None) -> str | None:
    """Why a result file the ``end`` entry recorded is missing or altered, or None."""
    for name, recorded in (outputs or {}).items():
        path = run_dir / name
        if not path.is_file():
            return f"{name} not found in {run_dir}, but the ledger recorded it"
        if (actual := hash_file(path)) != recorded:
            return (f"{name} hashes to {actual[:12]}..., but the ledger recorded {recorded[:12]}...: it was "
                    "edited after the run")
    return None


def verify_receipts(run_dir: str | os.PathLike, logs: Sequence[str | os.PathLike]) -> list[str]:
    """Check ``run_dir/ledger.jsonl`` against hospitals' receipt logs (``receipts.jsonl`` files,
    see :mod:`carefl.receipts` for what this guarantees and what it cannot).

    The run is identified by the hash of ledger entry 0; each log's receipts with another
    ``run_id`` belong to other runs and are skipped. For each receipt of this run (hospital H,
    round r), in log order:

    * a ``round`` entry with round r must hold it, exactly, as ``hospitals[H]["receipt"]``;
    * the entries holding H's receipts must come in the order H signed them;
    * the server-signed ``ledger_head`` it carries (entry i has hash h) must match entry i.

    Besides, the log's chain and every receipt's signature must be intact (checked on opening
    the log), and the ledger must hold no receipt for H signed by a key H never used.

    Returns:
        One line per problem, naming the hospital and the round; empty when the ledger and
        every log agree. The ledger's own chain is checked too: past a break, only the entries
        before it are used.

    Raises:
        LedgerError: ``run_dir`` has no ledger, or a log cannot be read (nothing to verify).
    """
    from carefl.receipts import ReceiptError, ReceiptLog  # not at the top: carefl.receipts imports this module

    entries, _, bad, reason = _read_chain(_ledger_path(Path(run_dir)))
    problems = []
    if bad is not None:
        problems.append(f"ledger entry {bad}: {reason}; receipts are checked against the {bad} entries before it")
    receipts: dict[Path, list[dict]] = {}
    for log in map(Path, logs):
        if not log.is_file():
            raise LedgerError(f"receipt log {log} not found: pass a hospital's receipts.jsonl (in its state directory)")
        try:
            receipts[log] = ReceiptLog(log).receipts()
        except ReceiptError as err:
            problems.append(str(err))
        except OSError as err:
            raise LedgerError(f"receipt log {log} cannot be read ({err.strerror}): pass a readable file") from err
    if not entries:
        return problems + ["the ledger has no intact start entry: there is no run to check receipts against"]
    for log, log_receipts in receipts.items():
        problems += _log_problems(entries, log, log_receipts)
    return problems


def _log_problems(entries: list[dict], log: Path, receipts: list[dict]) -> list[str]:
    """:func:`verify_receipts`' checks of one intact log against the intact ledger ``entries``."""
    run_id = entries[0]["hash"]
    mine = [r for r in receipts if r["run_id"] == run_id]
    if not mine:
        others = sorted({r["run_id"][:12] + "..." for r in receipts})
        return [f"{log} holds no receipt of this run (run_id {run_id[:12]}..., the hash of ledger entry 0; the log has "
                f"runs {others}): the hospital did not take part, or the ledger's start entry was rewritten"]
    rounds: dict[int, list[int]] = {}
    for entry in entries:
        if entry["kind"] == "round":
            rounds.setdefault(entry["round"], []).append(entry["index"])
    problems = []
    last = None  # (ledger index, round) of the previous receipt of the log found in the ledger
    for rec in mine:
        who = f"round {rec['round']}: {rec['hospital']}'s"
        head = rec["ledger_head"]
        if head is not None and (head["index"] >= len(entries) or entries[head["index"]]["hash"] != head["hash"]):
            i = head["index"]
            what = (f"the ledger has only {len(entries)} intact entries: entries were removed" if i >= len(entries)
                    else f"the ledger's entry {i} is different: the ledger was rewritten")
            problems.append(f"{who} receipt holds the server-signed head index {i} = {head['hash'][:12]}..., "
                            f"but {what}")
        found = [i for i in rounds.get(rec["round"], [])
                 if entries[i]["hospitals"].get(rec["hospital"], {}).get("receipt") == rec]
        later = [i for i in found if last is None or i > last[0]]
        if not found:
            problems.append(f"{who} signed receipt is missing from the ledger (dropped or altered)")
        elif not later:
            problems.append(f"{who} receipt is in ledger entry {found[0]}, before entry {last[0]} holding its receipt "
                            f"of round {last[1]}, which it signed earlier: entries were reordered")
        else:
            last = (later[0], rec["round"])
    keys = {r["public_key"] for r in mine}
    for name in sorted({r["hospital"] for r in mine}):
        for entry in entries:
            stored = entry["hospitals"].get(name, {}).get("receipt")
            if stored is not None and stored["public_key"] not in keys:
                problems.append(f"round {entry['round']}: the ledger holds a receipt for {name} signed by a key "
                                f"{name} never used: forged")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``carefl-verify <run_dir> [--receipts LOG ...]``: exit 0 intact (and consistent with every
    receipt log), 1 tampered / incomplete / inconsistent, 2 nothing to verify."""
    parser = argparse.ArgumentParser(prog="carefl-verify", description="Verify a CareFL run's audit ledger.")
    parser.add_argument("run_dir", help="a run directory, e.g. outputs/<run-id>")
    parser.add_argument("--receipts", nargs="+", default=[], metavar="LOG",
                        help="hospitals' receipt logs (receipts.jsonl in each hospital's state directory) to check "
                        "the ledger against")
    args = parser.parse_args(argv)
    try:
        result = verify_run(args.run_dir)
        problems = verify_receipts(args.run_dir, args.receipts) if args.receipts else []
    except LedgerError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    if result.ok:
        print(f"OK: {result.entries} entries, {result.reason}")
    elif result.first_bad is None:
        print(f"INCOMPLETE: {result.reason}")
    else:
        print(f"TAMPERED: entry {result.first_bad}: {result.reason}")
    for problem in problems:
        print(f"TAMPERED: {problem}")
    if args.receipts and not problems:
        print(f"OK: the ledger agrees with the {len(args.receipts)} receipt log(s)")
    return 0 if result.ok and not problems else 1
