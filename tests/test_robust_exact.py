"""Krum, Multi-Krum and Bulyan select exactly what exact arithmetic selects (issue 13).

References are exact and independent of the code under test:
* dyadic inputs: every value is an integer times 2^-12 (exact in float32), so squared
  distances are integers times 2^-24 and the reference computes them in int64, exactly;
* plain float32 inputs (the issue's own family): a float64 reference from exact differences
  and ``math.fsum``, whose error (< 4u relative) the test checks is far below the score gaps;
* tiny inputs: Python fractions.
Ties are broken by the lower index. The families are adversarial: a few huge rows, rows
sharing a large common component, near-duplicates, identical rows, and exact ties between
different rows (mirror-symmetric sets, circulant sets where every score is equal).
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from carefl.robust import linalg
from carefl.robust.bulyan import Bulyan
from carefl.robust.krum import Krum, MultiKrum, krum_selection

torch.set_num_threads(1)
SCALE = 2.0**-12


# -- references ---------------------------------------------------------------------------------

def exact_sq_dists(ints: np.ndarray) -> list[list[int]]:
    """Exact squared distances of integer rows (int64, checked not to overflow)."""
    n, d = ints.shape
    span = int(ints.max()) - int(ints.min())
    assert span * span * d < 2**62
    return [[int(((ints[i] - ints[j]) ** 2).sum()) for j in range(n)] for i in range(n)]


def float_sq_dists(x: torch.Tensor) -> tuple[list[list[float]], float]:
    """float64 squared distances of float32 rows and a relative error bound. Each difference is
    split exactly into ``s + e`` (TwoSum, ``|e| <= u |s|``); the three products of ``(s + e)^2``
    err by at most ``u (|s| + |e|)^2 <= u (1 + 3u) (s + e)^2`` together, and ``fsum`` rounds the
    total once: under ``2.01 u`` relative per distance, ``4u`` covers the score sums too."""
    x64 = x.double().numpy()
    n = x64.shape[0]
    dist = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        a, b = x64[i], -x64[j]
        s = a + b
        bb = s - a
        e = (a - (s - bb)) + (b - bb)
        dist[i][j] = dist[j][i] = math.fsum(np.concatenate([s * s, 2 * s * e, e * e]))
    return dist, 4 * 2.0**-53


def krum_order(dist, rows, k):
    """Rows sorted by (exact Krum score within ``rows``, index), and the scores."""
    score = {i: sum(sorted(dist[i][j] for j in rows if j != i)[:k]) for i in rows}
    return sorted(rows, key=lambda i: (score[i], i)), score


def certified_float_order(dist, rel, rows, k, m):
    """krum_order on float64 distances, checking that its error cannot move the cut at m."""
    order, score = krum_order(dist, rows, k)
    if m < len(rows):
        top = max(score.values())
        assert score[order[m]] - score[order[m - 1]] > 4 * rel * top, "reference cannot decide"
    return order, score


def bulyan_order(dist, n, f):
    """Published Bulyan selection: Krum re-run on the remaining rows, theta = n - 2f times."""
    remaining, picks = list(range(n)), []
    for _ in range(n - 2 * f):
        pick = krum_order(dist, remaining, max(1, len(remaining) - f - 2))[0][0]
        picks.append(pick)
        remaining.remove(pick)
    return picks


# -- adversarial families (integer rows; value = int * 2^-12) ------------------------------------

def few_huge_rows(rng, n, f, d):
    """The issue's family: honest rows of norm ~3, f rows of norm ~1000."""
    x = rng.normal(0.0, 3 / math.sqrt(d), (n, d))
    x[:f] = rng.normal(0.0, 1000 / math.sqrt(d), (f, d))
    return np.rint(x / SCALE).astype(np.int64)


def common_component(rng, n, f, d):
    """All rows = one large vector (~2^8) + small deviations; Byzantine deviations larger."""
    c = rng.integers(-(2**20), 2**20, d)
    dev = rng.integers(-50, 51, (n, d)) * rng.integers(1, 3, (n, 1))
    dev[:f] = rng.integers(-400, 401, (f, d))
    return c + dev


def near_duplicates(rng, n, f, d):
    """Two rows differ from an honest row by one unit in one coordinate: near-tied scores."""
    x = rng.integers(-40, 41, (n, d))
    x[:f] += 300
    for r in (n - 1, n - 2):
        x[r] = x[f]
        x[r, rng.integers(d)] += rng.choice([-1, 1])
    return x


def identical_rows(rng, n, f, d):
    """f identical Byzantine rows near the honest mean (ALIE-like): they tie for the lowest score."""
    x = rng.integers(-40, 41, (n, d))
    x[:f] = np.rint(x[f:].mean(0)) + rng.integers(-1, 2, d)
    return x


def mirror(rng, n, f, d):
    """A set symmetric about a centre c (rows c +- v): mirrored rows tie exactly, not identical."""
    c = rng.integers(-1000, 1001, d)
    vs = [rng.integers(-30, 31, d) * (1 + i % 3) for i in range(n // 2)]
    rows = [c + v for v in vs] + [c - v for v in vs] + ([c] if n % 2 else [])
    return np.stack(rows)


def circulant(rng, n, f, d):
    """Every row a cyclic shift of one vector by a multiple of d / n: all scores are equal."""
    base = rng.integers(-50, 51, d)
    return np.stack([np.roll(base, i * (d // n)) for i in range(n)])


FAMILIES = {
    "few_huge_rows": (few_huge_rows, 100_000),
    "common_component": (common_component, 20_000),
    "near_duplicates": (near_duplicates, 5_000),
    "identical_rows": (identical_rows, 5_000),
    "mirror": (mirror, 3_000),
    "circulant": (circulant, 3_000),
}


def dyadic(ints: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy((ints * SCALE).astype(np.float32))
    assert np.array_equal(x.double().numpy() / SCALE, ints)  # exact in float32
    return x


def shuffled(ints, rng):
    return ints[rng.permutation(ints.shape[0])]


# -- Krum / Multi-Krum --------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n, f", [(10, 2), (7, 1)])
def test_krum_selection_is_the_exact_one_on_adversarial_families(family, n, f):
    make, d = FAMILIES[family]
    k = n - f - 2
    for seed in range(8 if d > 50_000 else 12):
        rng = np.random.default_rng(1000 * seed + n)
        ints = shuffled(make(rng, n, f, d), rng)
        x = dyadic(ints)
        order, _ = krum_order(exact_sq_dists(ints), list(range(n)), k)
        for m in sorted({1, 2, n - 2 * f, n - f}):
            scores, chosen, selected = krum_selection(x, f, m)
            assert sorted(chosen.tolist()) == sorted(order[:m]), (family, seed, m)
            assert selected.nonzero().flatten().tolist() == sorted(order[:m])
        assert Krum(f=f)(x, torch.ones(n)).selected.nonzero().item() == order[0]


def test_krum_scores_are_exact_to_1e_5_where_the_old_fallback_erred_by_1_percent():
    # the family, plain float32 (not dyadic): 8 honest rows of norm ~3, 2 of norm ~1000
    n, f, d = 10, 2, 100_000
    k = n - f - 2
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g) * (3 / math.sqrt(d))
        x[:f] = torch.randn(f, d, generator=g) * (1000 / math.sqrt(d))
        dist, rel = float_sq_dists(x)
        for m in (1, n - 2 * f, n - f):
            order, ref = certified_float_order(dist, rel, list(range(n)), k, m)
            scores, chosen, _ = krum_selection(x, f, m)
            assert sorted(chosen.tolist()) == sorted(order[:m]), (seed, m)
            for i in range(n):
                assert abs(scores[i].item() - ref[i]) <= 1e-5 * ref[i], (seed, i)


def test_tiny_exact_ties_follow_the_index_rule():
    x = torch.tensor([[0.0], [1], [2], [10], [11]])  # scores 5, 2, 5, 65, 82 (f=1: 2 neighbours)
    assert MultiKrum(f=1, m=2)(x, torch.ones(5)).selected.tolist() == [True, True, False, False, False]
    flipped = x.flip(0)  # scores 82, 65, 5, 2, 5: the tie is now between rows 2 and 4
    assert MultiKrum(f=1, m=2)(flipped, torch.ones(5)).selected.tolist() == [False, False, True, True, False]
    # a square's corners and its centre, f = 0, k = 3: centre 3, every corner 1 + 2 + 2 = 5
    square = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [0, 0]])
    pts = square.tolist()
    dist = [[sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(p, q)) for q in pts] for p in pts]
    for m in range(1, 5):
        want = krum_order(dist, list(range(5)), 3)[0][:m]
        assert want == [4, 0, 1, 2][:m]
        assert sorted(krum_selection(square, 0, m)[1].tolist()) == sorted(want)


# -- Bulyan ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n, f", [(11, 2), (7, 1)])
def test_bulyan_selects_recursively_and_exactly(family, n, f):
    make, d = FAMILIES[family]
    d = min(d, 20_000)
    for seed in range(10):
        rng = np.random.default_rng(7 * seed + n)
        ints = shuffled(make(rng, n, f, d), rng)
        picks = bulyan_order(exact_sq_dists(ints), n, f)
        res = Bulyan(f=f)(dyadic(ints), torch.ones(n))
        assert res.selected.nonzero().flatten().tolist() == sorted(picks), (family, seed)


def test_bulyan_is_not_the_one_shot_selection():
    # the theta lowest Krum scores on all n differ from the recursion on many random inputs;
    # Bulyan must follow the recursion on every one of them
    differ = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n, f = 11, 2
        ints = rng.integers(-50, 51, (n, 40)) * rng.integers(1, 6, (n, 1))
        dist = exact_sq_dists(ints)
        picks = bulyan_order(dist, n, f)
        one_shot = krum_order(dist, list(range(n)), n - f - 2)[0][: n - 2 * f]
        differ += sorted(picks) != sorted(one_shot)
        assert Bulyan(f=f)(dyadic(ints), torch.ones(n)).selected.nonzero().flatten().tolist() == sorted(picks)
    assert differ >= 5


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2), (12, 2), (15, 3), (19, 4)])
def test_bulyan_equals_flowers_legacy_recursive_bulyan(n, f):
    from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

    for seed in range(10):
        g = torch.Generator().manual_seed(100 * n + seed)
        x = torch.randn(n, 60, generator=g) * torch.rand(n, 1, generator=g) * 4
        ours = Bulyan(f=f)(x, torch.ones(n)).update.double().numpy()
        # float64 copies: Flower's own distances are then far more accurate than the score gaps
        results = [([row.double().numpy()], 1) for row in x]
        ref = aggregate_bulyan(results, f, aggregate_krum, to_keep=0)[0]
        assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max(), (n, f, seed)


# -- the primitives behind the guarantee ---------------------------------------------------------

def extreme_float32(rng, shape):
    """Values over the whole float32 range: subnormals, zeros, both signs, near the maximum."""
    mant = rng.standard_normal(shape)
    v = (mant * 2.0 ** rng.integers(-155, 120, shape)).astype(np.float32)
    v[rng.random(shape) < 0.1] = 0.0
    big = rng.random(shape) < 0.02
    v[big] = (np.sign(mant[big]) * 3.0e38).astype(np.float32)
    assert np.isfinite(v).all() and (np.abs(v[v != 0]) < 2.0**-126).any()
    return v


def test_exact_dots_are_exact_over_the_whole_float32_range():
    from carefl.robust.linalg import EXACT_SHIFT, exact_dots

    rng = np.random.default_rng(0)
    x = torch.from_numpy(extreme_float32(rng, (5, 300)))
    x[4] = x[3]
    x[4, ::2] *= -1
    pairs = [(i, j) for i in range(5) for j in range(i, 5)]
    for (i, j), got in zip(pairs, exact_dots(x, pairs)):
        want = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x[i].tolist(), x[j].tolist()))
        assert Fraction(got, 2**EXACT_SHIFT) == want, (i, j)
    x[2, 7] = float("inf")
    with pytest.raises(ValueError, match="Inf or NaN"):
        exact_dots(x, [(1, 2)])


@pytest.mark.parametrize("threads", [1, 2])
def test_centred_distances_stay_within_their_error_bound(threads, monkeypatch):
    monkeypatch.setattr(linalg, "CENTRED_BLOCK", 64)  # 300 columns: several blocks and ranges
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(threads)
        for case in range(6):
            x = rng.standard_normal((7, 300)) * 10.0 ** rng.integers(-20, 20)
            if case % 2:
                x += rng.standard_normal(300) * 1e4  # a large common component
            x[case % 7] *= 1e6  # one huge row
            x = torch.from_numpy(x.astype(np.float32))
            exact = [[sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(p, q)) for q in x.double().tolist()]
                     for p in x.double().tolist()]
            for centre in (0, 3):
                dist = linalg.pairwise_sq_dists(x, centre)
                err = linalg.pairwise_sq_dists_error(dist, centre, 300)
                lo, hi = (dist - err).clamp_min(0.0), dist + err
                for i, j in itertools.product(range(7), repeat=2):
                    assert Fraction(lo[i, j].item()) <= exact[i][j] <= Fraction(hi[i, j].item()), (case, i, j)
    finally:
        torch.set_num_threads(saved)


def test_identical_rows_need_no_exact_arithmetic_and_mirrored_rows_do(monkeypatch):
    from carefl.robust import krum

    calls = []
    real = krum.exact_dots
    monkeypatch.setattr(krum, "exact_dots", lambda x, pairs: calls.append(len(pairs)) or real(x, pairs))
    rng = np.random.default_rng(5)
    n, f = 10, 2
    ints = identical_rows(rng, n, f, 20_000)
    order, _ = krum_order(exact_sq_dists(ints), list(range(n)), n - f - 2)
    assert krum_selection(dyadic(ints), f, 1)[1].tolist() == [order[0]] == [0]
    assert calls == []
    ints = mirror(rng, n, f, 2_000)
    order, _ = krum_order(exact_sq_dists(ints), list(range(n)), n - f - 2)
    assert sorted(krum_selection(dyadic(ints), f, 3)[1].tolist()) == sorted(order[:3])
    assert calls
