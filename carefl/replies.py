"""The reply the server receives: one schema, checked once, as the first step of the round loop.

A hospital (or whoever answers in its name) may send anything. :func:`check_train_reply` and
:func:`check_eval_reply` turn a :class:`RawReply` into a :class:`TrainReply` / metrics dict or
a one-line reason; nothing behind them re-checks. A bad reply never fails the run: it leaves
that hospital out of the round with the logged reason.

Who a reply is from. A training reply counts as hospital H's only if it carries a receipt
signed by H's key (:mod:`carefl.receipts`): the key registered for H in
``federation.hospital_keys``, or -- when H is not registered -- the key H used first in this
run (trust on first use, pinned in the ledger through every receipt it signs). A node that
answers under another hospital's name without its key is recorded as an unauthenticated
reply and changes nothing of H's record; a second reply as H in one round is dropped. An
evaluation reply is attributed by the node id that sent H's authenticated training reply.

What a training reply must hold (else H is left out of the round, reason logged):

- ``status``: ``hospital`` (a listed name), ``status`` ok | refused, ``reason`` (text),
  ``receipt`` (JSON, at most :data:`MAX_RECEIPT_CHARS`) for this run, this round and the
  global model the server sent, whose ``num_examples``, ``epsilon`` and ``update_hash`` agree
  with the reply;
- ``metrics``: only the keys of :data:`TRAIN_METRICS`, finite numbers in range;
  ``num_examples`` a whole number in [1, :data:`MAX_EXAMPLES`] for an ``ok`` reply;
  ``train_loss`` only when DP is off (under DP it is an unnoised statistic of the data);
- ``arrays`` (``ok`` only): exactly the global model's keys, each declared with its dtype and
  shape and no larger than that, checked BEFORE it is deserialised; after loading, dtype,
  shape and finiteness again (:func:`carefl.robust.validate_update`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from carefl import compression, robust
from carefl.ledger import hash_state_dict
from carefl.tasks import UNBOUNDED
from carefl.receipts import receipt_problem
from carefl.secagg import member

MAX_RECEIPT_CHARS = 16384
#: a hospital's explanation gallery in its final evaluation reply (site policy ``share-gallery``):
#: at most this many PNGs, each at most this many bytes and pixels a side
MAX_GALLERY_IMAGES = 4
MAX_GALLERY_PNG_BYTES = 256 * 1024
MAX_GALLERY_SIDE = 2048
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the status record's ``gallery`` text: a JSON list of base64 PNGs, so at most this long
MAX_GALLERY_CHARS = MAX_GALLERY_IMAGES * (4 * (MAX_GALLERY_PNG_BYTES + 2) // 3 + 4) + 2
#: a shared data-card figure in an evaluation reply (carefl.data.card.shared_figures)
CARD_KEY = re.compile(r"card_(train_records|test_records|problems|label_\d{1,4}|class_\d{1,4})")
MAX_REASON_CHARS = 2000
MAX_EXAMPLES = 10**8
#: a declared array may exceed its raw size by at most this (the .npy header), in bytes
NPY_HEADER_SLACK = 4096
#: metric key -> (low, high) of a training reply
TRAIN_METRICS = {
    "num_examples": (0.0, MAX_EXAMPLES), "steps": (0.0, 1e9), "train_seconds": (0.0, 1e7),
    "epsilon": (0.0, 1e6), "delta": (0.0, 1.0), "noise_multiplier": (0.0, 1e6), "epsilon_cap": (0.0, math.inf),
    "train_loss": (-1e9, 1e9),
}


@dataclass(frozen=True)
class ArrayView:
    """One array of a reply, before it is deserialised: declared ``dtype`` (numpy name, e.g.
    ``float32``), ``shape``, ``nbytes`` of its serialised form, and ``load()`` -> Tensor."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], Tensor]


#: what Flower adds to an array's raw bytes (its numpy .npy header), in bytes
NPY_HEADER_BYTES = 128


def _value_bytes(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8  # numbers travel as 64 bits


def message_bytes(config: Mapping[str, object], arrays: Mapping[str, Tensor]) -> int:
    """A message's size counted as Flower's ``Record.count_bytes`` does, for
    :attr:`RawReply.bytes_sent` / ``bytes_received`` in every transport: keys and text by
    length, numbers as 8 bytes, arrays as their bytes plus the .npy header (128, an estimate
    here). Written out because Flower 1.41's raises on an empty string; this never raises."""
    size = sum(len(str(k)) + _value_bytes(v) for k, v in config.items())
    return size + sum(len(k) + v.numel() * v.element_size() + NPY_HEADER_BYTES for k, v in arrays.items())


@dataclass
class RawReply:
    """A reply as the transport delivers it: the sending node, an error (the node failed), or
    the three records a CareFL ClientApp sends (plain mappings; values not yet trusted).
    ``bytes_sent``: size of the message the server sent that node for it; ``bytes_received``:
    size of this reply (both as Flower counts a message's records)."""

    node_id: int
    error: str | None = None
    status: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    arrays: Mapping[str, ArrayView] | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class TrainReply:
    """A checked training reply of hospital ``hospital``.

    ``status``: ``ok`` (``state`` holds its model), ``refused`` (the hospital declined: budget,
    policy), ``invalid`` (its reply broke the schema; ``reason`` says how) or ``no-reply``.
    ``metrics``: checked floats (see :data:`TRAIN_METRICS`). ``receipt``: its signed receipt,
    stored verbatim in the ledger (None if it sent none that verifies).
    """

    hospital: str
    status: str
    reason: str = ""
    state: dict[str, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    receipt: dict | None = None
    node_id: int | None = None
    advert: dict | None = None
    #: the decoded update (float32 (d,)) of a compressed reply, instead of ``state``
    update: Tensor | None = None


@dataclass
class RoundContext:
    """What the server knows when a round's replies arrive.

    ``keys``: hospital -> base64 Ed25519 public key, registered (``federation.hospital_keys``)
    or pinned at first use in this run; :func:`check_train_reply` pins new ones here (a
    hospital with a key must sign with it; one without is pinned to the key it signs with).
    ``answered``: hospitals with an authenticated reply this round.
    """

    hospitals: list[str]
    run_id: str
    round: int
    global_state: Mapping[str, Tensor]
    model_hash: str
    dp: bool
    keys: dict[str, str]
    answered: set[str] = field(default_factory=set)
    #: d of the flattened update when the round is securely aggregated (an ok reply then
    #: carries a signed advert instead of weights), else None
    secagg_dim: int | None = None
    #: ``(name, block, fraction)`` of ``compression`` when replies carry compressed updates
    compression: tuple[str, int, float] | None = None


def _text(record: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and len(value) <= limit else None


def _json(record: Mapping[str, Any], key: str, limit: int) -> Any:
    """The JSON value in ``record[key]`` (text of at most ``limit`` characters), or None when
    it is absent, empty, too long or not JSON -- deep nesting (RecursionError) included, so no
    text a node sends can raise here."""
    text = _text(record, key, limit)
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None


def _metrics_problem(metrics: Any, status: str, dp: bool) -> str | None:
    if not isinstance(metrics, Mapping):
        return "metrics are missing"
    for key, value in metrics.items():
        if key not in TRAIN_METRICS:
            return f"metric {key!r} is not one a training reply may carry"
        low, high = TRAIN_METRICS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) and value != high:
            return f"metric {key}={value!r:.40} is not a finite number"
        if not low <= value <= high:
            return f"metric {key}={value:g} is outside [{low:g}, {high:g}]"
    n = metrics.get("num_examples")
    if n is None or n != int(n) or (status == "ok" and n < 1):
        return f"metric num_examples={n!r:.40} must be a whole number >= 1"
    if dp and "train_loss" in metrics:
        return "train_loss under DP-SGD is an unnoised statistic of the training set; a hospital must not send it"
    if dp and status == "ok" and "epsilon" not in metrics:
        return "a DP-SGD round must report its epsilon"
    return None


def _arrays_problem(arrays: Any, global_state: Mapping[str, Tensor]) -> str | None:
    """Check the declared arrays against the global model before anything is deserialised."""
    if not isinstance(arrays, Mapping):
        return "an ok reply without model weights"
    if set(arrays) != set(global_state):
        missing, extra = sorted(set(global_state) - set(arrays)), sorted(set(arrays) - set(global_state))
        return f"model keys differ from the global model (missing {missing[:3]}, extra {[str(k)[:40] for k in extra[:3]]})"
    for key, g in global_state.items():
        view = arrays[key]
        expected = g.numel() * g.element_size()
        if (view.dtype != dtype_name(g) or tuple(view.shape) != tuple(g.shape)
                or not 0 <= view.nbytes <= expected + NPY_HEADER_SLACK):
            return (f"{key} is declared {view.dtype} {tuple(view.shape)} ({view.nbytes} bytes), expected "
                    f"{dtype_name(g)} {tuple(g.shape)}")
    return None


def dtype_name(tensor: Tensor) -> str:
    """The numpy name of a tensor's dtype (``float32``): how a reply declares its arrays."""
    return str(tensor.dtype).removeprefix("torch.")


def check_train_reply(raw: RawReply, ctx: RoundContext) -> tuple[TrainReply | None, str]:
    """Check one training reply.

    Returns:
        ``(reply, "")`` for a reply authenticated as a hospital (its ``status`` may be
        ``invalid`` with the reason), or ``(None, why)`` for a reply that cannot be attributed
        to any hospital (node error, no or bad receipt, duplicate): it is logged, not recorded.
    """
    if raw.error is not None:
        return None, f"node {raw.node_id} failed: {str(raw.error)[:300]}"
    status = raw.status if isinstance(raw.status, Mapping) else {}
    name = _text(status, "hospital", 64)
    if name is None or name not in ctx.hospitals:
        return None, f"node {raw.node_id} answered as {str(status.get('hospital'))[:64]!r}, not a hospital in federation.hospitals"
    receipt = _json(status, "receipt", MAX_RECEIPT_CHARS)
    problem = receipt_problem(receipt, ctx.keys.get(name))  # no key yet: its own (pinned below)
    if problem is None:
        problem = _receipt_mismatch(receipt, name, ctx)
    if problem:
        return None, f"node {raw.node_id} answered as {name} without a valid receipt signed by {name}'s key: {problem}"
    if name in ctx.answered:
        return None, f"node {raw.node_id}: a second reply as {name} in round {ctx.round} is dropped"
    ctx.answered.add(name)
    ctx.keys.setdefault(name, receipt["public_key"])
    reply = TrainReply(name, "invalid", receipt=receipt, node_id=raw.node_id)
    state_word = status.get("status")
    reason = _text(status, "reason", MAX_REASON_CHARS)
    if state_word not in ("ok", "refused") or reason is None:
        reply.reason = f"{name}: status {str(state_word)[:20]!r} / reason is not ok|refused with a short text"
        return reply, ""
    problem = _metrics_problem(raw.metrics, state_word, ctx.dp)
    if problem is None and (receipt["num_examples"] != raw.metrics["num_examples"] or receipt["epsilon"] != raw.metrics.get("epsilon")):
        problem = "metrics num_examples / epsilon differ from what its receipt signs"
    if problem:
        reply.reason = f"{name}: {problem}"
        return reply, ""
    reply.metrics = {k: float(v) for k, v in raw.metrics.items()}
    if state_word == "refused":
        reply.status, reply.reason = "refused", reason or f"{name} refused"
        return reply, ""
    if ctx.secagg_dim is not None:
        return _with_advert(reply, raw, status, ctx)
    if ctx.compression is not None:
        return _with_payload(reply, raw, ctx)
    problem = _arrays_problem(raw.arrays, ctx.global_state)
    if problem is None:
        try:
            state = {k: raw.arrays[k].load() for k in ctx.global_state}
        except Exception as err:  # a malformed .npy payload: whatever numpy raises
            problem = f"model weights cannot be read ({type(err).__name__})"
        else:
            problem = robust.validate_update(name, state, ctx.global_state)
            if problem is None and hash_state_dict(state) != receipt["update_hash"]:
                problem = "the weights sent are not the ones its receipt signs (update_hash)"
    if problem:
        reply.reason = problem if problem.startswith("hospital ") else f"{name}: {problem}"
        return reply, ""
    reply.status, reply.reason, reply.state = "ok", "", state
    return reply, ""


def _with_payload(reply: TrainReply, raw: RawReply, ctx: RoundContext) -> tuple[TrainReply, str]:
    """An ok reply with a compressed update (:mod:`carefl.compression`): its declared arrays
    are the method's layout (checked before loading), its loaded values decode safely, and
    they are the payload its receipt signs."""
    method, block, fraction = ctx.compression
    d = robust.update_dim(ctx.global_state)
    arrays = raw.arrays if isinstance(raw.arrays, Mapping) else {}
    declared = {k: (v.dtype, tuple(v.shape)) for k, v in arrays.items()}
    problem = compression.declared_problem(declared, method, d, block, fraction) if arrays else "an ok reply without its update"
    if problem is None and any(v.nbytes > 8 * d + NPY_HEADER_SLACK for v in arrays.values()):
        problem = "a payload array is larger than its declared shape"
    if problem is None:
        try:
            payload = {k: v.load() for k, v in arrays.items()}
        except Exception as err:  # a malformed .npy payload: whatever numpy raises
            problem = f"its compressed update cannot be read ({type(err).__name__})"
        else:
            problem = compression.loaded_problem(payload, method, d)
            if problem is None and hash_state_dict(payload) != reply.receipt["update_hash"]:
                problem = "the update sent is not the one its receipt signs (update_hash)"
    if problem:
        reply.reason = f"{reply.hospital}: {problem}"
        return reply, ""
    reply.status, reply.reason = "ok", ""
    reply.update = compression.decode(payload, method, d, block)
    return reply, ""


def _with_advert(reply: TrainReply, raw: RawReply, status: Mapping[str, Any], ctx: RoundContext) -> tuple[TrainReply, str]:
    """An ok reply under secure aggregation: no weights, and the advert of this round's keys
    signed by the key its receipt verifies under (so the keys are the hospital's own)."""
    name = reply.hospital
    advert = _json(status, "secagg", MAX_RECEIPT_CHARS)
    problem = "it sent model weights in a securely aggregated round" if raw.arrays else \
        member.advert_problem(advert, ctx.run_id, ctx.round, ctx.secagg_dim)
    if problem is None and (advert["hospital"] != name or advert["public_key"] != reply.receipt["public_key"]):
        problem = "its secure-aggregation advert is not signed by its own key"
    if problem:
        reply.reason = f"{name}: {problem}"
    else:
        reply.status, reply.reason, reply.advert = "ok", "", advert
    return reply, ""


def check_secagg_reply(raw: RawReply, names: Mapping[int, str], dim: int) -> tuple[str | None, dict | None, Tensor | None, str]:
    """A secure-aggregation stage's reply: ``(hospital, payload, masked, "")``, or ``(hospital
    or None, None, None, why)``. Attributed like an evaluation reply (by the node that sent the
    hospital's authenticated training reply); ``masked`` (int32, (dim,)) is declared-checked
    before it is deserialised; the payload's own schema is the stage's
    (:class:`carefl.secagg.coordinator.Bucket`'s ``take_*``)."""
    name = names.get(raw.node_id)
    if raw.error is not None:
        return name, None, None, f"secure aggregation failed at {name or f'node {raw.node_id}'}: {str(raw.error)[:300]}"
    status = raw.status if isinstance(raw.status, Mapping) else {}
    if name is None or status.get("hospital") != name:
        return None, None, None, f"node {raw.node_id} sent a secure-aggregation reply as {str(status.get('hospital'))[:64]!r} without training as it this round"
    if status.get("status") != "ok":
        return name, None, None, f"{name} left secure aggregation: {str(status.get('reason'))[:300]}"
    payload = _json(status, "secagg", member.MAX_PAYLOAD_CHARS)
    arrays = raw.arrays or {}
    masked = None
    if set(arrays) - {"masked"}:
        return name, None, None, f"{name}: a secure-aggregation reply may carry only a masked input"
    if arrays:
        view = arrays["masked"]
        if view.dtype != "int32" or tuple(view.shape) != (dim,) or not 0 <= view.nbytes <= 4 * dim + NPY_HEADER_SLACK:
            return name, None, None, f"{name}: its masked input is declared {view.dtype} {tuple(view.shape)}, expected int32 ({dim},)"
        try:
            masked = view.load()
        except Exception as err:  # a malformed .npy payload: whatever numpy raises
            return name, None, None, f"{name}: its masked input cannot be read ({type(err).__name__})"
    if not isinstance(payload, dict):
        return name, None, None, f"{name}: its secure-aggregation reply is not a JSON object"
    return name, payload, masked, ""


def _receipt_mismatch(receipt: dict, name: str, ctx: RoundContext) -> str | None:
    checks = (
        (receipt["hospital"] == name, "it names another hospital"),
        (receipt["run_id"] == ctx.run_id, "it is for another run"),
        (receipt["round"] == ctx.round, f"it is for round {receipt['round']}"),
        (receipt["model_received"] == ctx.model_hash, "it signs another global model than the one sent"),
    )
    return next((why for ok, why in checks if not ok), None)


class EvalMetrics(dict):
    """A checked evaluation: its metrics (``{name: float}``, the dict itself) and ``gallery``,
    the hospital's explanation PNGs (bytes, each passed :func:`png_problem`), empty unless its
    site policy shares them. :meth:`carefl.report.Report.add_evaluation` writes them out."""

    gallery: tuple[bytes, ...] = ()


def png_problem(png: bytes) -> str | None:
    """Why ``png`` may not be shown in a report, or None: it must be at most
    :data:`MAX_GALLERY_PNG_BYTES`, start with the PNG signature and an IHDR chunk of 1 to
    :data:`MAX_GALLERY_SIDE` pixels a side, and end with the IEND chunk. It is never decoded
    here (the report inlines it as it is; a reader's browser decodes it). The hospital runs the
    same check before it sends one."""
    if len(png) > MAX_GALLERY_PNG_BYTES:
        return f"a gallery image of {len(png)} bytes is over {MAX_GALLERY_PNG_BYTES}"
    if len(png) < 45 or not png.startswith(PNG_MAGIC) or png[12:16] != b"IHDR" or not png.endswith(b"IEND\xaeB`\x82"):
        return "a gallery image is not a PNG (signature, IHDR, IEND)"
    width, height = struct.unpack(">II", png[16:24])
    if not (1 <= width <= MAX_GALLERY_SIDE and 1 <= height <= MAX_GALLERY_SIDE):
        return f"a gallery image of {width}x{height} pixels is over {MAX_GALLERY_SIDE} a side"
    return None


def check_gallery(status: Mapping[str, Any]) -> tuple[tuple[bytes, ...], str]:
    """``(pngs, "")`` of an evaluation reply's ``gallery`` field (absent or empty: no PNGs), or
    ``((), why)``: it must be a JSON list of 1 to :data:`MAX_GALLERY_IMAGES` base64 strings, each
    a PNG that passes :func:`png_problem`; the text is length-checked before it is parsed."""
    value = status.get("gallery")
    if value is None or value == "":
        return (), ""
    if not isinstance(value, str) or len(value) > MAX_GALLERY_CHARS:
        return (), f"its gallery is not text of at most {MAX_GALLERY_CHARS} characters"
    try:
        items = json.loads(value)
    except (ValueError, RecursionError):
        items = None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_GALLERY_IMAGES or \
            not all(isinstance(item, str) for item in items):
        return (), f"its gallery is not a JSON list of 1 to {MAX_GALLERY_IMAGES} base64 PNGs"
    pngs = []
    for item in items:
        try:
            png = base64.b64decode(item, validate=True)
        except (ValueError, binascii.Error):
            return (), "a gallery image is not base64"
        problem = png_problem(png)
        if problem:
            return (), problem
        pngs.append(png)
    return tuple(pngs), ""


def check_eval_reply(raw: RawReply, names: Mapping[int, str], metric_names: tuple[str, ...]) -> tuple[str | None, dict | str]:
    """``(hospital, metrics)`` of a valid evaluation reply, or ``(hospital or None, reason)``.

    The hospital is the one whose authenticated training reply came from ``raw.node_id``
    this round (``names``); the reply must carry every metric of the task in [0, 1] and a
    whole ``num_examples`` >= 1, all finite; it may carry ``<m>_ci_low``/``<m>_ci_high``,
    ``personal_<m>`` (and its interval) and ``trivial_<m>`` for a metric m of the task, in
    [0, 1] too (``hd95``: a distance in [0, 1e9] voxels). Its status record may carry a
    ``gallery`` (:func:`check_gallery`); one that breaks those bounds refuses the whole reply
    (a hospital checks its own images the same way before it sends them). The metrics come
    back as an :class:`EvalMetrics` holding the gallery's PNGs.
    """
    name = names.get(raw.node_id)
    if raw.error is not None:
        return name, f"evaluation failed at {name or f'node {raw.node_id}'}: {str(raw.error)[:300]}"
    status = raw.status if isinstance(raw.status, Mapping) else {}
    if name is None or status.get("hospital") != name:
        return None, f"node {raw.node_id} sent an evaluation as {str(status.get('hospital'))[:64]!r} without training as it this round"
    if status.get("status") != "ok":
        return name, f"{name} did not evaluate: {str(status.get('reason'))[:300]}"
    metrics = raw.metrics if isinstance(raw.metrics, Mapping) else {}
    # optional: bootstrap intervals (<m>_ci_low/high), the personal model's metrics (personal_<m>,
    # with intervals) and a no-model rule's (trivial_<m>)
    with_ci = {*metric_names, *(f"{m}_ci_{end}" for m in metric_names for end in ("low", "high"))}
    scored = {*with_ci, *(f"personal_{m}" for m in with_ci), *(f"trivial_{m}" for m in metric_names)}
    allowed = {*scored, "num_examples", "eval_seconds", "loss"}
    for key, value in metrics.items():
        card = isinstance(key, str) and CARD_KEY.fullmatch(key) is not None  # a hospital's shared data card
        if (key not in allowed and not card) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (card and not 0 <= value <= (1 if "_label_" in key else MAX_EXAMPLES)):
            return name, f"{name}: evaluation metric {str(key)[:40]}={value!r:.40} is unknown or out of range"
    missing = [m for m in (*metric_names, "num_examples") if m not in metrics]
    if missing:
        return name, f"{name}: evaluation lacks {missing}"
    outside = {m: metrics[m] for m in scored if m in metrics
               and not (0 <= metrics[m] <= 1 or (m.removeprefix("personal_").removeprefix("trivial_").split("_ci_")[0]
                                                 in UNBOUNDED and 0 <= metrics[m] <= 1e9))}
    if outside:
        return name, f"{name}: evaluation metrics {outside} are outside [0, 1] (hd95: [0, 1e9] voxels)"
    n = metrics["num_examples"]
    if n != int(n) or not 1 <= n <= MAX_EXAMPLES:
        return name, f"{name}: evaluation num_examples={n} must be a whole number >= 1"
    gallery, problem = check_gallery(status)
    if problem:
        return name, f"{name}: {problem}"
    checked = EvalMetrics({k: float(v) for k, v in metrics.items()})
    checked.gallery = gallery
    return name, checked
