"""The capacity lowering in a whole exported model: calibrated to drop nothing on the golden data,
and reporting drops (rather than hiding them) when an input overflows the capacity."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from exporters import export_bundle  # noqa: E402
from exporters.torch_export import calibrate_capacity_factor  # noqa: E402
from portable_moe import ExportError, get_backend, get_preset  # noqa: E402


def test_manifest_says_the_golden_data_is_dropless(bundle_factory):
    bundle = bundle_factory("tiny", "capacity")
    assert bundle.manifest["dropless_on_golden"] is True
    options = bundle.manifest["moe_lowering_options"]
    assert options["capacity_factor"] > 1 and options["min_capacity"] == 8
    [(_, golden)] = bundle.golden_sets()
    assert [int(golden[name]) for name in golden if name.startswith("dropped")] == [0, 0]
    # The same token 64 times routes 64 token-slots to the same experts: more than their capacity.
    outputs = get_backend("cpu").compile(bundle).run({"input_ids": np.full((1, 64), 17, dtype=np.int64)})
    assert int(outputs["dropped_slots_layer1"]) > 0


def test_a_factor_that_drops_on_the_golden_data_is_refused(tmp_path):
    with pytest.raises(ExportError, match="drops token-slots on the golden inputs.*raise capacity_factor"):
        export_bundle(
            tmp_path / "c",
            "tiny",
            moe_lowering="capacity",
            lowering_options={"capacity_factor": 0.5, "min_capacity": 1},
        )
    assert list(tmp_path.iterdir()) == []


def test_unknown_lowering_option_is_refused(tmp_path):
    with pytest.raises(
        ExportError, match=r"capacity lowering has no option\(s\) slots; its options: capacity_factor, min_capacity"
    ):
        export_bundle(tmp_path / "c", "tiny", moe_lowering="capacity", lowering_options={"slots": 3})


def test_calibration_gives_the_busiest_expert_its_load_plus_headroom():
    config = get_preset("tiny")  # 8 experts, top-2
    # 8 tokens x 2 slots = 16 pairs, 2 per expert on average; expert 0 gets 8 of them: 4x the average.
    ids = np.stack([np.zeros(8, np.int64), np.arange(8, dtype=np.int64) % 7 + 1], axis=1)
    assert calibrate_capacity_factor(config, [ids], headroom=1.25) == 5.0
