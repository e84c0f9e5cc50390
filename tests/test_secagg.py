"""Secure aggregation: the protocol's sum is exact, dropouts are recovered, and a hostile
server or hospital gains nothing the guarantees in carefl/secagg/member.py exclude."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from carefl.receipts import SigningKey
from carefl.secagg import coordinator, crypto, member
from carefl.secagg.member import SecAggRefused
from carefl.secagg.quantize import dequantize_mean, levels, max_bucket, quantize

RUN, ROUND, D, C, BITS = "ab" * 32, 2, 513, 5.0, 22


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {f"h{i}": SigningKey.load_or_create(root / f"h{i}.pem") for i in range(6)}


def _start(keys, names, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    updates = {n: torch.randn(D, generator=gen) * scale for n in names}
    pending, adverts = {}, {}
    for n in names:
        pending[n], adverts[n] = member.advertise(keys[n], RUN, ROUND, n, updates[n], C, BITS)
    return updates, pending, coordinator.Bucket(RUN, ROUND, adverts, D, C, BITS)


def _run(bucket, pending, drop_share=(), drop_mask=(), drop_unmask=(), min_bucket=3,
         masked=lambda n, y: y, revealed=lambda n, reply: reply):
    """All stages; ``masked``/``revealed`` may replace what member n sends (a hostile one)."""
    for n, request in bucket.share_requests().items():
        if n not in drop_share:
            assert bucket.take_shares(n, member.share(pending[n], request, min_bucket, BITS)) is None
    for n, request in bucket.mask_requests().items():
        if n not in drop_mask:
            y = masked(n, member.mask(pending[n], request))
            assert bucket.take_masked(n, torch.from_numpy(y.view(np.int32))) is None
    for n, request in bucket.unmask_requests().items():
        if n not in drop_unmask:
            assert bucket.take_unmask(n, revealed(n, member.unmask(pending[n], request))) is None
    return bucket.result()


def _expected(updates, names):
    """The exact mean of the quantised, clipped updates of ``names`` (what the protocol promises)."""
    total = sum(quantize(updates[n], C, BITS).astype(np.uint64) for n in names)
    return dequantize_mean(total.astype(np.uint32), len(names), C, BITS)


@pytest.mark.parametrize("drops", [
    {}, {"drop_share": ("h4",)}, {"drop_mask": ("h3",)}, {"drop_unmask": ("h0",)},
    {"drop_share": ("h4",), "drop_mask": ("h3",)},
])
def test_the_sum_is_exact_with_dropouts_at_every_stage(keys, drops):
    names = ["h0", "h1", "h2", "h3", "h4"]
    updates, pending, bucket = _start(keys, names)
    mean, why = _run(bucket, pending, **drops)
    assert why == ""
    survivors = [n for n in names if n not in drops.get("drop_share", ()) + drops.get("drop_mask", ())]
    assert bucket.u2 == survivors
    assert torch.equal(mean, _expected(updates, survivors))  # bit-exact: the ring sum does not wrap
    plain = torch.stack([updates[n] for n in survivors]).mean(0)
    assert float((mean - plain).abs().max()) <= C / levels(BITS) + 1e-7


def test_below_the_threshold_the_bucket_is_refused_not_guessed(keys):
    names = ["h0", "h1", "h2", "h3", "h4"]
    _, pending, bucket = _start(keys, names)
    mean, why = _run(bucket, pending, drop_mask=("h3", "h4", "h2"))
    assert mean is None and "below the threshold t=3" in why


def test_what_the_server_receives_reveals_nothing_of_one_update(keys):
    """Each masked input alone is uniform on Z_2^32 whatever the update (here: two hospitals
    with the SAME update send unrelated vectors, and none equals or correlates with it)."""
    names = ["h0", "h1", "h2"]
    updates, pending, bucket = _start(keys, names)
    same = torch.full((D,), 0.3)
    for n in names:
        pending[n], bucket.adverts[n] = member.advertise(keys[n], RUN, ROUND, n, same, C, BITS)
    _run(bucket, pending)
    q = quantize(same, C, BITS).astype(np.float64)
    seen = [bucket.masked[n].astype(np.float64) for n in names]
    for y in seen:
        assert abs(y.mean() / 2**32 - 0.5) < 0.05          # uniform-looking, not near q ~ 2^21
        assert not np.any(y == q)
    assert abs(np.corrcoef(seen[0], seen[1])[0, 1]) < 0.2
    for n in names:  # nothing the server holds after the protocol is one hospital's update
        assert all(not np.array_equal(y, quantize(same, C, BITS)) for y in bucket.masked.values())


def test_a_server_asking_for_both_shares_of_a_member_is_refused(keys):
    names = ["h0", "h1", "h2", "h3"]
    _, pending, bucket = _start(keys, names)
    for n, request in bucket.share_requests().items():
        bucket.take_shares(n, member.share(pending[n], request, 3, BITS))
    for n, request in bucket.mask_requests().items():
        bucket.take_masked(n, torch.from_numpy(member.mask(pending[n], request).view(np.int32)))
    request = bucket.unmask_requests()["h0"]
    lying = {**request, "survivors": ["h0", "h1", "h2"], "dropped": ["h2", "h3"]}  # h2 both alive and dropped
    with pytest.raises(SecAggRefused, match="split"):
        member.unmask(copy.deepcopy(pending["h0"]), lying)
    member.unmask(pending["h0"], request)
    with pytest.raises(SecAggRefused, match="once"):  # the second ask (e.g. with h1 'dropped') is refused
        member.unmask(pending["h0"], {**request, "survivors": ["h0", "h2", "h3"], "dropped": ["h1"]})


@pytest.mark.parametrize("tamper, match", [
    (lambda r: r.update(threshold=2), "threshold"),                              # t <= s/2
    (lambda r: r.update(bucket=r["bucket"][:2]), "smaller than"),                # below min bucket
    (lambda r: r["bucket"].__setitem__(2, {**r["bucket"][2], "c_pk": r["bucket"][1]["c_pk"]}), "signed"),
    (lambda r: r.update(round=ROUND + 1), "round"),                               # replay to another round
    (lambda r: r.update(extra=1), "exactly"),
])
def test_a_hostile_server_cannot_bend_the_share_stage(keys, tamper, match):
    names = ["h0", "h1", "h2", "h3"]
    _, pending, bucket = _start(keys, names)
    request = copy.deepcopy(bucket.share_requests()["h0"])
    tamper(request)
    with pytest.raises(SecAggRefused, match=match):
        member.share(pending["h0"], request, 3, BITS)


def test_a_server_that_swaps_a_hospitals_own_keys_is_refused(keys, tmp_path):
    names = ["h0", "h1", "h2"]
    _, pending, bucket = _start(keys, names)
    forged = member.advertise(keys["h0"], RUN, ROUND, "h0", torch.zeros(D), C, BITS)[1]  # validly signed, other keys
    request = bucket.share_requests()["h0"]
    request["bucket"] = [forged if a["hospital"] == "h0" else a for a in request["bucket"]]
    with pytest.raises(SecAggRefused, match="with the keys it advertised"):
        member.share(pending["h0"], request, 3, BITS)


def test_a_hostile_hospital_spoils_at_most_its_own_bucket_within_the_clip(keys):
    _, pending, bucket = _start(keys, ["h0", "h1", "h2"])
    # h1 adds a huge value to every coordinate of its masked input
    mean, why = _run(bucket, pending, masked=lambda n, y: y + np.uint32(2**31) if n == "h1" else y)
    assert mean is None and ("no 3 honest inputs" in why or "clip" in why)


def test_bad_shares_are_caught_by_the_commitment(keys):
    _, pending, bucket = _start(keys, ["h0", "h1", "h2"])

    def forged(n, reply):  # h0 sends a made-up share of h2's self-mask seed
        if n == "h0":
            reply["b"]["h2"] = member.b64(bytes(16))
        return reply

    mean, why = _run(bucket, pending, revealed=forged)
    assert mean is None and "committed" in why


@pytest.mark.parametrize("reply", [None, {}, {"shares": {}}, {"shares": {"h1": "x", "h2": "y"}}, {"shares": {"h1": "AAAA"}}])
def test_malformed_share_replies_are_refused_with_a_reason(keys, reply):
    _, _, bucket = _start(keys, ["h0", "h1", "h2"])
    assert bucket.take_shares("h0", reply)


def test_buckets_cover_everyone_once_with_sizes_s_or_more():
    names = [f"h{i}" for i in range(10)]
    for size in (1, 2, 3, 4, 5, 6, 10, None):
        buckets = coordinator.plan_buckets(names, size, seed=7)
        assert sorted(sum(buckets, [])) == names
        assert all(len(b) >= (size or 10) for b in buckets)
        assert len(buckets) == coordinator.buckets_needed(10, size)


def test_quantisation_range_and_overflow_bound():
    u = torch.tensor([100.0, -100.0, 0.0])
    q = quantize(u, 1.0, 8)
    assert q.max() <= levels(8) and q.min() >= 0
    assert max_bucket(22) * levels(22) < 2**32 <= (max_bucket(22) + 1) * levels(22)


def test_the_mask_prg_uses_the_whole_seed():
    seed = bytearray(crypto.new_secret())
    first = crypto.mask(bytes(seed), 64)
    seed[-1] ^= 1  # Flower's PRG XOR-folds the seed to 32 bits; here every bit matters
    assert not np.array_equal(first, crypto.mask(bytes(seed), 64))


def test_a_hospital_demanding_a_higher_threshold_refuses_a_majority_one(keys):
    names = ["h0", "h1", "h2", "h3"]
    _, pending, bucket = _start(keys, names)
    majority = bucket.share_requests()["h0"]  # t = 3 of 4
    with pytest.raises(SecAggRefused, match="secagg-min-threshold=0.75"):
        member.share(copy.deepcopy(pending["h0"]), majority, 3, BITS, min_threshold=0.75)
    bucket.fraction = 0.75  # strategy.secagg.threshold=0.75: t = 4
    assert bucket.threshold == 4
    assert "shares" in member.share(pending["h0"], bucket.share_requests()["h0"], 3, BITS, min_threshold=0.75)


def test_with_pinned_peer_keys_a_member_the_server_invented_is_refused(keys, tmp_path):
    """The server adds a member whose signing key it holds (a Sybil): a hospital that pins its
    peers' keys (secagg-peer-keys) refuses the bucket; the real bucket passes."""
    names = ["h0", "h1", "h2"]
    _, pending, bucket = _start(keys, names)
    pinned = {n: keys[n].public_b64 for n in names}
    sybil_key = SigningKey.load_or_create(tmp_path / "sybil.pem")
    sybil = member.advertise(sybil_key, RUN, ROUND, "h3", torch.zeros(D), C, BITS)[1]
    request = bucket.share_requests()["h0"]
    with_sybil = {**request, "bucket": [*request["bucket"], sybil], "threshold": 3}
    with pytest.raises(SecAggRefused, match=r"\['h3'\].*secagg-peer-keys"):
        member.share(copy.deepcopy(pending["h0"]), with_sybil, 3, BITS, peer_keys=pinned)
    assert "shares" in member.share(pending["h0"], request, 3, BITS, peer_keys=pinned)


def test_peer_keys_come_from_the_hospitals_own_file(tmp_path, keys):
    from carefl.errors import ConfigError
    from carefl.site import _peer_keys

    good = tmp_path / "peers.yaml"
    good.write_text(f"h0: {keys['h0'].public_b64}\nh1: {keys['h1'].public_b64}\n")
    assert _peer_keys({"secagg-peer-keys": (str(good), "the node config")}) == {
        "h0": keys["h0"].public_b64, "h1": keys["h1"].public_b64}
    bad = tmp_path / "bad.yaml"
    bad.write_text("h0: not-a-key\n")
    with pytest.raises(ConfigError, match="secagg-peer-keys"):
        _peer_keys({"secagg-peer-keys": (str(bad), "the node config")})


def test_a_small_order_public_key_is_refused_where_it_comes_in(keys):
    """X25519's small-order points make every exchange all-zero (cryptography raises): an
    advert carrying one is refused by its check, so neither a hospital nor the server ever
    computes with it (a hostile member cannot crash the round)."""
    _, _, bucket = _start(keys, ["h0", "h1", "h2"])
    advert = dict(bucket.adverts["h1"])
    advert["s_pk"] = member.b64(bytes(32))  # the identity point
    unsigned = {k: advert[k] for k in member.ADVERT_KEYS if k != "signature"}
    advert["signature"] = keys["h1"].sign(unsigned)
    assert "not usable X25519" in member.advert_problem(advert, RUN, ROUND, D)
