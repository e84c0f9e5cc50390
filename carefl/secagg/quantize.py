"""Clip an update and map it into the ring Z_{2^32} that masks are added in, and back.

A hospital's update ``u`` (float32, shape (d,), in model-weight units) is first scaled to L2
norm at most ``C`` (``strategy.secagg.clip``), so every coordinate lies in [-C, C]; then each
coordinate becomes the integer ``q = round((x + C) / (2C) * L)`` with ``L = 2^bits - 1``
levels, 0 <= q <= L. Written here (a few lines of numpy) because the ring, the range and the
overflow bound below must be the ones this protocol proves.

Exactness: the server only ever learns ``sum_i q_i mod 2^32`` over a bucket's s survivors.
With ``s * L < 2^32`` (:func:`max_bucket`) no sum wraps, so it is the exact integer sum, and
the decoded mean ``(sum q) * 2C / (L s) - C`` differs from the mean of the clipped updates by
at most ``C / L`` per coordinate (each rounding error <= half a step, step = 2C / L).

What it bounds (the only robustness a plain secure sum has): an honest bucket sum lies in
[0, s L] per coordinate and the mean of s clipped updates has L2 norm <= C (+ the rounding,
<= sqrt(d) C / L). :func:`sum_problem` refuses a bucket whose decoded sum breaks either, so
whatever a Byzantine member sends, its bucket's mean stays in the L2 ball of radius C that
honest means lie in: it moves that mean by at most 2C.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

RING_BITS = 32


def levels(bits: int) -> int:
    """``L = 2^bits - 1``: the largest quantised value."""
    return (1 << bits) - 1


def max_bucket(bits: int) -> int:
    """The most hospitals whose sum of quantised values cannot wrap: largest s with s L < 2^32."""
    return ((1 << RING_BITS) - 1) // levels(bits)


def clip(update: Tensor, bound: float) -> Tensor:
    """``update * min(1, bound / ||update||_2)`` (float32, same shape)."""
    norm = float(update.double().norm())
    return update if norm <= bound else (update.double() * (bound / norm)).float()


def quantize(update: Tensor, bound: float, bits: int) -> np.ndarray:
    """The clipped update as uint32 levels in [0, L], shape (d,)."""
    x = np.clip(clip(update, bound).double().numpy(), -bound, bound)
    return np.rint((x + bound) * (levels(bits) / (2.0 * bound))).astype(np.uint32)


def dequantize_mean(total: np.ndarray, count: int, bound: float, bits: int) -> Tensor:
    """The mean update of ``count`` hospitals from the uint32 sum of their levels, float32 (d,).

    Centred first, exactly, in integers (``total - count L / 2``, an int32 when it wraps), then
    converted: in float32 when every centred sum is below 2^24 in size (e.g. 7 hospitals at 22
    bits: half the memory traffic of float64), else in float64. Either way the integer is
    exact and the result carries one float32 rounding of the (small) mean itself."""
    top, step = levels(bits), 2.0 * bound / levels(bits)
    offset = count * top // 2
    if count * top < 1 << 25:
        mean = (total - np.uint32(offset)).view(np.int32).astype(np.float32)
        mean *= np.float32(step / count)
        mean += np.float32(offset * step / count - bound)  # |.| <= step / 2: the centring's remainder
        return torch.from_numpy(mean)
    mean = total.astype(np.float64)
    mean *= step / count
    mean -= bound
    return torch.from_numpy(mean.astype(np.float32))


def sum_problem(total: np.ndarray, mean: Tensor, count: int, bound: float, bits: int) -> str | None:
    """Why ``total`` (and ``mean``, its :func:`dequantize_mean`) cannot come from ``count``
    honest quantised updates, or None."""
    top = int(total.max()) if total.size else 0
    if top > count * levels(bits):
        return (f"its secure sum has a coordinate ({top}) no {count} honest inputs can produce: a member "
                "sent a masked input or shares outside the protocol")
    norm = float(np.linalg.norm(mean.numpy()))  # BLAS nrm2: scaled, accurate to float32 rounding
    if norm > bound + math.sqrt(total.size) * bound / levels(bits) + 1e-6 * bound:
        return f"its mean has L2 norm {norm:.4g} > strategy.secagg.clip={bound:g}: a member sent an update it did not clip"
    return None
