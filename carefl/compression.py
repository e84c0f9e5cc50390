"""Compressed updates: what a hospital sends instead of its float32 weights.

An update is the flat float32 vector ``u = local - global`` (shape (d,), weight units, the
layout of :func:`carefl.robust.flatten_updates`). ``compression.name`` (conf/compression/):

=========  ==============================================  ======================  ==========================
name       payload (what crosses the wire)                 error per entry         bytes vs float32
=========  ==============================================  ======================  ==========================
none       the model weights, as without compression       0                       1x
float16    ``values`` float16 (d,)                         <= 2^-11 |u_i|          2x fewer
int8       ``q`` int8 (d,), ``scale`` float32 (ceil(d/B),)  <= scale_b / 2          4B / (B + 4) fewer:
           per block of B: scale_b = max|u_i| / 127,          = max_b|u| / 254      ~3.94x at B = 256
           q_i = round(u_i / scale_b)
topk       ``index`` int32 (k,) strictly increasing,       what is not sent        d / (2k) ~ 1 / (2 fraction)
           ``values`` float32 (k,), k = ceil(fraction d)   stays in the residual   fewer
=========  ==============================================  ======================  ==========================

Top-k keeps **error feedback** at the hospital (Stich et al. 2018; Karimireddy et al. 2019):
it sends the k largest entries of ``u + e`` and keeps ``e' = (u + e) - sent`` in its state
dir for the next round, so over rounds ``sum(sent) = sum(u) - e_last``: nothing is lost,
only delayed -- counting what was *sent*: a reply the server then leaves out (timeout, norm
bound, a rule that trims it) is not fed back, so what it carried is lost for that round, as an
uncompressed update would be. Written here (a few lines of torch): no maintained library does
block-wise int8 / top-k with a server-side schema check for hostile payloads.

With robust rules: the server decodes every payload to a dense float32 row before the rule, so
every rule applies unchanged; top-k rows are sparse (zeros outside each hospital's k
coordinates), which coordinate-wise rules (median, trimmed mean) see as many zero votes -- a
bias towards 0 on coordinates few hospitals send. With secure aggregation: masks are added in
a ring, so per-hospital float16 values, int8 scales or top-k indices do not add up inside a
masked sum; only a quantisation with a shared scale composes (secure aggregation's own), so
``secagg=on`` with compression is refused at config time.

Against a hostile hospital: :func:`declared_problem` checks the declared dtypes and shapes
before anything is deserialised, :func:`loaded_problem` the values after (finite, scales
>= 0 and small enough that no int8 entry decodes beyond float32, indices in range and
strictly increasing), so no payload can raise, write outside the row or decode to inf.
A non-finite update is encoded as it is, so the server refuses it as it refuses an
uncompressed one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import torch
from torch import Tensor

METHODS = ("none", "float16", "int8", "topk")
FLOAT16_MAX = 65504.0
#: largest int8 scale whose every q in [-128, 127] decodes to a finite float32
INT8_MAX_SCALE = torch.finfo(torch.float32).max / 128


def top_k(d: int, fraction: float) -> int:
    """Entries a top-k payload holds: ``max(1, ceil(fraction * d))``, at most d.

    ``fraction`` is read as the decimal it was written as (``0.07 * 100`` is 7, not the 8
    that float rounding gives); hospital and server both call this, so k always agrees.
    """
    return min(d, max(1, math.ceil(Fraction(str(float(fraction))) * d)))


def layout(method: str, d: int, block: int, fraction: float) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The payload's arrays: name -> (numpy dtype name, shape)."""
    if method == "float16":
        return {"values": ("float16", (d,))}
    if method == "int8":
        return {"q": ("int8", (d,)), "scale": ("float32", (math.ceil(d / block),))}
    if method == "topk":
        k = top_k(d, fraction)
        return {"index": ("int32", (k,)), "values": ("float32", (k,))}
    raise ValueError(f"compression {method!r} has no payload; choose one of {METHODS[1:]}")


def encode(update: Tensor, method: str, block: int = 256, fraction: float = 0.1,
           residual: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """``(payload, new residual)`` of ``update`` float32 (d,); the residual (d,) is top-k's only.

    Args:
        update: ``u = local - global``, float32 (d,), weight units.
        method: ``float16``, ``int8`` or ``topk`` (``none`` sends the weights, not a payload).
        block: int8 only: entries B sharing one float32 scale.
        fraction: topk only: share of entries sent, k = :func:`top_k` (d, fraction).
        residual: topk only: the error feedback e (d,) kept from the last round, or None (0).

    Raises:
        ValueError: float16 of a finite entry beyond 65504 (it would become inf): an update
            that large is absurd; send it with compression=int8 or none, or fix the training.
    """
    u = update.detach().float().reshape(-1)
    if method == "float16":
        # round to nearest: |u - û| <= 2^-11 |u| for 2^-14 <= |u| <= 65504 (normal range);
        # |u - û| <= 2^-25 below 2^-14 (subnormal spacing 2^-24); above 65504: refused
        too_big = torch.isfinite(u) & (u.abs() > FLOAT16_MAX)
        if too_big.any():
            raise ValueError(f"an update entry of {float(u[too_big].abs().max()):.3g} does not fit float16 "
                             "(max 65504); use compression=int8 or none")
        return {"values": u.half()}, None
    if method == "int8":
        # per block b: scale_b = max_b|u| / 127, rounded up to a float32 >= it (so |u_i| / scale_b
        # <= 127 even when the quotient is subnormal, and scale_b > 0 unless the block is all 0);
        # q_i = round(u_i / scale_b) (half to even): |u_i - q_i scale_b| <= scale_b / 2
        # = max_b|u| / 254, plus float32 rounding of the quotient and product (<= 2^-23 |u_i|)
        padded = torch.nn.functional.pad(u, (0, -len(u) % block)).view(-1, block)
        absmax = padded.abs().amax(dim=1)
        scale = absmax / 127.0
        scale = torch.where(scale * 127.0 < absmax, torch.nextafter(scale, torch.tensor(math.inf)), scale)
        q = torch.round(padded / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127)
        return {"q": q.to(torch.int8).reshape(-1)[: len(u)], "scale": scale}, None
    if method == "topk":
        # send the k largest |u + e|; e' = (u + e) - sent, so over rounds t = 1..T:
        # sum_t sent_t = sum_t u_t - e_T (with e_0 = 0): nothing dropped, only delayed
        full = u if residual is None else u + residual
        index = torch.topk(full.abs(), top_k(len(u), fraction), sorted=False).indices.sort().values
        payload = {"index": index.to(torch.int32), "values": full[index].clone()}
        if not torch.isfinite(full).all():  # the server refuses this payload; a NaN kept in e
            return payload, torch.zeros_like(u) if residual is None else residual  # would spoil every later round
        sent = torch.zeros_like(full)
        sent[index] = full[index]
        return payload, full - sent
    raise ValueError(f"unknown compression {method!r}; choose one of {METHODS[1:]}")


def decode(payload: Mapping[str, Tensor], method: str, d: int, block: int = 256) -> Tensor:
    """The dense float32 (d,) update of a payload checked by :func:`loaded_problem`;
    top-k's entries outside its k indices are 0."""
    if method == "float16":
        return payload["values"].float()
    if method == "int8":
        scale = payload["scale"].repeat_interleave(block)[:d]
        return payload["q"].float() * scale
    if method == "topk":
        out = torch.zeros(d, dtype=torch.float32)
        out[payload["index"].long()] = payload["values"].float()
        return out
    raise ValueError(f"unknown compression {method!r}; choose one of {METHODS[1:]}")


def declared_problem(declared: Mapping[str, tuple[str, tuple[int, ...]]], method: str, d: int, block: int,
                     fraction: float) -> str | None:
    """Why the declared ``{name: (dtype, shape)}`` of a reply is not this method's payload
    (exact names, dtypes and shapes; top-k's k as the config gives it)."""
    expected = layout(method, d, block, fraction)
    if set(declared) != set(expected):
        sent = sorted(str(k)[:20] for k in declared)[:4]
        return f"a {method} payload must hold exactly {sorted(expected)}, not {sent}"
    for name, (dtype, shape) in expected.items():
        entry = declared[name]
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], (tuple, list))
                and entry[0] == dtype and tuple(entry[1]) == shape):
            return f"{method} payload {name} is declared {str(entry)[:60]}, expected {dtype} {shape}"
    return None


def loaded_problem(payload: Mapping[str, Tensor], method: str, d: int) -> str | None:
    """Why the loaded arrays cannot be decoded safely (after :func:`declared_problem`)."""
    for name, tensor in payload.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{method} payload {name} holds a non-finite value"
    if method == "int8":
        if (payload["scale"] < 0).any():
            return "int8 payload has a negative scale"
        if (payload["scale"] > INT8_MAX_SCALE).any():
            return f"int8 payload has a scale above {INT8_MAX_SCALE:.3g}: its entries would decode to inf"
    if method == "topk":
        index = payload["index"].long()
        if len(index) and (index.min() < 0 or index.max() >= d):
            return f"top-k payload has an index outside [0, {d})"
        if len(index) > 1 and not (index[1:] > index[:-1]).all():
            return "top-k payload indices must be strictly increasing (no repeats)"
    return None


def wire_bytes(payload: Mapping[str, Tensor]) -> int:
    """Bytes of a payload's arrays: sum of numel * element_size (without the .npy headers)."""
    return sum(t.numel() * t.element_size() for t in payload.values())
