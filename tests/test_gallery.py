"""The explanation gallery of report.html (issue 15, point 4): computed at each hospital on its own
test split, sent only where its site policy says share-gallery: true, and accepted by the server
only as a few small, checked PNGs."""

from __future__ import annotations

import base64
import json
import re

import pytest

from carefl.replies import MAX_GALLERY_IMAGES, MAX_GALLERY_PNG_BYTES, RawReply, check_eval_reply

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d4944415478da63f8ffff3f0005fe02fe0def46b8000000"
                    "0049454e44ae426082")  # a real 1x1 PNG


def _eval(gallery) -> tuple:
    status = {"hospital": "a", "status": "ok", "reason": ""}
    if gallery is not None:
        status["gallery"] = gallery if isinstance(gallery, str) else json.dumps(gallery)
    raw = RawReply(1, status=status, metrics={"dice": 0.5, "num_examples": 4.0})
    return check_eval_reply(raw, {1: "a"}, ("dice",))


def test_a_gallery_is_accepted_only_as_a_few_small_pngs():
    name, checked = _eval([base64.b64encode(PNG).decode()] * 2)
    assert name == "a" and checked == {"dice": 0.5, "num_examples": 4.0} and checked.gallery == (PNG, PNG)
    assert _eval(None)[1].gallery == () and _eval("")[1].gallery == ()
    jpeg = b"\xff\xd8\xff\xe0" + PNG[4:]
    wide = PNG[:16] + (100_000).to_bytes(4, "big") + PNG[20:]
    big = PNG[:-12] + b"\0" * MAX_GALLERY_PNG_BYTES + PNG[-12:]
    bad = {
        "not JSON": "[",
        "not a list": json.dumps({"a": 1}),
        "too many": [base64.b64encode(PNG).decode()] * (MAX_GALLERY_IMAGES + 1),
        "not base64": ["%%%"],
        "not a PNG": [base64.b64encode(jpeg).decode()],
        "too wide": [base64.b64encode(wide).decode()],
        "too large": [base64.b64encode(big).decode()],
        "not text": [[1, 2]],
        "deep": "[" * 10_000,
    }
    for why, gallery in bad.items():
        name, result = _eval(gallery)
        assert name == "a" and isinstance(result, str) and "gallery" in result, (why, result)


def test_report_shows_the_gallery_of_the_hospital_that_shares_it_and_says_who_kept_it(tmp_path):
    """End to end through the in-process federation: st-mary's policy shares its gallery, the
    others' does not set the key; what each node actually sends is recorded on the way."""
    from carefl.config import compose_config
    from carefl.hospital import GALLERY_DIR
    from carefl.local_transport import LocalTransport
    from carefl.rounds import run_federation
    from conftest import TINY

    sent: dict[str, list] = {}

    def record(node, kind, raw):
        if kind == "evaluate":
            sent.setdefault(raw.status["hospital"], []).append(raw)
        return raw

    cfg = compose_config([*TINY.split(), "federation.rounds=2", "privacy=none", f"output_dir={tmp_path}",
                          "+federation.site_policies={st-mary:{share-gallery:true}}",
                          "model.channels=[4,8,16]"])
    run_dir = run_federation(LocalTransport(3, tamper=record), cfg)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    # only the last round's evaluation of the sharing hospital carries images; the others never do
    assert [("gallery" in raw.status) for raw in sent["st-mary"]] == [False, True]
    for h in ("riverside", "northfield"):
        assert all("gallery" not in raw.status and not raw.arrays for raw in sent[h])
        assert len(list((run_dir / "hospitals" / h / GALLERY_DIR).glob("*/*.png"))) == 3  # kept at home
        assert not (run_dir / "gallery" / h).exists()
    assert len(list((run_dir / "gallery" / "st-mary").glob("*.png"))) == 3
    page = (run_dir / "report.html").read_text()
    shown = re.findall(r'<img alt="gallery st-mary \d" src="data:image/png;base64,([^"]+)"', page)
    assert len(shown) == 3 and all(base64.b64decode(s).startswith(b"\x89PNG") for s in shown)
    assert "riverside kept its gallery local" in page and "northfield kept its gallery local" in page
    assert "gallery riverside" not in page


@pytest.mark.parametrize("value", ["true", "yes"])
def test_share_gallery_is_the_hospitals_own_flag(value, tmp_path):
    from carefl.config import compose_config
    from carefl.errors import ConfigError
    from carefl.request import build_request, parse_request
    from carefl.site import read_policy

    request = parse_request(build_request(compose_config([]), 1, "ab" * 32, None, None), simulated=False)
    node = {"hospital": "st-mary", "data-path": "synthetic:0", "state-dir": str(tmp_path), "epsilon-cap": "8",
            "delta": "1e-6"}
    assert read_policy(node, request).share_gallery is False  # the default: no image leaves
    if value == "true":
        assert read_policy({**node, "share-gallery": value}, request).share_gallery is True
    else:
        with pytest.raises(ConfigError, match="share-gallery"):
            read_policy({**node, "share-gallery": value}, request)


def test_a_gallery_that_cannot_be_drawn_does_not_cost_the_evaluation(tmp_path, monkeypatch):
    from carefl import hospital
    from carefl.config import compose_config
    from carefl.models import build_model
    from carefl.request import build_request

    def broken(*args):
        raise ValueError("no convolution for GradCAM")

    monkeypatch.setattr(hospital, "explanation_gallery", broken)
    cfg = compose_config(["data.n_train=8", "data.n_test=4", "data.image_size=16", "federation.rounds=1"])
    node = {"hospital": "st-mary", "data-path": "synthetic:0", "state-dir": str(tmp_path), "epsilon-cap": "8",
            "delta": "1e-5", "share-gallery": "true"}
    reply = hospital.handle(hospital.EVALUATE, build_request(cfg, 1, "ab" * 32, None, None),
                            build_model(cfg).state_dict(), node)
    assert reply.status == "ok" and "dice" in reply.metrics and reply.gallery is None
    assert "gallery" not in reply.status_record()
