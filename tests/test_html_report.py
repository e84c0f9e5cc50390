"""report.html: one self-contained page with the run's identity, results, plots, events and audit;
rendered in a real headless browser (Debian's chromium) when one is installed."""

import html.parser
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from carefl.config import compose_config
from carefl.report import Report


class _Page(html.parser.HTMLParser):
    """Collects tags, attributes and text; fails on nothing (browsers do not either)."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.sources = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sources += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def _report(tmp_path: Path) -> Path:
    cfg = compose_config(["strategy=robust", "federation.hospitals=[st-mary,riverside,northfield,a,b]"])
    report = Report(tmp_path, cfg)
    report.add_round(1, [], {}, {})
    record = report._round(1)
    record["train"] = {
        "st-mary": {"status": "ok", "reason": None, "num_examples": 120.0, "epsilon": 2.5, "delta": 1e-5},
        "riverside": {"status": "refused", "reason": "privacy budget: this round would bring epsilon to 9.1 > cap 6",
                      "num_examples": 0.0},
        "northfield": {"status": "rejected", "reason": "update norm 900 > bound 50", "num_examples": 80.0},
    }
    report.add_evaluation(1, {"st-mary": {"dice": 0.81, "dice_ci_low": 0.74, "dice_ci_high": 0.86, "num_examples": 20.0,
                                          "trivial_dice": 0.3, "personal_dice": 0.84}})
    report.add_baselines({"local_only": {"st-mary": {"st-mary": {"dice": 0.79}}}, "pooled": {}})
    report.finish("completed")
    return report.write_html({"entries": 3, "head": "ab" * 32}, "cd" * 32)


def test_the_page_is_self_contained_and_says_what_happened(tmp_path):
    path = _report(tmp_path)
    page = _Page()
    page.feed(path.read_text())
    text = " ".join(page.text)
    assert {"html", "table", "img", "figure"} <= set(page.tags) and "script" not in page.tags
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)  # nothing fetched
    for fragment in ("robust: arc -> nnm -> trimmed_mean", "DP-SGD (Opacus), target epsilon 8.0",
                     "0.810 [0.74, 0.86]", "personalized (final, own site)", "gain +0.050",
                     "privacy budget: this round would bring epsilon to 9.1 > cap 6", "update norm 900 > bound 50",
                     "Dice of the global model on each hospital's own test split", "cd" * 32, "carefl-verify"):
        assert fragment in text, fragment
    assert "120" in text and "2.500" in text  # st-mary's records and epsilon in the identity table


def test_a_real_browser_renders_the_page(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium; .ci/run does)")
    path = _report(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1800", path.as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1800)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, tables and plots were drawn, not a blank page
