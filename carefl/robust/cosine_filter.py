"""Cosine filter: average the updates that point where the coordinate-wise median points.

Written here: no library we use (Flower, Opacus, MONAI) ships a median-referenced cosine
selection. It is in the family of FLTrust (Cao et al. 2021, which needs a server-side root
dataset for its reference direction; the coordinate-wise median replaces it here, so the
server needs no data) and of the selection rules (Multi-Krum), which keep whole rows.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from carefl.robust.base import AggResult, Rule
from carefl.robust.linalg import DIST_BLOCK, column_blocks, exact_dots
from carefl.robust.median import coordinate_median

#: unit round-off of float64
_U = 2.0**-53


def median_cosines(updates: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos (n,), err (n,))`` float64: ``cos_i = <x_i, m> / (||x_i|| ||m||)`` for the rows
    ``x_i`` of ``updates`` ``(n, d)`` float32 and ``m`` ``(d,)`` float32, and a bound on each
    value's rounding error (0 for a zero row or a zero ``m``, whose cosine is defined as 0).

    Sums run in float64 over column blocks; the products of two float32 are exact in float64,
    so a dot product is within ``gamma_d ||x|| ||m||`` of the exact one and each squared norm
    within ``gamma_d`` relative (Higham's ``gamma_d = d u / (1 - d u)``, ``u = 2**-53``, any
    summation order). Hence ``|cos_hat - cos| <= 2.2 gamma_d + 4 u``; ``err`` is
    ``3 gamma_d + 8 u``.
    """
    n, d = updates.shape
    dots = torch.zeros(n, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    m_sq = torch.zeros((), dtype=torch.float64)
    for cols in column_blocks(d, DIST_BLOCK):
        block, mc = updates[:, cols].double(), m[cols].double()
        dots += block @ mc
        sq += block.square().sum(dim=1)
        m_sq += mc.square().sum()
    denom = (sq * m_sq).sqrt()
    defined = denom > 0
    cos = torch.where(defined, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    gamma = d * _U / (1 - d * _U)
    return cos, torch.where(defined, torch.full_like(cos, 3 * gamma + 8 * _U), torch.zeros_like(cos))


def exact_cosine_keys(updates: Tensor, m: Tensor) -> list[Fraction]:
    """Exact keys ``(n,)`` that order the rows as their exact cosines to ``m`` do:
    ``sign(<x_i, m>) <x_i, m>^2 / ||x_i||^2`` (= ``cos_i |cos_i| ||m||^2``, monotone in
    ``cos_i``), 0 for a zero row or a zero ``m``; from :func:`exact_dots` (integers, no
    rounding)."""
    n = updates.shape[0]
    rows = torch.cat([updates, m[None].to(updates.dtype)])
    pairs = [(i, n) for i in range(n)] + [(i, i) for i in range(n)] + [(n, n)]
    values = exact_dots(rows, pairs)
    dots, sq, m_sq = values[:n], values[n : 2 * n], values[2 * n]
    return [Fraction(dot * abs(dot), s) if s and m_sq else Fraction(0) for dot, s in zip(dots, sq)]


def _certain(cos: Tensor, err: Tensor, keep: int) -> bool:
    """Whether the float selection (the ``keep`` largest cosines, of those ``> 0``) is the exact
    one: no cosine's sign is in doubt and, if more than ``keep`` are positive, the ``keep``-th
    largest lies more than both error bounds above the next."""
    if bool(((cos.abs() <= err) & (err > 0)).any()):
        return False
    positive = cos > 0
    if keep == 0 or int(positive.sum()) <= keep:
        return True
    order = torch.sort(cos[positive], descending=True, stable=True).indices
    inside, outside = order[keep - 1], order[keep]
    low, high = (cos - err)[positive], (cos + err)[positive]
    return bool(low[inside] > high[outside])


def select_aligned(updates: Tensor, m: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``(kept (n,) bool, cos (n,) float64)``: the ``keep`` rows with the largest cosine to
    ``m``, ties by lower index, and of those only the ones with cosine > 0 -- exactly as exact
    arithmetic selects them. The float64 cosines decide when their error bounds
    (:func:`median_cosines`) separate the cut and every sign; otherwise the exact keys
    (:func:`exact_cosine_keys`) do. ``cos`` is the float64 value, for scores."""
    n = updates.shape[0]
    cos, err = median_cosines(updates, m)
    if _certain(cos, err, keep):
        order = torch.sort(cos, descending=True, stable=True).indices.tolist()
        positive = (cos > 0).tolist()
    else:
        keys = exact_cosine_keys(updates, m)
        order = sorted(range(n), key=lambda i: (-keys[i], i))
        positive = [k > 0 for k in keys]
    kept = torch.zeros(n, dtype=torch.bool)
    for i in order[:keep]:
        kept[i] = positive[i]
    return kept, cos


class CosineFilter(Rule):
    """Keep the ``n - f`` updates most aligned with the coordinate-wise median ``m``, drop
    those of them that do not point into ``m``'s half-space, and average the kept ones
    (uniform weights; claimed example counts are ignored, as by every robust rule).

    Selection (:func:`select_aligned`): sort the cosines ``cos_i`` to ``m`` in decreasing
    order, ties by lower index; keep the first ``n - f`` with ``cos_i > 0``. Nothing kept
    (every row orthogonal to or against ``m``, or ``m = 0``): the zero update, the round
    moves nothing.

    What it guarantees, against up to f Byzantine rows and f < n/2:

    * **Direction.** Every kept row has ``<x_i, m> > 0``, so the output does too (or is 0):
      attackers can never make the global model step against the coordinate-wise median,
      which lies inside the honest values' range at every coordinate (f < n/2).
    * **Influence.** With ARC in front (``conf/strategy/cosine_filter.yaml``), every row is no
      longer than the longest honest update, ``C`` (:class:`AdaptiveRobustClip`). If ``k`` of
      the ``K`` kept rows are Byzantine, the output is within ``2 k C / K`` of the mean of the
      kept honest rows (as ARC left them), whatever the attackers send; a row that points away from ``m`` (sign
      flipping, inner-product manipulation, noise, most of the time) is not kept at all.
    * **Not** (f, kappa)-robust in the sense of Allouah et al. 2023: the bound is in units of
      the honest norm ``C``, not of the honest spread. On label-skewed hospitals the two are of
      the same order (the honest updates of a Dirichlet(0.1) digits consortium had pairwise
      cosines of median 0.02, -0.22 to 0.53), and there this rule keeps or drops whole rows
      where a coordinate-wise rule trims a class's lone holder with the attackers. It always
      drops f rows, honest ones when the attackers were already left out (by the norm bound or
      by not replying). Measured trade-off: BENCHMARKS.md, "Robustness under heterogeneity".

    Exactness: the selection is the one exact arithmetic makes on the same ``m`` (the float32
    median, as the median rule computes it), on every input: float64 cosines decide when
    their proven error bounds separate the cut and every sign, exact integer dot products
    otherwise (:func:`select_aligned`).

    scores: ``1 - cos_i`` in [0, 2] (lower = more aligned). selected: kept.
    """

    def __init__(self, f: int = 0):
        self.f = f

    def __call__(self, updates: Tensor, weights: Tensor) -> AggResult:
        n = updates.shape[0]
        m = coordinate_median(updates)
        kept, cos = select_aligned(updates, m, n - self.f)
        weights = kept.to(updates.dtype) / max(int(kept.sum()), 1)  # 1/K on the kept rows; all 0: update 0
        return AggResult(weights @ updates, 1.0 - cos, kept)
