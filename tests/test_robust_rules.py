"""Each aggregation rule against its definition on small hand-checkable inputs."""

import itertools

import numpy as np
import pytest
import torch

from carefl.robust import krum, linalg
from carefl.robust.bulyan import Bulyan
from carefl.robust.centered_clip import CenteredClipping
from carefl.robust.geomed import GeometricMedian
from carefl.robust.gram import gram
from carefl.robust.krum import Krum, MultiKrum, krum_selection
from carefl.robust.linalg import dists_to, pairwise_sq_dists
from carefl.robust.mean import WeightedMean
from carefl.robust.median import CoordinateMedian
from carefl.robust.networks import batcher_network, selection_network
from carefl.robust.trimmed_mean import TrimmedMean

torch.set_num_threads(1)


def col(*values):
    return torch.tensor([[float(v)] for v in values])


def ones(n):
    return torch.ones(n)


def network_output(network, values):
    v = list(values)
    for i, j in network:
        if v[i] > v[j]:
            v[i], v[j] = v[j], v[i]
    return v


def test_batcher_network_sorts_every_01_input():
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
    for n in (3, 6, 7, 11):
        for bits in itertools.product((0, 1), repeat=n):
            assert network_output(batcher_network(n), bits) == sorted(bits)


@pytest.mark.parametrize("n, ranks, splits", [
    (5, (2,), ()), (8, (3, 4), ()), (9, (1, 7), (1, 8)), (11, (0, 1, 5, 9, 10), ()), (12, (), (3, 9)),
])
def test_selection_network_keeps_its_promise_on_every_01_input(n, ranks, splits):
    # checked here by plain Python, independently of the bit-packed check that pruned it
    network = selection_network(n, ranks, splits)
    assert len(network) < len(batcher_network(n))
    for bits in itertools.product((0, 1), repeat=n):
        out, ref = network_output(network, bits), sorted(bits)
        assert all(out[r] == ref[r] for r in ranks)
        assert all(max(out[:k], default=0) <= min(out[k:], default=1) for k in splits)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16, 20, 21, 33, 41])
@pytest.mark.parametrize("ties", [False, True])
def test_ordered_blocks_match_torch_sort_across_blocks(n, ties, monkeypatch):
    monkeypatch.setattr(linalg, "SORT_BLOCK", 64)  # 257 columns -> several blocks and a short last one
    torch.manual_seed(n)
    x = torch.randn(n + 3, 257)
    x = x.round() if ties else x
    rows = torch.arange(2, n + 2)
    ref = x[rows].sort(dim=0).values
    lo, hi = linalg.median_ranks(n)
    k = n // 3
    seen = 0
    for cols, wires in linalg.ordered_blocks(x, ranks=(lo, hi, k), splits=(k, n - k), rows=rows):
        for r in (lo, hi, k):
            assert torch.equal(wires[r], ref[r, cols])
        middle = torch.stack(wires[k : n - k]).sort(dim=0).values
        assert torch.equal(middle, ref[k : n - k, cols])
        seen += cols.stop - cols.start
    assert seen == 257


def test_median_and_trimmed_mean_match_numpy_and_the_sorted_definition(monkeypatch):
    monkeypatch.setattr(linalg, "SORT_BLOCK", 100)
    torch.manual_seed(3)
    for n in (4, 7, 20, 45):
        for x in (torch.randn(n, 333), torch.randn(n, 333).round()):
            assert torch.equal(CoordinateMedian()(x, ones(n)).update, torch.from_numpy(np.median(x.numpy(), axis=0)))
            s = x.sort(dim=0).values
            for f in range(n // 2):
                res = TrimmedMean(f=f)(x, ones(n))
                assert torch.allclose(res.update, s[f : n - f].mean(0), atol=1e-6)
                outside = (x < s[f]) | (x > s[n - f - 1])
                assert torch.equal(res.scores, outside.double().mean(dim=1))


def test_pairwise_distances_survive_a_large_common_offset():
    x = torch.randn(6, 5000) * 1e-2 + 1e3  # float32 raw Gram would cancel catastrophically
    ref = torch.cdist(x.double(), x.double()).square()
    assert torch.allclose(pairwise_sq_dists(x), ref, rtol=1e-3, atol=1e-6)
    assert torch.allclose(dists_to(x, x[0]), ref[0].sqrt(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1e-3, 1.0), (1e-2, 1e3), (1e3, 0.0)])
def test_uncentred_distances_stay_within_their_error_bound(scale, offset, monkeypatch):
    monkeypatch.setattr(linalg, "BOUNDED_BLOCK", 1000)  # 5000 columns: several blocks
    torch.manual_seed(0)
    x = torch.randn(9, 5000) * scale + offset
    x[0] += 5 * scale  # one outlier
    dist, err = linalg.pairwise_sq_dists_bounded(x)
    exact = torch.cdist(x.double(), x.double()).square()
    assert ((dist - exact).abs() <= err).all()
    c = 1001 * 2.0**-24
    gamma = c / (1 - c)
    norms = x.double().norm(dim=1)
    assert torch.allclose(err[1, 2], gamma * (norms[1] + norms[2]) ** 2, rtol=1e-4)  # the formula, not a constant


@pytest.mark.parametrize("threads", [1, 2])
def test_gram_kernel_is_within_higham_bound_for_every_tile_shape(threads):
    # n not a multiple of 4 leaves partial tiles; d around the block size leaves a short last
    # block; 2 threads split the columns in two ranges of whole blocks
    torch.manual_seed(0)
    block = 64
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, d in itertools.product((1, 2, 3, 4, 5, 7, 8, 9, 21), (1, 63, 64, 65, 1000)):
            x = torch.randn(n, d) * torch.logspace(-3, 3, n)[:, None]
            g = gram(x, block)
            exact = x.double() @ x.double().T  # products of float32 are exact in float64
            c = min(block, d) * 2.0**-24
            bound = c / (1 - c) * (x.double().abs() @ x.double().abs().T) * (1 + 1e-9)
            assert g.dtype == torch.float64 and torch.equal(g, g.T)
            assert ((g - exact).abs() <= bound).all(), (n, d)
    finally:
        torch.set_num_threads(saved)


def test_gram_kernel_refuses_anything_but_float32():
    with pytest.raises(TypeError, match="float32"):
        gram(torch.randn(3, 10, dtype=torch.float64), 8)


def exact_krum_order(x, f):
    d = torch.cdist(x.double(), x.double()).square().fill_diagonal_(float("inf"))
    return d.topk(x.shape[0] - f - 2, dim=1, largest=False).values.sum(1).argsort(stable=True)


def test_krum_selection_is_exact_when_uncentred_distances_would_misorder():
    # rows share a 1e3 offset over a 1e-3 spread: uncentred float32 distances are pure noise
    # (their bound says so), and the selection must come from the centred recomputation
    torch.manual_seed(0)
    n, f = 9, 2
    x = torch.randn(n, 20000) * 1e-3 * (1 + torch.arange(n) / n)[:, None] + 1e3
    dist, err = linalg.pairwise_sq_dists_bounded(x)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert (err[off_diagonal] > dist[off_diagonal]).all()
    for m in range(1, n):
        assert torch.equal(krum_selection(x, f, m)[1], exact_krum_order(x, f)[:m])


def test_krum_selection_certifies_well_separated_updates_without_recomputing(monkeypatch):
    torch.manual_seed(1)
    n, f = 12, 2
    x = torch.randn(n, 3000) * (1 + torch.arange(n) / n)[:, None]
    x[:f] += 50.0
    monkeypatch.setattr(krum, "pairwise_sq_dists", lambda _: pytest.fail("fell back to the centred Gram"))
    for m in (1, n - f, n - 2 * f):
        assert torch.equal(krum_selection(x, f, m)[1], exact_krum_order(x, f)[:m])


def test_median_odd_and_even():
    assert CoordinateMedian()(col(1, 2, 100), ones(3)).update.tolist() == [2.0]
    assert CoordinateMedian()(col(100, 1, 3, 2), ones(4)).update.tolist() == [2.5]
    res = CoordinateMedian()(col(1, 2, 100), ones(3))
    assert res.scores.tolist() == [1.0, 0.0, 98.0] and res.selected.all()


def test_trimmed_mean_by_hand():
    x = torch.tensor([[1.0, 10], [2, -50], [3, 30], [4, 40], [100, 20]])
    res = TrimmedMean(f=1)(x, ones(5))
    # col 0 drops 1 and 100 -> (2+3+4)/3; col 1 drops -50 and 40 -> (10+30+20)/3
    assert torch.allclose(res.update, torch.tensor([3.0, 20.0]))
    assert res.scores.tolist() == [0.5, 0.5, 0.0, 0.5, 0.5]
    assert torch.equal(TrimmedMean(f=0, beta=0.2)(x, ones(5)).update, res.update)
    assert torch.allclose(TrimmedMean(f=0)(x, ones(5)).update, x.mean(0))


def test_trimmed_mean_flags_the_always_trimmed_outlier():
    x = torch.randn(6, 40)
    x[5] = 1e3
    res = TrimmedMean(f=1)(x, ones(6))
    assert res.scores[5] == 1.0 and res.selected.tolist() == [True] * 5 + [False]


def test_krum_and_multikrum_by_hand():
    x = col(0, 1, 2, 10, 11)  # n=5, f=1 -> 2 nearest neighbours
    res = Krum(f=1)(x, ones(5))
    # squared distances to the 2 nearest: 0:1+4, 1:1+1, 2:1+4, 10:64+1, 11:81+1
    assert torch.allclose(res.scores, torch.tensor([5.0, 2, 5, 65, 82], dtype=torch.float64), atol=1e-4)
    assert res.update.tolist() == [1.0]
    assert res.selected.tolist() == [False, True, False, False, False]
    multi = MultiKrum(f=1, m=3)(x, ones(5))
    assert multi.update.tolist() == [1.0]  # mean of 0, 1, 2
    assert multi.selected.tolist() == [True, True, True, False, False]
    assert MultiKrum(f=1)(x, ones(5)).selected.sum() == 4  # m = n - f


def test_bulyan_by_hand_n7_f1():
    # theta = 5 selected by Krum score (4 nearest), beta = 3 closest to the median per coordinate
    x = torch.tensor([[0, 0], [1, 0.1], [2, 0.5], [3, 0.6], [4, 0.2], [50, 0], [-40, 0]])
    res = Bulyan(f=1)(x, ones(7))
    assert res.selected.tolist() == [True] * 5 + [False, False]
    # col 0: 0..4, median 2, closest {1,2,3} -> 2; col 1: median 0.2, closest {0.2,0.1,0} -> 0.1
    assert torch.allclose(res.update, torch.tensor([2.0, 0.1]))


def test_bulyan_beta_closest_with_duplicate_values():
    # selected column 1 values -1, -1, 0, 0.5, 3: median 0, 3 closest are 0, 0.5 and one -1
    x = torch.tensor([[0, -1], [0, -1], [0, 0], [0, 0.5], [0, 3], [100, 0], [-100, 0]])
    res = Bulyan(f=1)(x, ones(7))
    assert res.selected.tolist() == [True] * 5 + [False, False]
    assert torch.allclose(res.update, torch.tensor([0.0, -1.0 / 6]))


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2), (15, 3), (20, 2), (23, 5), (45, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_bulyan_matches_its_definition_on_random_inputs(n, f, ties, monkeypatch):
    monkeypatch.setattr(linalg, "SORT_BLOCK", 128)
    torch.manual_seed(n)
    x = torch.randn(n, 300)
    x = x.round() if ties else x
    res = Bulyan(f=f)(x, ones(n))
    # sorting first makes "closest" break ties towards the smaller value, as the rule does
    sel = x[res.selected].double().sort(dim=0).values
    med = sel.quantile(0.5, dim=0)
    beta = n - 4 * f
    idx = (sel - med).abs().argsort(dim=0, stable=True)[:beta]
    assert torch.allclose(res.update, sel.gather(0, idx).mean(0).float(), atol=1e-6)
    assert torch.equal(res.selected, torch.isin(torch.arange(n), res.scores.argsort()[: n - 2 * f]))


def test_geometric_median_of_symmetric_points_and_on_a_line():
    square = torch.tensor([[1.0, 1], [-1, 1], [-1, -1], [1, -1], [0.0, 0.0]]) + 5
    assert torch.allclose(GeometricMedian()(square, ones(5)).update, torch.tensor([5.0, 5.0]), atol=1e-4)
    # equilateral triangle: the Fermat point is the centroid
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3**0.5]])
    assert torch.allclose(GeometricMedian()(tri, ones(3)).update, tri.mean(0), atol=1e-4)
    # 1-D: the geometric median is the median, whatever the outlier
    assert abs(GeometricMedian()(col(0, 1, 1e4), ones(3)).update.item() - 1.0) < 1e-3


def test_geometric_median_beats_perturbations():
    torch.manual_seed(1)
    x = torch.randn(7, 4)
    x[0] += 50
    v = GeometricMedian(tol=1e-10)(x, ones(7)).update
    obj = lambda p: (x - p).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert obj(v) <= obj(v + 1e-2 * torch.randn(4)) + 1e-5


def test_centered_clipping_by_hand_and_momentum_state():
    x = col(0, 1, 10)
    cc = CenteredClipping(tau=2.0, iters=1)
    res = cc(x, ones(3))
    # from v=0: scales 1, 1, 2/10 -> v = (0 + 1 + 2) / 3
    assert torch.allclose(res.update, torch.tensor([1.0]))
    assert res.selected.tolist() == [True, True, False]
    # next round starts from v=1: diffs -1, 0, 9 -> scales 1, 1, 2/9 -> v = 1 + (-1 + 0 + 2)/3
    resumed = CenteredClipping(tau=2.0, iters=1)
    resumed.load_state_dict(cc.state_dict())
    assert torch.allclose(resumed(x, ones(3)).update, torch.tensor([4.0 / 3]))
    assert torch.allclose(cc(x, ones(3)).update, torch.tensor([4.0 / 3]))
    assert torch.allclose(CenteredClipping(tau=2.0, iters=2)(x, ones(3)).update, torch.tensor([4.0 / 3]))


def test_mean_caps_claims_at_the_median_claim():
    x = col(1, 2, 3, 4)
    res = WeightedMean(weighted=True)(x, torch.tensor([10.0, 20, 30, 1e9]))
    # median claim 25 -> weights 10, 20, 25, 25 out of 80
    assert torch.allclose(res.update, torch.tensor([(10 + 40 + 75 + 100) / 80.0]))
    assert WeightedMean(weighted=False)(x, torch.tensor([1.0, 1, 1, 1e9])).update.tolist() == [2.5]
