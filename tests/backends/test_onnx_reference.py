"""The ``reference`` backend's correction to onnx's GatherElements."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from portable_moe import get_backend

MODEL = """
<ir_version: 8, opset_import: ["" : 18]>
gather (float[T, E] scores, int64[T, K] ids) => (float[T, K] picked) {
    picked = GatherElements <axis = 1> (scores, ids)
}
"""


@pytest.mark.parametrize("experts", [8, 100])
def test_gather_elements_takes_many_experts_and_several_per_row(experts):
    generator = np.random.default_rng(0)
    scores = generator.standard_normal((5, experts)).astype(np.float32)
    ids = np.stack([generator.choice(experts, 3, replace=False) for _ in range(5)]).astype(np.int64)
    ids[0, 0] = -1  # negative indices count from the end, per the specification
    compiled = get_backend("reference").compile(onnx.parser.parse_model(MODEL))
    picked = compiled.run({"scores": scores, "ids": ids})["picked"]
    np.testing.assert_array_equal(picked, np.take_along_axis(scores, ids % experts, axis=1))
