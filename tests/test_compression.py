"""Update compression: error bounds, bytes, error feedback, and hostile payloads refused."""

from __future__ import annotations

import math

import pytest
import torch

from carefl import compression as cp

VECTORS = {
    "random": torch.randn(1000) * 1e-2,  # d = 1000: not a multiple of any block below
    "zeros": torch.zeros(300),
    "one huge": torch.cat([torch.full((1,), 1e4), torch.randn(700) * 1e-3]),
    "denormals": torch.full((257,), 1e-40),
    "deep denormals": torch.tensor([1e-44, -3e-45, 1.4e-45, 0.0]),  # max / 127 is below float32's smallest step
    "near float32 max": torch.tensor([3e38, -1e38, 1.0]),
    "single": torch.tensor([0.25]),
}


@pytest.mark.parametrize("name", VECTORS)
@pytest.mark.parametrize("block", [16, 64, 256])
def test_roundtrip_error_bounds(name, block):
    u = VECTORS[name]
    d = len(u)
    if u.abs().max() <= cp.FLOAT16_MAX:
        half = cp.decode(cp.encode(u, "float16")[0], "float16", d)
        normal = u.abs() >= 2**-14  # float16's normal range; below it the absolute error is <= 2^-25
        assert ((half - u).abs()[normal] <= 2**-11 * u.abs()[normal]).all()
        assert ((half - u).abs()[~normal] <= 2**-25).all()
    payload, _ = cp.encode(u, "int8", block=block)
    assert cp.loaded_problem(payload, "int8", d) is None
    scale = payload["scale"].repeat_interleave(block)[:d]
    # scale / 2 = max|block| / 254, plus float32 rounding of u / scale and q * scale
    assert ((cp.decode(payload, "int8", d, block=block) - u).abs() <= scale / 2 + 2**-23 * u.abs()).all()
    assert (scale <= u.abs().max() / 127 * (1 + 2**-22) + 2**-149).all()  # rounded up at most one step
    sent, residual = cp.encode(u, "topk", fraction=0.1)
    assert cp.loaded_problem(sent, "topk", d) is None
    assert torch.equal(cp.decode(sent, "topk", d) + residual, u)  # what is not sent is kept, exactly


@pytest.mark.parametrize("d", [256 * 100, 256 * 100 + 1])  # the second: a last block of one entry
def test_wire_bytes_ratios(d):
    u = torch.randn(d)
    dense = 4 * d
    assert dense / cp.wire_bytes(cp.encode(u, "float16")[0]) == 2
    assert dense / cp.wire_bytes(cp.encode(u, "int8")[0]) == pytest.approx(4 * 256 / (256 + 4), rel=1e-3)  # 3.94
    assert dense / cp.wire_bytes(cp.encode(u, "int8", block=64)[0]) == pytest.approx(4 * 64 / (64 + 4), rel=1e-3)
    for fraction in (0.01, 0.1):  # 50x, 5x
        sent = cp.wire_bytes(cp.encode(u, "topk", fraction=fraction)[0])
        assert dense / sent == pytest.approx(1 / (2 * fraction), rel=1e-2)  # k rounds up


def test_error_feedback_loses_nothing_over_rounds():
    gen = torch.Generator().manual_seed(0)
    residual, sent_total, true_total = None, torch.zeros(500), torch.zeros(500)
    for _ in range(20):
        u = torch.randn(500, generator=gen)
        payload, residual = cp.encode(u, "topk", fraction=0.05, residual=residual)
        sent_total += cp.decode(payload, "topk", 500)
        true_total += u
    assert torch.allclose(sent_total, true_total - residual, atol=1e-4)


def test_float16_refuses_what_would_overflow():
    with pytest.raises(ValueError, match="compression=int8 or none"):
        cp.encode(torch.tensor([1e6]), "float16")


@pytest.mark.parametrize("method", ["float16", "int8", "topk"])
def test_a_non_finite_update_reaches_the_server_check_and_leaves_no_nan_behind(method):
    """A diverged hospital's update is encoded as it is (the server refuses it, as it refuses
    an uncompressed one); top-k's residual stays finite, so the next round is not spoiled."""
    u = torch.randn(1000)
    u[7], u[8] = math.nan, math.inf
    payload, residual = cp.encode(u, method, fraction=0.01)
    assert "non-finite" in cp.loaded_problem(payload, method, 1000)
    if method == "topk":
        assert torch.equal(residual, torch.zeros(1000))
        previous = torch.randn(1000)
        assert torch.equal(cp.encode(u, "topk", fraction=0.01, residual=previous)[1], previous)


def test_k_is_the_decimal_fraction_of_d():
    assert cp.top_k(100, 0.07) == 7  # float: 0.07 * 100 = 7.000000000000001
    assert cp.top_k(30, 0.1) == 3 and cp.top_k(1000, 0.01) == 10 and cp.top_k(1001, 0.01) == 11
    assert cp.top_k(5, 0.0) == 1 and cp.top_k(5, 1.0) == 5 and cp.top_k(1, 0.5) == 1


def test_unknown_method_is_a_value_error():
    for call in (lambda: cp.encode(torch.zeros(3), "none"), lambda: cp.decode({}, "none", 3),
                 lambda: cp.layout("gzip", 3, 256, 0.1)):
        with pytest.raises(ValueError, match="choose one of"):
            call()


def _declared(payload):
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in payload.items()}


@pytest.mark.parametrize("method, tamper, needle", [
    ("float16", lambda p: p.pop("values"), "exactly"),
    ("float16", lambda p: p.update(extra=torch.zeros(1)), "exactly"),
    ("float16", lambda p: p.update(values=p["values"].float()), "declared"),
    ("int8", lambda p: p.update(scale=p["scale"][:-1]), "declared"),
    ("topk", lambda p: p.update(index=p["index"][:-1], values=p["values"][:-1]), "declared"),  # k - 1
    ("topk", lambda p: p.update(index=torch.arange(11, dtype=torch.int32), values=torch.zeros(11)), "declared"),
    ("topk", lambda p: p.update(index=p["index"].long()), "declared"),  # int64 indices
    ("topk", lambda p: p.update(values=p["values"].half()), "declared"),
    ("int8", lambda p: p.update(q=p["q"].to(torch.int16)), "declared"),
    ("int8", lambda p: p.update(q=p["q"].to(torch.uint8)), "declared"),
    ("int8", lambda p: p.update(scale=p["scale"].double()), "declared"),
    ("int8", lambda p: p.update(q=p["q"][:-1]), "declared"),
    ("int8", lambda p: p.update(q=p["q"].view(10, 100)), "declared"),
    ("int8", lambda p: p.pop("scale"), "exactly"),
    ("float16", lambda p: p.update(values=p["values"][:999]), "declared"),
])
def test_declared_payloads_that_break_the_layout_are_refused(method, tamper, needle):
    payload, _ = cp.encode(torch.randn(1000), method, fraction=0.01)
    tamper(payload)
    assert needle in cp.declared_problem(_declared(payload), method, 1000, 256, 0.01)


@pytest.mark.parametrize("entry", [("float16",), ("float16", 1000), 3, None, ("float16", (1000,), "x"), "float16"])
def test_a_malformed_declaration_is_a_reason_not_an_exception(entry):
    assert "declared" in cp.declared_problem({"values": entry}, "float16", 1000, 256, 0.01)


@pytest.mark.parametrize("method, tamper, needle", [
    ("topk", lambda p: p["index"].__setitem__(0, -1), "outside"),
    ("topk", lambda p: p["index"].__setitem__(-1, 1000), "outside"),
    ("topk", lambda p: p["index"].__setitem__(1, p["index"][0]), "increasing"),
    ("topk", lambda p: p.update(index=p["index"].flip(0)), "increasing"),
    ("topk", lambda p: p["values"].__setitem__(0, math.nan), "non-finite"),
    ("float16", lambda p: p["values"].__setitem__(3, math.inf), "non-finite"),
    ("int8", lambda p: p["scale"].__setitem__(0, -1.0), "negative"),
    ("int8", lambda p: p["scale"].__setitem__(0, math.nan), "non-finite"),
    ("int8", lambda p: p["scale"].__setitem__(1, math.inf), "non-finite"),
    ("int8", lambda p: p["scale"].__setitem__(0, 3e38), "inf"),  # finite, but q * scale is not
    ("topk", lambda p: p["values"].__setitem__(2, -math.inf), "non-finite"),
])
def test_loaded_payloads_that_cannot_decode_safely_are_refused(method, tamper, needle):
    payload, _ = cp.encode(torch.randn(1000), method, fraction=0.01)
    tamper(payload)
    assert cp.declared_problem(_declared(payload), method, 1000, 256, 0.01) is None
    assert needle in cp.loaded_problem(payload, method, 1000)


def test_the_largest_safe_scale_decodes_finite():
    payload = {"q": torch.tensor([-128, 127], dtype=torch.int8), "scale": torch.tensor([cp.INT8_MAX_SCALE])}
    assert cp.loaded_problem(payload, "int8", 2) is None
    assert torch.isfinite(cp.decode(payload, "int8", 2, block=256)).all()


def test_a_compressed_federation_sends_fewer_bytes_and_a_hostile_payload_is_left_out(tmp_path):
    """topk end to end (in-process transport, real hospitals): every hospital's reply is ~50x
    smaller than the model, its error feedback stays in its state dir, and a hospital whose
    payload points outside the model is left out with the reason, nothing written out of range."""
    import json

    from carefl.config import compose_config
    from carefl.errors import ConfigError
    from carefl.local_transport import LocalTransport
    from carefl.rounds import run_federation
    from conftest import TINY

    def hostile(node, kind, raw):
        if kind == "train" and node == 1 and raw.arrays:
            view = raw.arrays["index"]
            raw.arrays = {**raw.arrays, "index": type(view)(view.dtype, view.shape, view.nbytes,
                                                             lambda: torch.full(view.shape, 10**9, dtype=torch.int32))}
        return raw

    cfg = compose_config([*TINY.split(), "federation.rounds=2", "privacy=none", "compression=topk",
                          "compression.fraction=0.02", f"output_dir={tmp_path}"])
    run_dir = run_federation(LocalTransport(3, tamper=hostile), cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    model = sum(v.numel() * 4 for v in torch.load(run_dir / "model_final.pt", weights_only=True).values())
    for round_ in metrics["rounds"]:
        assert round_["train"]["st-mary"]["status"] == "invalid" and "outside" in round_["train"]["st-mary"]["reason"]
        for hospital in ("riverside", "northfield"):
            assert round_["train"][hospital]["status"] == "ok"
            assert round_["wire"][hospital]["bytes_received"] < model / 10
    feedback = list((run_dir / "hospitals" / "riverside" / "compression").glob("*.pt"))
    assert len(feedback) == 1 and torch.load(feedback[0], weights_only=True).abs().sum() > 0
    with pytest.raises(ConfigError, match="cannot be used with secagg=on"):
        compose_config(["compression=int8", "secagg=on"])
