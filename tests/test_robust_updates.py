"""State dicts <-> update matrix, update checks, anomaly signals and reputation."""

import json

import pytest
import torch

from carefl.robust import (Reputation, apply_update, build_aggregator, flatten_updates, float_keys,
                           norm_outliers, round_signals, validate_update)

torch.set_num_threads(1)


def model_state(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net.train()
    net(torch.randn(4, 3))  # moves running stats and num_batches_tracked
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_flatten_and_apply_roundtrip_keeps_non_float_buffers_from_global():
    g = model_state(0)
    locals_ = [model_state(s) for s in (1, 2, 3)]
    for loc in locals_:
        loc["1.num_batches_tracked"] += 7
    x = flatten_updates(locals_, g)
    assert "1.num_batches_tracked" not in float_keys(g)
    assert x.shape == (3, 6 + 2 + 2 + 2 + 2 + 2) and x.dtype == torch.float32
    new = apply_update(g, x.mean(0))
    for k in float_keys(g):
        assert torch.allclose(new[k], torch.stack([loc[k] for loc in locals_]).mean(0), atol=1e-6)
    assert new["1.num_batches_tracked"] == g["1.num_batches_tracked"]
    assert list(new) == list(g) and all(new[k].dtype == g[k].dtype for k in g)
    assert torch.allclose(apply_update(g, x[1])["0.weight"], locals_[1]["0.weight"])
    with pytest.raises(ValueError):
        apply_update(g, torch.zeros(5))


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda s: s.pop("0.bias"), "missing ['0.bias']"),
        (lambda s: s.__setitem__("extra", torch.zeros(1)), "extra ['extra']"),
        (lambda s: s.__setitem__("0.weight", torch.zeros(3, 2)), "0.weight has shape (3, 2)"),
        (lambda s: s.__setitem__("0.bias", s["0.bias"].double()), "0.bias has dtype torch.float64"),
        (lambda s: s["0.weight"].__setitem__((0, 0), float("nan")), "0.weight contains NaN or Inf"),
        (lambda s: s["0.bias"].__setitem__(0, float("inf")), "0.bias contains NaN or Inf"),
        (lambda s: s["0.bias"].__setitem__(0, 3e38), "update norm inf overflows"),  # finite, norm overflows
    ],
)
def test_validate_update_names_hospital_and_problem(mutate, needle):
    g = model_state(0)
    local = {k: v.clone() for k, v in model_state(1).items()}
    assert validate_update("st-mary", local, g) is None
    mutate(local)
    reason = validate_update("st-mary", local, g)
    assert reason is not None and reason.startswith("hospital st-mary:") and needle in reason


def test_signals_are_plain_json_and_reputation_is_an_ema():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-5.0, 0.0]])
    agg = build_aggregator({"f": 0, "rule": {"name": "krum"}, "pre": [], "server_opt": {"name": "sgd"}})
    res = agg(x, [1, 1, 1, 1])
    sig = round_signals(["a", "b", "c", "d"], x, res)
    json.dumps(sig)
    assert sig["a"] == {"norm": 1.0, "cosine": 1.0, "score": pytest.approx(3.0), "selected": True}
    assert sig["c"]["cosine"] == 0.0 and sig["d"]["cosine"] == -1.0 and sig["d"]["selected"] is False
    rep = Reputation(decay=0.5)
    assert rep.update(sig) == {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0}
    resumed = Reputation()
    resumed.load_state_dict(json.loads(json.dumps(rep.state_dict())))
    later = {"c": {"selected": True, "cosine": 1.0, "norm": 1.0, "score": 0.0}}
    assert rep.update(later)["c"] == resumed.update(later)["c"] == 0.5
    assert resumed.values["a"] == 1.0  # absent hospitals keep their value


def test_aggregator_state_roundtrip_centered_clip_and_bucketing():
    strategy = {"f": 1, "rule": {"name": "centered_clip", "tau": 0.5, "iters": 2},
                "pre": [{"name": "bucketing", "s": 2, "seed": 3}], "server_opt": {"name": "sgd"}}
    a, b = build_aggregator(strategy), build_aggregator(strategy)
    x1, x2 = torch.randn(8, 10), torch.randn(8, 10)
    a(x1, [1] * 8)
    b.load_state_dict(a.state_dict())
    ra, rb = a(x2, [1] * 8), b(x2, [1] * 8)
    assert torch.equal(ra.update, rb.update) and torch.equal(ra.scores, rb.scores)
    assert ra.scores.shape == (8,)  # mapped back from 4 buckets to 8 hospitals
    assert len(set(ra.scores.tolist())) <= 4


def test_norm_outliers_absolute_and_relative_to_the_median():
    x = torch.tensor([[3.0, 4.0], [0.0, 5.0], [6.0, 8.0], [300.0, 400.0]])  # norms 5, 5, 10, 500
    assert norm_outliers(x, None, None) == {}
    assert set(norm_outliers(x, None, 10.0)) == {3}  # median 7.5: 500 > 75
    assert "max_update_norm_ratio=10" in norm_outliers(x, None, 10.0)[3]
    assert set(norm_outliers(x, 9.0, None)) == {2, 3} and "max_update_norm=9" in norm_outliers(x, 9.0, None)[2]
    assert norm_outliers(torch.zeros(0, 2), 1.0, 1.0) == {}
