"""Under attack: robust rules stay near the honest mean; lies about size buy nothing."""

import pytest
import torch

from carefl.robust import RULES, build_aggregator

torch.set_num_threads(1)
N, F, D, SIGMA = 20, 3, 50, 0.1
ROBUST = {
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean"},
    "krum": {"name": "krum"},
    "multikrum": {"name": "multikrum"},
    "bulyan": {"name": "bulyan"},
    "geomed": {"name": "geomed"},
    "cosine_filter": {"name": "cosine_filter"},
}
#: rules that bound an attacker only behind a clip (check_assumptions insists)
CLIPPED = {"cosine_filter": [{"name": "arc"}]}


def attacked(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.ones(D)
    x = mu + SIGMA * torch.randn(N, D, generator=g)
    x[:F] = 1e3
    return x, mu


def strategy(rule, pre=()):
    return {"f": F, "rule": rule, "pre": list(pre) or CLIPPED.get(rule["name"], []), "server_opt": {"name": "sgd"}}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rule_stays_near_honest_mean_while_mean_does_not(name):
    x, mu = attacked()
    bound = 2 * SIGMA * D**0.5  # twice the typical distance of one honest update to mu
    res = build_aggregator(strategy(ROBUST[name]))(x, [100] * N)
    assert (res.update - mu).norm() < bound
    mean = build_aggregator(strategy({"name": "mean", "weighted": False}))(x, [100] * N)
    assert (mean.update - mu).norm() > 100


def test_recommended_robust_pipeline_under_attack():
    x, mu = attacked(1)
    res = build_aggregator(strategy({"name": "geomed"}, [{"name": "nnm"}, {"name": "clip", "tau": None}]))(x, [1] * N)
    assert (res.update - mu).norm() < 2 * SIGMA * D**0.5


def test_centered_clipping_converges_across_rounds_thanks_to_its_momentum():
    agg = build_aggregator(strategy({"name": "centered_clip", "tau": 1.0, "iters": 3}))
    for r in range(12):
        x, mu = attacked(r)
        res = agg(x, [1] * N)
    # bias of at most f/n * tau from the clipped outliers
    assert (res.update - mu).norm() < 2 * SIGMA * D**0.5 + F / N * 1.0
    assert res.selected[:F].sum() == 0


@pytest.mark.parametrize("name", sorted(set(RULES) - {"mean"}))
def test_claimed_examples_do_not_move_a_robust_rule(name):
    x, _ = attacked(2)
    rule = {"centered_clip": {"name": "centered_clip", "tau": 1.0}}.get(name, {"name": name})
    honest = build_aggregator(strategy(rule))(x, [100] * N)
    liar = build_aggregator(strategy(rule))(x, [100] * (N - 1) + [1e9])
    assert torch.equal(honest.update, liar.update)


def test_claimed_examples_are_capped_for_the_mean():
    x = torch.zeros(5, 2)
    x[4] = 10.0  # the liar's update
    res = build_aggregator(strategy({"name": "mean", "weighted": True}))(x, [100, 100, 100, 100, 1e9])
    assert torch.allclose(res.update, torch.full((2,), 2.0))  # one median share: 10 / 5
