"""The HTML report: self-contained, and every plot carries data (parsed, and rendered in Chromium)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from portable_moe.conformance.model_check import check_bundle, input_sets_for, report_dict
from portable_moe.conformance.report_html import render_html, write_html

CHROMIUM_MISSING = "chromium not installed (apt-get install chromium)"


class _Plots(HTMLParser):
    """Collects each <svg class="plot"> with the data-value of its bars, and any external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: dict[str, list[float]] = {}
        self.external: list[str] = []
        self._current: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "svg" and attributes.get("class") == "plot":
            self._current = attributes["data-plot"]
            self.plots[self._current] = []
        elif tag == "rect" and attributes.get("class") == "bar" and self._current:
            self.plots[self._current].append(float(attributes["data-value"]))
        if tag == "script" or any(name in ("src", "href") and value and "://" in value for name, value in attrs):
            self.external.append(f"{tag} {attributes}")

    def handle_endtag(self, tag):
        if tag == "svg":
            self._current = None


@pytest.fixture(scope="module")
def report(tiny_bundle):
    source, sets = input_sets_for(tiny_bundle, "random:2")
    results = check_bundle(tiny_bundle, ["cpu", "npu-sim"], {"npu-sim": {"precision": "force_fp16"}}, input_sets=sets)
    return report_dict(tiny_bundle, results, source)


def _expected_plots(report) -> set[str]:
    plots = {"routing-agreement"}
    for result in report["results"]:
        plots |= {f"error-{result['backend']}-{output}" for output in result["error_histograms"]}
        plots |= {f"load-{result['backend']}-layer{layer['layer']}" for layer in result["routing"]}
    return plots


def test_every_plot_has_data_and_nothing_is_fetched(report):
    parser = _Plots()
    parser.feed(render_html(report))
    assert set(parser.plots) == _expected_plots(report)
    assert len(parser.plots) == 1 + 2 * 1 + 2 * 2  # agreement; logits per backend; 2 layers per backend
    for name, values in parser.plots.items():
        assert values and any(value > 0 for value in values), name
    # 2 backends x 2 layers of agreement, in [0, 1]; the npu-sim float16 flips show as < 1.
    agreement = parser.plots["routing-agreement"]
    assert len(agreement) == 4 and all(0 <= value <= 1 for value in agreement) and min(agreement) < 1
    assert parser.external == []


def test_text_is_escaped():
    page = render_html({"bundle_name": "<b>x</b>", "results": []})
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(CHROMIUM_MISSING)
    path = tmp_path / "report.html"
    write_html(report, path)
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    parser = _Plots()
    parser.feed(dom)
    assert set(parser.plots) == _expected_plots(report)
    assert all(parser.plots.values())


def test_generation_steps_are_plotted_per_backend():
    """``check --generate``'s per-step logit error and routing agreement become two plots, one bar per step."""
    checks = [
        {
            "backend": name,
            "status": "passed",
            "reason": "",
            "steps": 3,
            "token_agreement": 1.0,
            "first_divergence": None,
            "logit_error_per_step": errors,
            "routing_agreement_per_step": routing,
        }
        for name, errors, routing in [
            ("cpu", [1e-7, 2e-7, 3e-7], [1.0, 1.0, 1.0]),
            ("npu-sim", [1e-3, 4e-3, 2e-3], [1.0, 0.5, 1.0]),
        ]
    ]
    parser = _Plots()
    parser.feed(render_html({"results": [], "generation": checks}))
    assert parser.external == []
    assert parser.plots["generation-logit-error"] == pytest.approx([1e-7, 1e-3, 2e-7, 4e-3, 3e-7, 2e-3])
    assert parser.plots["generation-routing-agreement"] == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
