"""The cosine filter: its definition by hand, its selection against exact arithmetic on
adversarial families, and the guarantees its docstring states (direction, influence), tested
against attackers crafted for it."""

from fractions import Fraction

import pytest
import torch

from carefl.errors import ConfigError
from carefl.robust import build_aggregator, check_assumptions, cosine_filter
from carefl.robust.clipping import AdaptiveRobustClip
from carefl.robust.cosine_filter import CosineFilter, select_aligned
from carefl.robust.median import CoordinateMedian
from carefl.robust.trimmed_mean import TrimmedMean

torch.set_num_threads(1)


def pipeline(f):
    return {"f": f, "rule": {"name": "cosine_filter"}, "pre": [{"name": "arc"}], "server_opt": {"name": "sgd"}}


def exact_selection(x: torch.Tensor, m: torch.Tensor, keep: int) -> list[bool]:
    """The definition in Python fractions: the ``keep`` largest exact cosines to ``m`` (ties
    by lower index), of those only the positive ones."""
    rows = [[Fraction(v) for v in r] for r in x.tolist()]
    mf = [Fraction(v) for v in m.tolist()]
    m_sq = sum(v * v for v in mf)
    keys = []
    for r in rows:
        dot, sq = sum(a * b for a, b in zip(r, mf)), sum(a * a for a in r)
        keys.append(dot * abs(dot) / sq if sq and m_sq else Fraction(0))
    order = sorted(range(len(rows)), key=lambda i: (-keys[i], i))
    kept = [False] * len(rows)
    for i in order[:keep]:
        kept[i] = keys[i] > 0
    return kept


def test_by_hand():
    # n=5, f=1; median per column: (1, 0); cosines 1, 1/sqrt2, 0, -1/sqrt2, 1
    x = torch.tensor([[3.0, 0], [2, 2], [0, 3], [-3, -3], [1, 0]])
    res = CosineFilter(f=1)(x, torch.ones(5))
    # the 4 most aligned are rows 0, 4, 1, 2; row 2 is orthogonal to the median: dropped too
    assert res.selected.tolist() == [True, True, False, False, True]
    assert torch.allclose(res.update, torch.tensor([2.0, 2.0 / 3]))
    assert torch.allclose(res.scores, 1 - torch.tensor([1, 0.5**0.5, 0, -(0.5**0.5), 1], dtype=torch.float64))


def test_nothing_aligned_moves_nothing():
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [0, 0]])  # median 0
    res = CosineFilter(f=1)(x, torch.ones(5))
    assert not res.selected.any() and res.update.tolist() == [0.0, 0.0]


def _families(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 64, generator=g)
    honest = base + 0.5 * torch.randn(7, 64, generator=g)
    dup = torch.cat([honest[:5], honest[4:5], honest[4:5], -honest[:2]])  # exact ties at the cut
    ulp = honest.clone()
    ulp[5] = ulp[4]
    ulp[5, 0] = torch.nextafter(ulp[4, 0], torch.tensor(float("inf")))  # a one-ulp near-tie
    # rows whose exact dot with the median is 0 but whose float64 sum cancels catastrophically
    ones = torch.ones(6, 64)
    cancel = torch.zeros(3, 64)
    cancel[:, :4] = torch.tensor([1e30, 1.0, -1e30, -1.0])
    cancel[1, 4] = 2.0**-20  # exactly +2^-20 aligned
    cancel[2, 4] = -(2.0**-20)
    huge = torch.cat([honest[:6], 1e6 * honest[6:7], -1e6 * honest[:2]])
    return {"duplicates": dup, "one_ulp": ulp, "cancellation": torch.cat([ones, cancel]), "huge": huge,
            "random": torch.randn(9, 64, generator=g)}


@pytest.mark.parametrize("family", ["duplicates", "one_ulp", "cancellation", "huge", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("f", [1, 2, 3])
def test_selection_is_the_exact_one(family, seed, f):
    x = _families(seed)[family]
    m = CoordinateMedian()(x, torch.ones(len(x))).update
    kept, _ = select_aligned(x, m, len(x) - f)
    assert kept.tolist() == exact_selection(x, m, len(x) - f)


def test_float_cosines_decide_only_when_their_bound_is_certain(monkeypatch):
    x = _families(0)["cancellation"]
    m = CoordinateMedian()(x, torch.ones(len(x))).update
    cos, err = cosine_filter.median_cosines(x, m)
    assert (cos[6:].abs() <= err[6:]).all()  # float64 cannot tell the cancelling rows' signs
    assert not cosine_filter._certain(cos, err, len(x) - 1)
    calls = []
    monkeypatch.setattr(cosine_filter, "exact_cosine_keys", lambda *a: calls.append(1) or [Fraction(1)] * len(x))
    select_aligned(_families(0)["random"], torch.ones(64), 8)
    assert not calls  # well-separated random rows never pay for exact arithmetic


def label_skew(seed: int, n: int = 10, f: int = 2, classes: int = 10, d: int = 200):
    """Honest hospital i holds class i: its update = a shared feature step (positive, common)
    plus a large step on its own class's output coordinate. The last f are sign flippers."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.rand(d - classes, generator=g) + 0.5
    rows = torch.zeros(n, d)
    for i in range(n):
        rows[i, : d - classes] = shared + 0.3 * torch.randn(d - classes, generator=g)
        rows[i, d - classes + i % classes] = 20.0
    rows[n - f :] *= -1
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_sign_flippers_are_dropped_where_the_trimmed_mean_erases_a_class_held_by_one_hospital(seed):
    n, f, classes = 10, 2, 10
    x = label_skew(seed, n, f, classes)
    res = build_aggregator(pipeline(f))(x, [100] * n)
    assert res.selected.tolist() == [True] * (n - f) + [False] * f
    clip = AdaptiveRobustClip(f)(x)[0][: n - f]  # ARC shortens only the longest rows, honest ones too
    assert torch.allclose(res.update, clip.mean(dim=0), atol=1e-5)
    own = res.update[-classes : -classes + n - f]
    assert (own > 0).all()  # every honest hospital's class moves up
    trimmed = TrimmedMean(f=f)(x, torch.ones(n)).update[-classes : -classes + n - f]
    assert (trimmed <= 0).all()  # the trimmed mean drops each lone holder with the attackers


def crafted_attacks(x_honest: torch.Tensor, f: int, g: torch.Generator) -> list[torch.Tensor]:
    """Attacks aimed at this rule: aligned but long; barely aligned with a large orthogonal
    part; copies of an honest row, scaled; mean reversed; noise."""
    mean = x_honest.mean(dim=0)
    unit = mean / mean.norm()
    ortho = torch.randn(f, x_honest.shape[1], generator=g)
    ortho -= (ortho @ unit)[:, None] * unit
    ortho /= ortho.norm(dim=1, keepdim=True)
    return [
        100 * mean.expand(f, -1).clone(),
        (0.05 * unit + ortho) * 50,
        5 * x_honest[:f],
        -3 * mean.expand(f, -1).clone(),
        10 * torch.randn(f, x_honest.shape[1], generator=g),
    ]


@pytest.mark.parametrize("seed", range(8))
def test_direction_and_influence_bounds_hold_against_crafted_attackers(seed):
    g = torch.Generator().manual_seed(seed)
    n, f, d = 10, 3, 80
    honest = torch.randn(d, generator=g) + 2 * torch.randn(n - f, d, generator=g)
    for attack in crafted_attacks(honest, f, g):  # built from the very honest rows they join
        x = torch.cat([honest, attack])
        res = build_aggregator(pipeline(f))(x, [1] * n)
        rows = AdaptiveRobustClip(f)(x)[0]
        m = CoordinateMedian()(rows, torch.ones(n)).update
        kept = res.selected
        assert kept.any()
        assert float(res.update.double() @ m.double()) > 0  # never against the median
        big_c = float(honest.norm(dim=1).max())
        assert float(rows.norm(dim=1).max()) <= big_c * (1 + 1e-6)
        k, total = int(kept[n - f :].sum()), int(kept.sum())
        honest_kept = rows[: n - f][kept[: n - f]].mean(dim=0)
        assert float((res.update - honest_kept).norm()) <= 2 * k * big_c / total + 1e-4


def test_needs_f_below_half_and_a_clip_in_front():
    with pytest.raises(ConfigError, match=r"strategy\.f"):
        check_assumptions(pipeline(5), 10)
    with pytest.raises(ConfigError, match=r"strategy\.pre.*arc"):
        check_assumptions({**pipeline(2), "pre": []}, 10)
    check_assumptions({**pipeline(2), "pre": [{"name": "clip", "tau": 1.0}]}, 10)
    check_assumptions(pipeline(2), 10)
