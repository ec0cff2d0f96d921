"""Conformance reports as self-contained HTML files (the model check with inline SVG plots, the op suite).

No JavaScript, no stylesheet or font from the network: the file opens the same offline. It is
rendered from the JSON report (:func:`portable_moe.conformance.model_check.report_dict`), so a saved JSON
report can be turned into HTML later. Plots: routing agreement per layer per backend, the
distribution of log10 absolute error per backend and output, the expert load per backend and layer,
and with ``check --generate`` the logit error and routing agreement per generation step.
Every plot is an ``<svg class="plot">`` whose bars carry their value in ``data-value``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_WIDTH, _HEIGHT, _MARGIN = 520, 180, 36
_COLOURS = ("#3b6fb6", "#d9822b", "#3a9d5d", "#b63b5f", "#7a5bb6", "#8c8c8c")
_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
.passed { color: #2a7d3f; } .failed, .error, .timeout, .unexpected-pass { color: #b3261e; }
.unavailable, .skipped, .unsupported, .expected-failure { color: #9a6b00; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }
figcaption { font-size: 0.9em; margin-bottom: 0.3em; }
svg.plot { background: #fafafa; border: 1px solid #ddd; }
"""


def _bar_chart(
    plot_id: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], y_max: float | None = None
) -> str:
    """Grouped bars: one group per label, one bar per series. Returns an inline SVG element."""
    names = list(series)
    values = [float(v) for values in series.values() for v in values]
    top = y_max if y_max is not None else max(values, default=0.0) or 1.0
    groups = max(len(labels), 1)
    group_width = (_WIDTH - 2 * _MARGIN) / groups
    bar_width = max(group_width * 0.8 / max(len(names), 1), 1.0)
    plot_height = _HEIGHT - 2 * _MARGIN
    parts = [
        f'<svg class="plot" data-plot="{html.escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}">',
        f'<line x1="{_MARGIN}" y1="{_HEIGHT - _MARGIN}" x2="{_WIDTH - _MARGIN}" y2="{_HEIGHT - _MARGIN}" stroke="#444"/>',
        f'<text x="2" y="{_MARGIN}" font-size="10">{top:.3g}</text>',
        f'<text x="2" y="{_HEIGHT - _MARGIN}" font-size="10">0</text>',
    ]
    for group, label in enumerate(labels):
        x0 = _MARGIN + group * group_width + group_width * 0.1
        for position, name in enumerate(names):
            value = float(series[name][group])
            height = plot_height * min(max(value / top, 0.0), 1.0)
            x = x0 + position * bar_width
            parts.append(
                f'<rect class="bar" data-series="{html.escape(name)}" data-label="{html.escape(label)}" '
                f'data-value="{value:.6g}" x="{x:.1f}" y="{_HEIGHT - _MARGIN - height:.1f}" '
                f'width="{bar_width * 0.95:.1f}" height="{height:.1f}" fill="{_COLOURS[position % len(_COLOURS)]}">'
                f"<title>{html.escape(name)} {html.escape(label)}: {value:.6g}</title></rect>"
            )
        if groups <= 24 or group % max(groups // 12, 1) == 0:
            parts.append(f'<text x="{x0:.1f}" y="{_HEIGHT - _MARGIN + 12}" font-size="9">{html.escape(label)}</text>')
    for position, name in enumerate(names):
        parts.append(
            f'<text x="{_MARGIN + position * 120}" y="14" font-size="11" '
            f'fill="{_COLOURS[position % len(_COLOURS)]}">■ {html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{html.escape(caption)}</figcaption>{svg}</figure>"


def _routing_plot(results: Sequence[Mapping[str, Any]]) -> str:
    layers = sorted({layer["layer"] for result in results for layer in result.get("routing", [])})
    series = {
        result["backend"]: [
            next((layer["agreement"] for layer in result["routing"] if layer["layer"] == number), 0.0)
            for number in layers
        ]
        for result in results
        if result.get("routing")
    }
    if not series:
        return ""
    svg = _bar_chart("routing-agreement", [f"layer {number}" for number in layers], series, y_max=1.0)
    return _figure("Routing agreement per MoE layer (1.0 = every token's expert set matches)", svg)


def _error_plots(results: Sequence[Mapping[str, Any]]) -> list[str]:
    figures = []
    for result in results:
        for output, histogram in result.get("error_histograms", {}).items():
            edges = histogram["log10_edges"]
            labels = [f"{edges[i]:g}" for i in range(len(edges) - 1)]
            svg = _bar_chart(f"error-{result['backend']}-{output}", labels, {result["backend"]: histogram["counts"]})
            figures.append(
                _figure(f"{result['backend']}: {output}, elements by log10(abs error) (first bin: <= 1e-10)", svg)
            )
    return figures


def _load_plots(results: Sequence[Mapping[str, Any]]) -> list[str]:
    figures = []
    for result in results:
        for layer in result.get("routing", []):
            load = layer["expert_load"]
            series = {result["backend"]: load, "expected": layer["expected_expert_load"]}
            svg = _bar_chart(
                f"load-{result['backend']}-layer{layer['layer']}", [str(i) for i in range(len(load))], series
            )
            figures.append(
                _figure(f"{result['backend']}: expert load, layer {layer['layer']} (selections per expert)", svg)
            )
    return figures


def _summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    on_nodes = any("node" in result for result in results)  # a cluster run: say where each result ran
    node_header = "<th>node</th>" if on_nodes else ""
    rows = [
        f"<table><tr><th>backend</th>{node_header}<th>result</th><th>routing</th><th>bisection</th><th>note</th></tr>"
    ]
    for result in results:
        routing = "; ".join(
            f"layer {layer['layer']}: {layer['agreement']:.2%}" + (f" ({layer['verdict']})" if layer["verdict"] else "")
            for layer in result.get("routing", [])
        )
        bisection = result.get("bisection") or {}
        first = bisection.get("first_divergence")
        bisect_text = (
            f"{'largest deviation from' if result['status'] == 'passed' else 'first divergence:'} "
            f"{first['node']} ({first['op_type']})"
            if first
            else bisection.get("error") or ("within tolerance" if bisection else "")
        )
        status = html.escape(result["status"])
        rows.append(
            f"<tr><td>{html.escape(result['backend'])}</td>"
            + (f"<td>{html.escape(result.get('node') or 'did not finish')}</td>" if on_nodes else "")
            + f'<td class="{status}">{status}</td>'
            f"<td>{html.escape(routing)}</td><td>{html.escape(bisect_text)}</td>"
            f"<td>{html.escape(result.get('reason', ''))}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _skew_section(cluster: Mapping[str, Any]) -> list[str]:
    """Runtime versions that differ between the nodes of a cluster run that ran the same backend."""
    skew = cluster.get("version_skew") or {}
    items = [
        f"<li>{html.escape(backend)}: {html.escape(package)}: "
        + html.escape("; ".join(f"{version} on {', '.join(nodes)}" for version, nodes in seen.items()))
        + "</li>"
        for backend, packages in skew.items()
        for package, seen in packages.items()
    ]
    return ["<h2>Version skew between nodes</h2>", f"<ul>{''.join(items)}</ul>"] if items else []


def _generation_section(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """``check --generate``: a table per backend, then logit error and routing agreement per step."""
    if not checks:
        return []
    rows = "".join(
        f"<tr><td>{html.escape(check['backend'])}</td>"
        f'<td class="{html.escape(check["status"])}">{html.escape(check["status"])}</td>'
        f"<td>{check['steps']}</td><td>{check['token_agreement']:.0%}</td>"
        f"<td>{'-' if check['first_divergence'] is None else check['first_divergence']}</td>"
        f"<td>{html.escape(check.get('reason', ''))}</td></tr>"
        for check in checks
    )
    table = (
        "<table><tr><th>backend</th><th>status</th><th>steps</th><th>tokens agree</th><th>first divergence</th>"
        f"<th>reason</th></tr>{rows}</table>"
    )
    plotted = [check for check in checks if check.get("logit_error_per_step")]
    if not plotted:
        return ["<h2>Generation (greedy, teacher-forced)</h2>", table]
    steps = [str(step) for step in range(max(len(check["logit_error_per_step"]) for check in plotted))]

    def per_step(key: str) -> dict[str, list[float]]:
        return {check["backend"]: [*check[key], *[0.0] * (len(steps) - len(check[key]))] for check in plotted}

    errors = _figure(
        "Logit error per step (largest error relative to the golden logits' largest magnitude)",
        _bar_chart("generation-logit-error", steps, per_step("logit_error_per_step")),
    )
    routing = _figure(
        "Routing agreement per step (share of the golden experts chosen, averaged over MoE layers)",
        _bar_chart("generation-routing-agreement", steps, per_step("routing_agreement_per_step"), y_max=1.0),
    )
    return ["<h2>Generation (greedy, teacher-forced)</h2>", table, errors, routing]


def render_html(report: Mapping[str, Any]) -> str:
    """The report as a self-contained HTML page.

    Args:
        report: a JSON report as :func:`portable_moe.conformance.model_check.report_dict` makes it.
    """
    results = report.get("results", [])
    title = f"Conformance of {report.get('bundle_name', report.get('bundle', '?'))}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>preset {html.escape(str(report.get('preset')))}, {html.escape(str(report.get('moe_lowering')))} "
        f"lowering; expected outputs from {html.escape(str(report.get('expected_from')))}; "
        f"report schema {html.escape(str(report.get('schema_version')))}</p>",
        _summary_table(results),
        *_skew_section(report.get("cluster") or {}),
    ]
    routing = _routing_plot(results)
    if routing:
        sections += ["<h2>Routing agreement</h2>", routing]
    errors = _error_plots(results)
    if errors:
        sections += ["<h2>Error distribution</h2>", *errors]
    loads = _load_plots(results)
    if loads:
        sections += ["<h2>Expert load</h2>", *loads]
    sections += _generation_section(report.get("generation") or [])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`render_html` of ``report`` to ``path``."""
    Path(path).write_text(render_html(report), encoding="utf-8")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], status_column: int | None = None) -> str:
    """An HTML table; the cell in ``status_column`` gets its value as CSS class (colour by status)."""
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(str(name))}</th>" for name in header) + "</tr>"]
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            text = html.escape(str(value))
            css = f' class="{text}"' if index == status_column else ""
            cells.append(f"<td{css}>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


def _rate(value: Any) -> str:
    return "-" if not isinstance(value, float) or value != value else f"{value:.1%}"


def render_opsuite_html(report: Mapping[str, Any]) -> str:
    """The op suite's JSON report (:func:`portable_moe.conformance.ops.report_dict`) as a self-contained HTML page.

    Sections: the summary per backend with both pass rates and what each divides by; every case
    that passed only because of a tolerance override, with its raw error and the case's own
    tolerance; every case that did not pass, with its status, code and reason.
    """
    backends = report.get("backends", {})
    results = report.get("results", [])
    statuses = ("passed", "failed", "error", "timeout", "unsupported", "expected-failure", "unexpected-pass")
    title = f"ONNX op suite (onnx {report.get('onnx_version', '?')})"
    summary_rows = [
        [name, *(summary.get(status, 0) for status in statuses), summary.get("total", 0)]
        + [_rate(summary.get("pass_rate_all")), _rate(summary.get("pass_rate_supported"))]
        for name, summary in backends.items()
    ]
    denominators = report.get("denominators", {})
    overridden = [r for r in results if r.get("tolerance_override")]
    override_rows = [
        [
            r["backend"],
            r["case"],
            r["tolerance_override"]["output"],
            f"{r['tolerance_override']['max_abs_error']:.3g}",
            f"{r['tolerance_override']['max_rel_error']:.3g}",
            f"rtol {r['tolerance_override']['case_rtol']:g}, atol {r['tolerance_override']['case_atol']:g}",
            f"rtol {r['tolerance_override']['rtol']:g}, atol {r['tolerance_override']['atol']:g}",
            r["tolerance_override"]["reason"],
        ]
        for r in overridden
    ]
    not_passed = [
        [r["backend"], r["case"], r["op"], r["status"], r.get("code", ""), r["reason"]]
        for r in results
        if r["status"] != "passed"
    ]
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(str(report.get('command', '')))}; onnxruntime {html.escape(str(report.get('onnxruntime_version')))}, "
        f"{html.escape(str(report.get('machine', '')))}</p>",
        _table(["backend", *statuses, "total", "pass rate (all)", "pass rate (supported)"], summary_rows),
        "<p>" + "<br>".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in denominators.items()) + "</p>",
        f"<h2>Passed only because of a tolerance override ({len(override_rows)})</h2>",
        "<p>Each would fail with the case's own tolerance; the error shown is the raw one.</p>",
        _table(
            ["backend", "case", "output", "max abs error", "max rel error", "case's tolerance", "override", "why"],
            override_rows,
        ),
        f"<h2>Cases not passed ({len(not_passed)})</h2>",
        _table(["backend", "case", "op", "status", "code", "reason"], not_passed, status_column=3),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_opsuite_html(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`render_opsuite_html` of ``report`` to ``path``."""
    Path(path).write_text(render_opsuite_html(report), encoding="utf-8")
