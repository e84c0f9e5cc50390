"""Update compression: error bounds, bytes, error feedback, and hostile payloads refused."""

from __future__ import annotations

import math

import pytest
import torch

from carefl import compression as cp

VECTORS = {
    "random": torch.randn(1000) * 1e-2,
    "zeros": torch.zeros(300),
    "one huge": torch.cat([torch.full((1,), 1e4), torch.randn(700) * 1e-3]),
    "denormals": torch.full((257,), 1e-40),
    "single": torch.tensor([0.25]),
}


@pytest.mark.parametrize("name", VECTORS)
def test_roundtrip_error_bounds(name):
    u = VECTORS[name]
    d = len(u)
    half = cp.decode(cp.encode(u, "float16")[0], "float16", d)
    normal = u.abs() >= 2**-14  # float16's normal range; below it the absolute error is <= 2^-25
    assert (((half - u).abs() <= 2**-11 * u.abs()) | ~normal).all() and ((half - u).abs()[~normal] <= 2**-24).all()
    payload, _ = cp.encode(u, "int8", block=64)
    scale = payload["scale"].repeat_interleave(64)[:d]
    assert ((cp.decode(payload, "int8", d, block=64) - u).abs() <= scale / 2 + 1e-30).all()
    sent, residual = cp.encode(u, "topk", fraction=0.1)
    assert torch.allclose(cp.decode(sent, "topk", d) + residual, u)  # what is not sent is kept


def test_wire_bytes_ratios():
    u = torch.randn(256 * 100)
    dense = 4 * len(u)
    assert dense / cp.wire_bytes(cp.encode(u, "float16")[0]) == 2
    assert dense / cp.wire_bytes(cp.encode(u, "int8")[0]) == pytest.approx(4 * 256 / (256 + 4))
    assert dense / cp.wire_bytes(cp.encode(u, "topk", fraction=0.01)[0]) == pytest.approx(1 / (2 * 0.01), rel=0.01)


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
    with pytest.raises(ValueError, match="float16"):
        cp.encode(torch.tensor([1e6]), "float16")


def _declared(payload):
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in payload.items()}


@pytest.mark.parametrize("method, tamper, needle", [
    ("float16", lambda p: p.pop("values"), "exactly"),
    ("float16", lambda p: p.update(extra=torch.zeros(1)), "exactly"),
    ("float16", lambda p: p.update(values=p["values"].float()), "declared"),
    ("int8", lambda p: p.update(scale=p["scale"][:-1]), "declared"),
    ("topk", lambda p: p.update(index=p["index"][:-1], values=p["values"][:-1]), "declared"),
])
def test_declared_payloads_that_break_the_layout_are_refused(method, tamper, needle):
    payload, _ = cp.encode(torch.randn(1000), method, fraction=0.01)
    tamper(payload)
    assert needle in cp.declared_problem(_declared(payload), method, 1000, 256, 0.01)


@pytest.mark.parametrize("method, tamper, needle", [
    ("topk", lambda p: p["index"].__setitem__(0, -1), "outside"),
    ("topk", lambda p: p["index"].__setitem__(-1, 1000), "outside"),
    ("topk", lambda p: p["index"].__setitem__(1, p["index"][0]), "increasing"),
    ("topk", lambda p: p.update(index=p["index"].flip(0)), "increasing"),
    ("topk", lambda p: p["values"].__setitem__(0, math.nan), "non-finite"),
    ("float16", lambda p: p["values"].__setitem__(3, math.inf), "non-finite"),
    ("int8", lambda p: p["scale"].__setitem__(0, -1.0), "negative"),
    ("int8", lambda p: p["scale"].__setitem__(0, math.nan), "non-finite"),
])
def test_loaded_payloads_that_cannot_decode_safely_are_refused(method, tamper, needle):
    payload, _ = cp.encode(torch.randn(1000), method, fraction=0.01)
    tamper(payload)
    assert cp.declared_problem(_declared(payload), method, 1000, 256, 0.01) is None
    assert needle in cp.loaded_problem(payload, method, 1000)


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
