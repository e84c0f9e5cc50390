"""Compressed updates: what a hospital sends instead of its float32 weights.

An update is the flat float32 vector ``u = local - global`` (shape (d,), weight units, the
layout of :func:`carefl.robust.flatten_updates`). ``compression.name`` (conf/compression/):

=========  ==============================================  ====================  ==========================
name       payload (what crosses the wire)                 error per entry       bytes vs float32
=========  ==============================================  ====================  ==========================
none       the model weights, as without compression       0                     1x
float16    ``values`` float16 (d,)                         <= 2^-11 |u_i|        2x fewer
int8       ``q`` int8 (d,), ``scale`` float32 (ceil(d/B),)  <= scale_b / 2        ~3.94x fewer at B = 256
           per block of B: scale_b = max|u_i| / 127,
           q_i = round(u_i / scale_b)
topk       ``index`` int32 (k,) strictly increasing,       what is not sent      d / (2k) fewer
           ``values`` float32 (k,), k = ceil(fraction d)   stays in the residual
=========  ==============================================  ====================  ==========================

Top-k keeps **error feedback** at the hospital (Stich et al. 2018; Karimireddy et al. 2019):
it sends the k largest entries of ``u + e`` and keeps ``e' = (u + e) - sent`` in its state
dir for the next round, so over rounds ``sum(sent) = sum(u) - e_last``: nothing is lost,
only delayed. Written here (a few lines of torch): no maintained library does block-wise int8
/ top-k with a server-side schema check for hostile payloads.

With robust rules: the server decodes every payload to a dense float32 row before the rule, so
every rule applies unchanged; top-k rows are sparse (zeros outside each hospital's k
coordinates), which coordinate-wise rules (median, trimmed mean) see as many zero votes -- a
bias towards 0 on coordinates few hospitals send. With secure aggregation: masks are added in
a ring, so per-hospital float16 values, int8 scales or top-k indices do not add up inside a
masked sum; only a quantisation with a shared scale composes (secure aggregation's own), so
``secagg=on`` with compression is refused at config time.

Against a hostile hospital: :func:`declared_problem` checks the declared dtypes and shapes
before anything is deserialised, :func:`loaded_problem` the values after (finite, scales
>= 0, indices in range and strictly increasing), so no payload can raise or write outside
the row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

METHODS = ("none", "float16", "int8", "topk")
FLOAT16_MAX = 65504.0


def top_k(d: int, fraction: float) -> int:
    """Entries a top-k payload holds: ``max(1, ceil(fraction * d))``, at most d."""
    return min(d, max(1, math.ceil(fraction * d)))


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
    """``(payload, new residual)`` of ``update`` float32 (d,); the residual is top-k's only.

    Raises:
        ValueError: float16 of an entry beyond 65504 (it would become inf): an update that
            large is absurd; send it uncompressed or fix the training.
    """
    u = update.detach().float().reshape(-1)
    if method == "float16":
        if u.abs().max() > FLOAT16_MAX:
            raise ValueError(f"an update entry of {float(u.abs().max()):.3g} does not fit float16 (max 65504); "
                             "use compression=int8 or none")
        return {"values": u.half()}, None
    if method == "int8":
        padded = torch.nn.functional.pad(u, (0, -len(u) % block)).view(-1, block)
        scale = padded.abs().amax(dim=1) / 127.0
        q = torch.round(padded / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
        return {"q": q.to(torch.int8).reshape(-1)[: len(u)], "scale": scale}, None
    if method == "topk":
        full = u if residual is None else u + residual
        index = torch.topk(full.abs(), top_k(len(u), fraction), sorted=False).indices.sort().values
        sent = torch.zeros_like(full)
        sent[index] = full[index]
        return {"index": index.to(torch.int32), "values": full[index].clone()}, full - sent
    raise ValueError(f"unknown compression {method!r}; choose one of {METHODS[1:]}")


def decode(payload: Mapping[str, Tensor], method: str, d: int, block: int = 256) -> Tensor:
    """The dense float32 (d,) update of a payload checked by :func:`loaded_problem`."""
    if method == "float16":
        return payload["values"].float()
    if method == "int8":
        scale = payload["scale"].repeat_interleave(block)[:d]
        return payload["q"].float() * scale
    out = torch.zeros(d, dtype=torch.float32)
    out[payload["index"].long()] = payload["values"].float()
    return out


def declared_problem(declared: Mapping[str, tuple[str, tuple[int, ...]]], method: str, d: int, block: int,
                     fraction: float) -> str | None:
    """Why the declared ``{name: (dtype, shape)}`` of a reply is not this method's payload."""
    expected = layout(method, d, block, fraction)
    if set(declared) != set(expected):
        return f"a {method} payload must hold exactly {sorted(expected)}, not {sorted(str(k)[:20] for k in declared)[:4]}"
    for name, (dtype, shape) in expected.items():
        if declared[name][0] != dtype or tuple(declared[name][1]) != shape:
            return f"{method} payload {name} is declared {declared[name][0]} {tuple(declared[name][1])}, expected {dtype} {shape}"
    return None


def loaded_problem(payload: Mapping[str, Tensor], method: str, d: int) -> str | None:
    """Why the loaded arrays cannot be decoded safely (after :func:`declared_problem`)."""
    for name, tensor in payload.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{method} payload {name} holds a non-finite value"
    if method == "int8" and (payload["scale"] < 0).any():
        return "int8 payload has a negative scale"
    if method == "topk":
        index = payload["index"].long()
        if len(index) and (index.min() < 0 or index.max() >= d):
            return f"top-k payload has an index outside [0, {d})"
        if len(index) > 1 and not (index[1:] > index[:-1]).all():
            return "top-k payload indices must be strictly increasing (no repeats)"
    return None


def wire_bytes(payload: Mapping[str, Tensor]) -> int:
    """Bytes of a payload's arrays (without the .npy headers)."""
    return sum(t.numel() * t.element_size() for t in payload.values())
