"""Model-level conformance: routing margins and load, other input sets, versioned JSON, JUnit, CLI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from portable_moe.cli import app as cli
from portable_moe.conformance.model_check import (
    REPORT_SCHEMA_VERSION,
    check_bundle,
    error_histogram,
    input_sets_for,
    junit_cases,
    report_dict,
)
from portable_moe.conformance.routing import (
    CASCADED,
    NEAR_TIE,
    REAL_DISAGREEMENT,
    LayerRouting,
    expert_load,
    mark_cascades,
    near_tie_margin,
    router_score_values,
    routing_margins,
    topk_margins,
)
from portable_moe.errors import ConformanceError, InputError
from portable_moe.registry import get_backend


def test_topk_margins_handle_masked_groups_and_ties():
    scores = np.array(
        [
            [0.9, 0.5, 0.45, 0.1],  # margin 0.05 between 2nd and 3rd
            [0.9, 0.5, -np.inf, -np.inf],  # the (k+1)-th is masked: nothing can promote it
            [0.9, -np.inf, -np.inf, -np.inf],  # the k-th is masked too: an arbitrary pick
        ]
    )
    np.testing.assert_allclose(topk_margins(scores, 2), [0.05, np.inf, 0.0])
    assert np.all(topk_margins(scores, 4) == np.inf)


def test_expert_load_counts_every_selection():
    assert expert_load(np.array([[[0, 2], [2, 3]]]), 5) == [1, 0, 2, 1, 0]


def test_near_tie_threshold_follows_precision():
    assert near_tie_margin("exact") == 1e-5
    npu_modes = get_backend("npu-sim").capabilities.precision_modes
    assert near_tie_margin("force_fp16", npu_modes) == 1e-2
    # A weight format widens it to what that format does to router scores; the larger of the two applies.
    assert near_tie_margin("exact+weights:int4/block") == 0.5
    assert near_tie_margin("force_fp16+weights:float16", npu_modes) == 1e-2
    with pytest.raises(ConformanceError, match="no tolerance for precision mode 'force_fp16'; known modes: exact"):
        near_tie_margin("force_fp16")


def test_flip_rate_near_tie_share_and_load_drift():
    expected = np.array([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    actual = np.array([[[1, 0], [2, 4], [0, 1], [1, 3]]])  # tokens 1 and 2 flip, one selection each
    layer = LayerRouting("expert_ids_layer1", 1, near_tie_margin=1e-2)
    layer.add(expected, actual, np.array([0.5, 3e-3, 0.2, 0.4]), 0, 5)
    assert layer.flip_rate == pytest.approx(0.5)
    assert layer.near_tie_share == pytest.approx(0.5)  # one flip at a near-tie, one not
    # Two of eight selections moved (3 -> 4 and 2 -> 1): half the L1 distance of the load shares is 2/8.
    assert layer.load_drift == pytest.approx(2 / 8)
    assert "2 token(s) flipped (50.0%, 50% near-ties, load drift 0.250)" in layer.summary()
    record = layer.to_dict()
    assert record["flip_rate"] == pytest.approx(0.5) and record["load_drift"] == pytest.approx(0.25)
    quiet = LayerRouting("expert_ids_layer1", 1)
    quiet.add(expected, expected, None, 0, 5)
    assert quiet.flip_rate == 0 and quiet.near_tie_share is None and quiet.load_drift == 0


def test_layer_verdicts_tell_near_ties_from_real_disagreements():
    expected = np.array([[[0, 1], [2, 3], [0, 2]]])
    actual = np.array([[[1, 0], [2, 4], [0, 2]]])  # token 1 flips
    for margin, verdict in ((3e-4, NEAR_TIE), (0.2, REAL_DISAGREEMENT)):
        layer = LayerRouting("expert_ids_layer1", 1, near_tie_margin=1e-2)
        layer.add(expected, actual, np.array([0.5, margin, 0.1]), 0, 5)
        assert layer.agreement == pytest.approx(2 / 3)
        assert layer.worst_margin == pytest.approx(margin) and layer.verdict == verdict
        assert f"flip at margin {margin:.2g}: {verdict}" in layer.summary()
        assert layer.load == [2, 1, 2, 0, 1] and layer.expected_load == [2, 1, 2, 1, 0]
    unknown = LayerRouting("expert_ids_layer1", 1)
    unknown.add(expected, actual, None, 0, 5)
    assert unknown.verdict == "margin unknown"


def test_a_flip_after_an_earlier_layers_flip_is_not_judged_alone():
    first, second = LayerRouting("a", 1), LayerRouting("b", 2)
    first.disagreements = [(0, (0, 4), 3e-4)]
    second.disagreements = [(0, (0, 6), 0.3), (0, (1, 2), 0.4)]  # same sequence later / another sequence
    mark_cascades([second, first])
    assert second.cascaded == {(0, (0, 6))}
    assert second.worst_margin == 0.4 and second.verdict == REAL_DISAGREEMENT
    second.disagreements = second.disagreements[:1]
    assert second.verdict == CASCADED


def test_router_scores_are_found_from_each_routing_output(tiny_bundle):
    proto = tiny_bundle.load_onnx()
    found = router_score_values(proto, list(tiny_bundle.routing_outputs))
    assert set(found) == set(tiny_bundle.routing_outputs)
    producers = {output: node for node in proto.graph.node for output in node.output}
    for scores, k in found.values():
        assert k == tiny_bundle.config.num_experts_per_tok
        assert any(node.op_type == "TopK" and node.input[0] == scores for node in proto.graph.node)
        assert producers[scores].op_type == "Where"  # the group mask fills -inf
    assert router_score_values(proto, ["logits"]) == {}


def test_margins_on_golden_inputs_are_positive_and_match_the_documented_minimum(tiny_bundle):
    feeds = tiny_bundle.golden_sets()[0][0]
    margins = routing_margins(tiny_bundle.load_onnx(), list(tiny_bundle.routing_outputs), feeds)
    tokens = feeds["input_ids"].size
    for values in margins.values():
        assert values.shape == (tokens,) and np.all(values > 0)
    # compare.TOLERANCES quotes the golden inputs' smallest router margin as 3.3e-3.
    assert min(float(values.min()) for values in margins.values()) == pytest.approx(3.3e-3, rel=0.05)


def test_check_reports_routing_load_and_histograms(tiny_bundle):
    (result,) = check_bundle(tiny_bundle, ["cpu"])
    assert result.passed
    assert [layer.layer for layer in result.routing] == sorted(tiny_bundle.routing_outputs.values())
    tokens = tiny_bundle.golden_sets()[0][0]["input_ids"].size
    k = tiny_bundle.config.num_experts_per_tok
    for layer in result.routing:
        assert layer.agreement == 1.0 and layer.verdict == ""
        assert sum(layer.load) == tokens * k and layer.load == layer.expected_load
        assert len(layer.load) == tiny_bundle.config.n_routed_experts
    assert sum(result.error_histograms["logits"]) == tokens * tiny_bundle.config.vocab_size


def test_random_inputs_take_the_reference_as_oracle_and_flag_fp16_flips(tiny_bundle):
    source, sets = input_sets_for(tiny_bundle, "random:3")
    assert source.startswith("reference backend") and len(sets) == 3
    shape = tiny_bundle.golden_sets()[0][0]["input_ids"].shape
    assert all(feeds["input_ids"].shape == shape for feeds, _ in sets)
    assert not np.array_equal(sets[0][0]["input_ids"], sets[1][0]["input_ids"])
    cpu, npu = check_bundle(tiny_bundle, ["cpu", "npu-sim"], {"npu-sim": {"precision": "force_fp16"}}, input_sets=sets)
    assert cpu.passed
    # Measured: float16 flips one token of layer 1 at a 2.9e-3 margin (a near-tie), and layer 2 follows it.
    first = npu.routing[0]
    assert first.disagreements and first.verdict == NEAR_TIE
    assert first.worst_margin < near_tie_margin("force_fp16", get_backend("npu-sim").capabilities.precision_modes)
    assert "near-tie" in npu.routing_note()


def test_npz_inputs(tiny_bundle, tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, input_ids=np.arange(8, dtype=np.int64).reshape(1, 8))
    source, sets = input_sets_for(tiny_bundle, str(path))
    assert source.startswith("reference") and sets[0][1]["logits"].shape == (1, 8, tiny_bundle.config.vocab_size)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random:0", r"write random:N with N >= 1"),
        ("random:x", r"write random:N with N >= 1"),
        ("missing.npz", r"missing.npz: no such file"),
        ("{wrong_keys}", r"holds arrays \['tokens'\], expected exactly the model inputs \['input_ids'\]"),
        ("{not_npz}", r"bad.npz: not an .npz file \(an .npz is a zip archive of arrays\); write one with numpy.savez"),
        ("{npy}", r"one.npz: a single .npy array, not an .npz; write one with numpy.savez\(path, input_ids=array\)"),
        ("{broken_zip}", r"broken.npz: not a readable .npz file \("),
    ],
)
def test_bad_input_specs(tiny_bundle, tmp_path, spec, message):
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((1, 4), dtype=np.int64))
    (tmp_path / "bad.npz").write_text("input_ids\n1 2 3\n")  # a text file with an .npz name
    with open(tmp_path / "one.npz", "wb") as handle:  # np.save on a file object keeps the name as given
        np.save(handle, np.zeros((1, 4), dtype=np.int64))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 cut short")
    spec = spec.format(
        wrong_keys=tmp_path / "wrong.npz",
        not_npz=tmp_path / "bad.npz",
        npy=tmp_path / "one.npz",
        broken_zip=tmp_path / "broken.npz",
    )
    with pytest.raises(InputError, match=message):
        input_sets_for(tiny_bundle, spec)


def test_bad_bisect_mode(tiny_bundle):
    with pytest.raises(InputError, match="bisect must be never, failed or always, got 'sometimes'"):
        check_bundle(tiny_bundle, ["cpu"], bisect="sometimes")


def test_error_histogram_bins():
    counts = error_histogram(np.zeros(4, np.float32), np.array([0.0, 1e-3, 1e-3, np.nan], np.float32))
    assert sum(counts) == 3 and counts[0] == 1  # exact in the first bin, NaN left out
    assert counts[14] == 2  # 1e-3 -> log10 -3, the bin [-3, -2.5)


def test_json_junit_and_cli(tiny_bundle, tmp_path, capsys):
    report, junit, page = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.html"
    code = cli.main(
        [
            "check",
            str(tiny_bundle.path),
            "--backend",
            "cpu,npu-sim",
            "--bisect",
            "--json",
            str(report),
            "--junit",
            str(junit),
            "--html",
            str(page),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bisect vs reference" in out
    data = json.loads(report.read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION == 1
    assert data["expected_from"].startswith("golden")
    cpu = data["results"][0]
    assert cpu["backend"] == "cpu" and cpu["bisection"]["first_divergence"] is None
    assert cpu["routing"][0]["agreement"] == 1.0 and cpu["routing"][0]["expert_load"]
    tree = ElementTree.parse(junit).getroot()
    suites = tree.findall("testsuite")
    assert [suite.get("name") for suite in suites] == [
        f"portable-moe check {tiny_bundle.name} on cpu",
        f"portable-moe check {tiny_bundle.name} on npu-sim",
    ]
    assert suites[0].get("tests") == "3" and suites[0].get("failures") == "0"
    assert "<svg" in page.read_text()


def test_junit_cases_for_unavailable_and_failing(tiny_bundle):
    (result,) = check_bundle(tiny_bundle, ["cpu"])
    result.status, result.comparisons[0].passed, result.comparisons[0].message = "failed", False, "logits: off"
    cases = junit_cases([result])
    assert [case.status for case in cases] == ["failed", "passed", "passed"]
    assert cases[0].reason == "logits: off"
    result.comparisons, result.status, result.reason = [], "unavailable", "no GPU"
    assert [(case.status, case.reason) for case in junit_cases([result])] == [("unavailable", "no GPU")]
    assert report_dict(tiny_bundle, [result])["results"][0]["status"] == "unavailable"
