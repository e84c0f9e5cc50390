"""Signed per-round receipts: an audit trail each hospital can check from its own records.

The server writes ``ledger.jsonl`` (:mod:`carefl.ledger`), and whoever controls the run
directory can rewrite that hash chain consistently. Receipts add evidence the server cannot
rewrite:

* Each hospital holds an Ed25519 key (:data:`KEY_FILE` in its state directory; it never leaves
  the hospital). Every round it signs a receipt (:func:`make_receipt`: the model it received,
  the hash of what it sent back, its DP epsilon and accountant history, the ledger head it was
  sent), appends it to its own hash-chained log (:class:`ReceiptLog`, :data:`LOG_FILE`) and
  sends it with its reply; the server stores it verbatim in the round's ledger entry
  (``HospitalRecord["receipt"]``).
* The server signs its ledger head (:func:`sign_head`) and sends it with each request; the
  hospital signs it back inside its receipt, so the log holds the server's own word on what
  the ledger was at that point.

``carefl-verify RUN_DIR --receipts LOG [LOG ...]`` (:func:`carefl.ledger.verify_receipts`)
checks a ledger against the hospitals' logs.

**Guarantee.** Against a server or operator who controls the run directory (and the server's
key) but not the hospitals' private keys: a ledger that was re-hashed consistently, so that its
chain verifies, but drops, alters or reorders a receipt a hospital signed, or changes an entry
at or before a head the server signed and a hospital received, is detected from that one
hospital's log.

**Not covered.**

* A round no hospital received leaves no receipt: nothing proves the server did not drop it.
* A hospital that loses its log loses its evidence (back it up). A log cut short at its end
  still chains: its lost last receipts are then simply not checked.
* Receipts of a round lost in a server crash before the ledger write (the round runs again on
  resume) are reported as *missing*, exactly as if the server had dropped them; the server's
  logs of the crash tell the two apart.
* A head signature is checked against the public key it carries; it binds the server only if
  the server's public key is known to the hospitals by other means.
* A receipt is the hospital's word on what it received and sent, not proof of what the server
  did with the update.

Every hash is a 64-character lowercase sha256 hex digest; keys and signatures are standard
base64 (raw 32-byte Ed25519 public keys, 64-byte signatures) over the canonical JSON of
:func:`carefl.ledger.canonical_json`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from carefl.checkpoint import fsync_dir
from carefl.errors import CareFLError
from carefl.ledger import GENESIS, _is_hex, _sha256, canonical_json

KEY_FILE = "hospital_key.pem"
LOG_FILE = "receipts.jsonl"
RECEIPT_KEYS = (
    "run_id", "round", "hospital", "model_received", "update_hash", "num_examples", "epsilon", "history_hash",
    "ledger_head", "public_key", "signature",
)
HEAD_KEYS = ("index", "hash", "public_key", "signature")
_LINE_KEYS = ("receipt", "prev_hash", "hash")
_INT_LIMIT = 2**63  # ints fit an int64, and canonical JSON never meets Python's int-to-str digit limit


class ReceiptError(CareFLError):
    """A hospital's key or receipt log cannot be used (message names the file and the fix)."""


class SigningKey:
    """An Ed25519 private key, kept in a PEM file (PKCS8, unencrypted, mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> SigningKey:
        """Load the key in ``path``, or create one there if the file does not exist.

        Creation writes a temporary file (mode 0600), fsyncs it and hard-links it to ``path``,
        so ``path`` never holds half a key and two processes racing to create it end up with
        the same key. Parent directories are created.

        Raises:
            ReceiptError: ``path`` exists but is not an unencrypted Ed25519 private key.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use that one
            finally:
                Path(tmp).unlink()
            fsync_dir(path.parent)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            private, why = None, (str(err).splitlines() or [type(err).__name__])[0]
        else:
            why = f"it holds a {type(private).__name__}"
        if not isinstance(private, Ed25519PrivateKey):
            raise ReceiptError(
                f"{path} is not an unencrypted Ed25519 private key in PEM ({why}): restore the hospital's key "
                "from backup, or move the file away to create a new key (receipts already signed keep the old "
                "key's public half, so they still verify)"
            )
        return cls(private)

    @property
    def public_b64(self) -> str:
        """The raw 32-byte public key, standard base64 (44 characters)."""
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def sign(self, payload: Mapping) -> str:
        """Base64 Ed25519 signature (64 bytes, 88 characters) over ``canonical_json(payload)``."""
        return base64.b64encode(self._private.sign(canonical_json(payload).encode("utf-8"))).decode("ascii")


def is_b64(value: Any, size: int) -> bool:
    """Whether ``value`` is the canonical standard base64 of exactly ``size`` bytes."""
    if not isinstance(value, str) or len(value) != 4 * -(-size // 3):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return len(raw) == size and base64.b64encode(raw).decode("ascii") == value


def verify_signature(public_b64: str, payload: Mapping, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is ``public_b64``'s signature over ``canonical_json(payload)``.

    False on any malformed input (non-canonical base64, wrong lengths, a payload that is not
    JSON-serialisable); never raises.
    """
    if not (is_b64(public_b64, 32) and is_b64(signature_b64, 64)):
        return False
    try:
        message = canonical_json(payload).encode("utf-8")
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
        public.verify(base64.b64decode(signature_b64), message)
    except (InvalidSignature, ValueError, TypeError, RecursionError):
        return False
    return True


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < _INT_LIMIT


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()


def sign_head(key: SigningKey, index: int, head: str) -> dict:
    """The server's signed word that ledger entry ``index`` has hash ``head``.

    Returns ``{"index", "hash", "public_key", "signature"}``; the payload signed is
    ``{"index": index, "hash": head}``. The hash of an entry covers every entry before it, so
    the signature pins entries ``0..index``.
    """
    if not (_is_int(index, 0) and _is_hex(head)):
        raise ValueError(f"sign_head: index must be an int >= 0 and head a sha256 hex digest, not {index!r}, {head!r}")
    payload = {"index": index, "hash": head}
    return {**payload, "public_key": key.public_b64, "signature": key.sign(payload)}


def head_problem(signed: Any) -> str | None:
    """Why ``signed`` is not a valid :func:`sign_head` dict (one line), or None. Never raises."""
    if not isinstance(signed, dict) or set(signed) != set(HEAD_KEYS):
        return f"a signed head must be an object with exactly the keys {list(HEAD_KEYS)}"
    bad = [k for k, ok in (("index", _is_int(signed["index"], 0)), ("hash", _is_hex(signed["hash"])),
                           ("public_key", is_b64(signed["public_key"], 32))) if not ok]
    if bad:
        return f"bad value for {bad} in the signed head"
    if not verify_signature(signed["public_key"], {"index": signed["index"], "hash": signed["hash"]},
                            signed["signature"]):
        return f"the server's signature on head {signed['index']} does not verify: forged or altered"
    return None


def _fields_problem(fields: dict) -> str | None:
    """Why a receipt's fields other than ``signature`` are wrong, or None."""
    eps = fields["epsilon"]
    checks = {
        "run_id": _is_name(fields["run_id"]),
        "round": _is_int(fields["round"], 1),
        "hospital": _is_name(fields["hospital"]),
        "model_received": _is_hex(fields["model_received"]),
        "update_hash": fields["update_hash"] is None or _is_hex(fields["update_hash"]),
        "num_examples": _is_int(fields["num_examples"], 0),
        "epsilon": eps is None or (isinstance(eps, float) and math.isfinite(eps) and eps >= 0),
        "history_hash": fields["history_hash"] is None or _is_hex(fields["history_hash"]),
        "public_key": is_b64(fields["public_key"], 32),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        return f"bad value for {bad} (see make_receipt)"
    if fields["ledger_head"] is not None and (problem := head_problem(fields["ledger_head"])):
        return f"ledger_head: {problem}"
    return None


def make_receipt(
    key: SigningKey,
    *,
    run_id: str,
    round: int,
    hospital: str,
    model_received: str,
    update_hash: str | None,
    num_examples: int,
    epsilon: float | None,
    history_hash: str | None,
    ledger_head: dict | None,
) -> dict:
    """The hospital's signed receipt for one round.

    Args:
        run_id: the server's run identifier, the hash of the ledger's entry 0 (1-128 printable
            characters).
        round: the round number (>= 1). hospital: the hospital's name (1-128 printable chars).
        model_received: ``hash_state_dict`` of the global model received.
        update_hash: ``hash_state_dict`` of the state dict sent back; None if none was sent
            (e.g. the hospital refused the round).
        num_examples: training examples used (not batches), >= 0.
        epsilon: DP epsilon spent so far (finite, >= 0); None without DP.
        history_hash: :func:`history_hash` of the accountant history after the round; None
            without DP.
        ledger_head: the :func:`sign_head` dict received with this round's request (check it
            with :func:`head_problem` where the request enters); None if the server sent none.

    Returns:
        ``{field: value for the fields above, "public_key": key.public_b64, "signature":
        signature over all the other fields}``, with the keys :data:`RECEIPT_KEYS`.

    Raises:
        ValueError: a field breaks the rules above (nothing is signed then).
    """
    fields = {
        "run_id": run_id, "round": round, "hospital": hospital, "model_received": model_received,
        "update_hash": update_hash, "num_examples": num_examples, "epsilon": epsilon,
        "history_hash": history_hash, "ledger_head": ledger_head, "public_key": key.public_b64,
    }
    problem = _fields_problem(fields)
    if problem:
        raise ValueError(f"receipt of {hospital!r} for round {round!r} not made: {problem}")
    fields = json.loads(canonical_json(fields))  # exactly what the server and the log will read back
    return {**fields, "signature": key.sign(fields)}


def receipt_problem(receipt: Any, public_b64: str | None = None) -> str | None:
    """Why ``receipt`` is not a valid :func:`make_receipt` receipt (one line), or None.

    Checks the keys (exactly :data:`RECEIPT_KEYS`), each field's type and range (see
    :func:`make_receipt`), the ledger head's server signature, and the receipt's signature
    under ``public_b64`` (under the receipt's own ``public_key`` when None). Never raises, on
    any JSON-like input.
    """
    if not isinstance(receipt, dict):
        return f"a receipt must be a JSON object, not {type(receipt).__name__}"
    missing = [key for key in RECEIPT_KEYS if key not in receipt]
    unknown = [k[:40] if isinstance(k, str) else f"<{type(k).__name__}>" for k in receipt if k not in RECEIPT_KEYS]
    if missing or unknown:
        return f"receipt fields missing: {missing}; unknown: {unknown[:5]}"
    fields = {key: value for key, value in receipt.items() if key != "signature"}
    problem = _fields_problem(fields)
    if problem:
        return problem
    if public_b64 is not None and receipt["public_key"] != public_b64:
        return "the receipt is signed with another key than the hospital's"
    if not verify_signature(receipt["public_key"], fields, receipt["signature"]):
        return "the receipt's signature does not verify: forged or altered"
    return None


def history_hash(history: Any) -> str:
    """sha256 hex of the canonical JSON of a DP accountant history.

    ``history``: a sequence of ``(sigma, q, steps)`` (noise multiplier, sample rate, number of
    steps), as in an Opacus accountant's ``history``; written as ``[float, float, int]`` so an
    int sigma and the equal float hash the same.
    """
    return _sha256(canonical_json([[float(sigma), float(q), int(steps)] for sigma, q, steps in history]))


class ReceiptLog:
    """A hospital's own append-only log of its receipts (``<state_dir>/receipts.jsonl``).

    One canonical-JSON line per receipt: ``{"receipt": receipt, "prev_hash": the previous
    line's hash (GENESIS for the first), "hash": sha256 of the line without "hash"}``. Opening
    verifies the whole chain and every receipt; the file is created by the first append.

    Raises:
        ReceiptError: the existing file is broken (names the file and the line).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._receipts: list[dict] = []
        self._head = GENESIS
        if not self.path.exists():
            return
        *lines, tail = self.path.read_bytes().split(b"\n")
        if tail:
            lines.append(tail)
        for number, line in enumerate(lines, start=1):
            problem = "cut off (no newline at the end)" if number == len(lines) and tail else self._line_problem(line)
            if problem:
                raise ReceiptError(
                    f"{self.path}: line {number}: {problem}; this receipt log is the hospital's evidence: "
                    "restore it from backup (do not edit or truncate it)"
                )
            entry = json.loads(line)
            self._receipts.append(entry["receipt"])
            self._head = entry["hash"]

    def _line_problem(self, line: bytes) -> str | None:
        try:
            entry = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            return "not valid JSON: the line was truncated or edited"
        if not isinstance(entry, dict) or set(entry) != set(_LINE_KEYS):
            return f"not a log line (keys must be {list(_LINE_KEYS)})"
        if entry["prev_hash"] != self._head:
            return "prev_hash does not match the previous line's hash: a line was inserted, deleted or moved"
        try:
            expected = _sha256(canonical_json({key: entry[key] for key in ("receipt", "prev_hash")}))
        except (ValueError, RecursionError):  # NaN or infinity, which canonical JSON refuses
            expected = None
        if entry["hash"] != expected:
            return "its hash does not match its content: the line was edited"
        problem = receipt_problem(entry["receipt"])
        return f"bad receipt: {problem}" if problem else None

    def __len__(self) -> int:
        return len(self._receipts)

    def receipts(self) -> list[dict]:
        """Every receipt in the log, oldest first."""
        return list(self._receipts)

    def last(self) -> dict | None:
        """The newest receipt, or None for an empty log."""
        return self._receipts[-1] if self._receipts else None

    def append(self, receipt: dict) -> dict:
        """Write one receipt (flushed and fsync'ed) and return the line as written.

        Raises:
            ValueError: ``receipt`` fails :func:`receipt_problem` (nothing is written then).
        """
        problem = receipt_problem(receipt)
        if problem:
            raise ValueError(f"receipt not logged: {problem}")
        entry = {"receipt": json.loads(canonical_json(receipt)), "prev_hash": self._head}
        entry["hash"] = _sha256(canonical_json(entry))
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(canonical_json(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path.parent)  # the file's creation is durable too
        self._receipts.append(entry["receipt"])
        self._head = entry["hash"]
        return entry


def keygen_main(argv: list[str] | None = None) -> int:
    """``carefl-keygen STATE_DIR [--key-file PATH]``: create (or read) a hospital's signing key
    and print its public key, to register in the consortium's ``federation.hospital_keys``.
    The private key never leaves the file (mode 0600)."""
    import argparse

    parser = argparse.ArgumentParser(prog="carefl-keygen", description=keygen_main.__doc__.split("\n")[0])
    parser.add_argument("state_dir", help="the hospital's state dir (its node config state-dir)")
    parser.add_argument("--key-file", help=f"the key file (default: STATE_DIR/{KEY_FILE}; node config key-file)")
    args = parser.parse_args(argv)
    path = Path(args.key_file) if args.key_file else Path(args.state_dir) / KEY_FILE
    try:
        key = SigningKey.load_or_create(path)
    except ReceiptError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    print(key.public_b64)
    print(f"# register it on the server (conf/federation or an override): "
          f"'+federation.hospital_keys.<hospital>=\"{key.public_b64}\"'")
    return 0
