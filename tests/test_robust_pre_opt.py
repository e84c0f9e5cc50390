"""Pre-aggregators and server optimisers against their definitions, by hand."""

import math

import torch

from carefl.robust.bucketing import Bucketing
from carefl.robust.clipping import AdaptiveRobustClip, NormClip
from carefl.robust.nnm import NearestNeighbourMixing
from carefl.robust.server_opt import FedAdam, FedAvgM, ServerSGD

torch.set_num_threads(1)


def test_norm_clip_fixed_and_median_radius():
    out, owner = NormClip(tau=1.0)(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert owner.tolist() == [0, 1]
    out, _ = NormClip(tau=None)(torch.tensor([[1.0, 0.0], [0.0, 2.0], [6.0, 8.0]]))
    # median norm 2: the first two pass, the third is scaled from norm 10 to 2
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.2, 1.6]]))


def test_arc_clips_the_k_largest_to_the_next_norm_by_hand():
    # n=5, f=1: k = floor(2 * 1/5 * 4) = 1 -> only the largest (norm 10) is cut to the 2nd (norm 3)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [6.0, 8.0], [0.0, 3.0], [0.5, 0.0]])
    out, owner = AdaptiveRobustClip(f=1)(x)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.8, 2.4], [0.0, 3.0], [0.5, 0.0]]))
    assert owner.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(AdaptiveRobustClip(f=0)(x)[0], x)  # k = 0: nothing changes


def test_arc_bounds_every_row_by_the_longest_honest_update_whatever_the_attackers_send():
    """The guarantee in the docstring: for f <= n/2, after ARC no row is longer than the
    longest honest row, wherever the f attackers sit and whatever norms they choose."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(2, 16, (1,), generator=gen))
        f = int(torch.randint(0, n // 2 + 1, (1,), generator=gen))
        honest = torch.randn(n - f, 7, generator=gen) * torch.rand(n - f, 1, generator=gen) * 5
        attack = torch.randn(f, 7, generator=gen) * 10.0 ** torch.randint(-3, 7, (f, 1), generator=gen)
        rows = torch.cat([honest, attack])[torch.randperm(n, generator=gen)]
        out, _ = AdaptiveRobustClip(f=f)(rows)
        longest_honest = honest.norm(dim=1).max() if n > f else torch.tensor(0.0)
        assert out.norm(dim=1).max() <= longest_honest * (1 + 1e-5) + 1e-6, (trial, n, f)
        k = math.floor(2 * f * (n - f) / n)
        # the n - k shortest rows are untouched
        keep = torch.argsort(rows.norm(dim=1), stable=True)[: n - k]
        assert torch.equal(out[keep], rows[keep]), (trial, n, f)


def test_nnm_by_hand():
    out, owner = NearestNeighbourMixing(f=1)(torch.tensor([[0.0], [1.0], [2.0], [10.0]]))
    # each row -> mean of its 3 nearest (itself included): {0,1,2}, {1,0,2}, {2,1,0}, {10,2,1}
    assert torch.allclose(out, torch.tensor([[1.0], [1.0], [1.0], [13.0 / 3]]))
    assert owner.tolist() == [0, 1, 2, 3]


def test_bucketing_means_seeded_permutation_and_state():
    x = torch.arange(7, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])
    b = Bucketing(s=3, seed=4)
    state = b.state_dict()
    out, owner = b(x)
    assert out.shape == (3, 2)
    assert torch.bincount(owner).tolist() == [3, 3, 1]
    for k in range(3):
        assert torch.allclose(out[k], x[owner == k].mean(0))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    assert owner[perm].tolist() == [0, 0, 0, 1, 1, 1, 2]
    again = Bucketing(s=3, seed=999)
    again.load_state_dict(state)
    assert torch.equal(again(x)[1], owner)  # same generator state -> same buckets
    assert not torch.equal(b.state_dict()["generator"], state["generator"])


def test_server_sgd_and_fedavgm_by_hand():
    assert ServerSGD(lr=0.5).step(torch.tensor([2.0, -4.0])).tolist() == [1.0, -2.0]
    opt = FedAvgM(lr=0.5, momentum=0.9)
    assert opt.step(torch.tensor([1.0])).tolist() == [0.5]  # m = 1
    resumed = FedAvgM(lr=0.5, momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    for o in (opt, resumed):
        assert torch.allclose(o.step(torch.tensor([2.0])), torch.tensor([0.5 * (0.9 * 1 + 2)]))


def test_fedadam_two_steps_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    m, v = 0.0, 0.0
    for u in (2.0, -1.0):
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * u * u
        step = opt.step(torch.tensor([u], dtype=torch.float64)).item()
        assert math.isclose(step, lr * m / (math.sqrt(v) + tau), rel_tol=1e-12)
    resumed = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    resumed.load_state_dict(opt.state_dict())
    u = torch.tensor([0.5], dtype=torch.float64)
    assert torch.equal(resumed.step(u), opt.step(u))
