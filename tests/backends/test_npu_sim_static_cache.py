"""npu-sim's static-shape cache (backends/npu_sim/static_cache.py): a decoder graph's cache
preallocated at gears, written in place and masked, against the dynamic-cache decoder on cpu."""

from __future__ import annotations

import numpy as np
import pytest

from backends.npu_sim import NpuSimBackend
from backends.npu_sim.gears import Gear
from backends.npu_sim.static_cache import decoder_gears, select_cache_gear
from portable_moe.compare import tolerance_for
from portable_moe.conformance.generation_check import check_generation
from portable_moe.errors import InputError
from portable_moe.run.generation import Generator
from portable_moe.run.preallocated_cache import POSITIONS_DIM

# Batch gear 2 only, so batch-1 requests are padded; prompt gear 8 (the golden prompt's length);
# caches of 48 and 64 positions (the golden continuation needs 40).
GEAR_OPTIONS = {
    "batch_sizes": "2",
    "seq_lengths": "8",
    "cache_positions": "48,64",
    "precision": "must_keep_origin_dtype",
}
PROMPT = [5, 17, 3, 60, 9]  # 5 tokens: prefill is padded to the 8-token gear


@pytest.fixture(scope="module")
def generation_bundle(bundle_factory):
    return bundle_factory("tiny", "dense", 2, generation=True)


@pytest.fixture(scope="module")
def npu_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("npu-sim-static-cache"))


@pytest.fixture(scope="module")
def npu_generator(generation_bundle, npu_cache_dir):
    return Generator(generation_bundle, "npu-sim", {**GEAR_OPTIONS, "cache_dir": npu_cache_dir})


@pytest.fixture(scope="module")
def cpu_generator(generation_bundle):
    return Generator(generation_bundle, "cpu")


def _tolerance(precision):
    return tolerance_for("float32", precision, NpuSimBackend().capabilities.precision_modes)


def _assert_logits_close(actual, expected, precision):
    tolerance = _tolerance(precision)
    for step, (got, want) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(got, want, rtol=tolerance.rtol, atol=tolerance.atol, err_msg=f"step {step}")


def test_greedy_with_a_gear_cache_equals_the_golden_and_the_dynamic_cache(npu_generator, cpu_generator):
    golden = npu_generator.spec.golden
    result = npu_generator.generate(golden["prompt_ids"], len(golden["tokens"]))
    assert result.io == "backend-kept cache"
    assert result.tokens == golden["tokens"]
    assert [{str(k): v for k, v in step.items()} for step in result.expert_ids] == golden["expert_ids"]
    dynamic = cpu_generator.generate(golden["prompt_ids"], len(golden["tokens"]))
    _assert_logits_close(result.logits, dynamic.logits, npu_generator.compiled.precision)


def test_gear_padding_changes_nothing(npu_generator, cpu_generator):
    """A padded prompt, a padded batch and a larger cache than needed give the dynamic cache's logits."""
    dynamic = cpu_generator.generate(PROMPT, 12)
    for positions in (len(PROMPT) + 12, 64):  # the 48-position gear, then the 64 one
        cache = npu_generator.empty_cache(positions=positions)
        assert cache.values[0].positions == (48 if positions < 48 else 64)
        feed, logits = np.array([PROMPT], dtype=np.int64), []
        for token in dynamic.tokens:
            output = npu_generator.step(feed, cache)
            logits.append(output.logits)
            cache, feed = output.cache, np.array([[token]], dtype=np.int64)
        _assert_logits_close(logits, dynamic.logits, npu_generator.compiled.precision)


def test_a_cache_outgrowing_its_gear_moves_to_the_next(npu_generator, cpu_generator):
    dynamic = cpu_generator.generate(PROMPT, 50)  # 55 positions: past the 48-position gear
    cache = npu_generator.empty_cache()  # sized for 1 position: the smallest gear
    assert cache.values[0].positions == 48
    feed, logits = np.array([PROMPT], dtype=np.int64), []
    for token in dynamic.tokens:
        output = npu_generator.step(feed, cache)
        logits.append(output.logits)
        cache, feed = output.cache, np.array([[token]], dtype=np.int64)
    assert cache.values[0].positions == 64 and cache.length == 54
    _assert_logits_close(logits, dynamic.logits, npu_generator.compiled.precision)


def test_the_decoder_interface_pads_the_past_into_a_gear(npu_generator, cpu_generator):
    """``run`` with a past of any length equals the dynamic-cache graph's outputs, present caches included."""
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(0, 256, size=(2, 3), dtype=np.int64)}
    for name in npu_generator.spec.past:
        feeds[name] = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    expected = cpu_generator.compiled.run(feeds)
    actual = npu_generator.compiled.run(feeds)
    tolerance = _tolerance(npu_generator.compiled.precision)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        np.testing.assert_allclose(actual[name], value, rtol=tolerance.rtol, atol=tolerance.atol, err_msg=name)


def test_the_compile_report_records_each_requests_cache_gear(generation_bundle, npu_cache_dir):
    generator = Generator(generation_bundle, "npu-sim", {**GEAR_OPTIONS, "cache_dir": npu_cache_dir})
    generator.generate(PROMPT, 3)
    generator.generate(PROMPT, 50)
    report = generator.compiled.report()
    assert report.runs["cache_gears"] == {"positions=48": 1, "positions=64": 1}
    assert "cache gears chosen per request: positions=48: 1, positions=64: 1" in report.format()
    assert [row.gear for row in report.gears][:2] == ["batch=2 new=1 positions=48", "batch=2 new=8 positions=48"]
    # The cache stays in device memory: a run copies no cache tensor between host and device.
    assert not [t for t in report.transfers if "past_" in t["tensor"] or "present_" in t["tensor"]]


def test_check_generate_passes_on_npu_sim(generation_bundle, npu_cache_dir):
    check = check_generation(generation_bundle, "npu-sim", 4, {**GEAR_OPTIONS, "cache_dir": npu_cache_dir})
    assert check.status == "passed", check.reason
    assert check.token_agreement == 1.0


def test_cache_gear_choice():
    gears = [Gear((("batch", b), ("new", n), (POSITIONS_DIM, p))) for b in (1, 2) for n in (1, 8) for p in (16, 32)]
    choose = select_cache_gear
    assert choose(gears, 1, 1, 0).as_dict == {"batch": 1, "new": 1, POSITIONS_DIM: 16}
    assert choose(gears, 1, 5, 0).as_dict == {"batch": 1, "new": 8, POSITIONS_DIM: 16}
    # 5 tokens padded to 8 after 10 cached positions need 18: the 32-position cache.
    assert choose(gears, 1, 5, 10).as_dict == {"batch": 1, "new": 8, POSITIONS_DIM: 32}
    assert choose(gears, 2, 1, 15).as_dict == {"batch": 2, "new": 1, POSITIONS_DIM: 16}
    assert choose(gears, 1, 1, 3, at_least=32).as_dict[POSITIONS_DIM] == 32  # a cache never shrinks
    with pytest.raises(InputError, match=r"33 positions .* do not fit npu-sim's cache gears \(largest: 32 positions\)"):
        choose(gears, 1, 1, 32)


def test_decoder_gears_keep_prompts_that_fit_their_cache():
    options = {"batch_sizes": [1], "seq_lengths": [64, 256], "cache_positions": [128, 512]}
    gears = [gear.describe() for gear in decoder_gears([], options)]
    assert gears == [
        "batch=1 new=1 positions=128",
        "batch=1 new=64 positions=128",
        "batch=1 new=1 positions=512",
        "batch=1 new=64 positions=512",
        "batch=1 new=256 positions=512",
    ]
    assert [gear.describe() for gear in decoder_gears([], {**options, "cache_positions": [16]})] == [
        "batch=1 new=1 positions=16"
    ]


def test_a_prompt_longer_than_every_prompt_gear_is_prefilled_in_chunks(npu_generator, cpu_generator):
    prompt = [(7 * index) % 256 for index in range(19)]  # chunks of 8, 8 and 3 tokens
    dynamic = cpu_generator.generate(prompt, 4)
    result = npu_generator.generate(prompt, 4)
    assert result.tokens == dynamic.tokens
    _assert_logits_close(result.logits, dynamic.logits, npu_generator.compiled.precision)


def test_a_prompt_longer_than_the_largest_gear_is_refused(npu_generator):
    with pytest.raises(InputError, match="the request needs 68 cache positions .*largest cache gear holds 64"):
        npu_generator.generate(list(range(60)), 8)


def test_cli_generate_past_the_largest_gear_exits_2(generation_bundle, npu_cache_dir, capsys):
    from portable_moe.cli import main

    options = [f"-O{name}={value}" for name, value in {**GEAR_OPTIONS, "cache_dir": npu_cache_dir}.items()]
    prompt = ",".join(str(token) for token in range(70))
    code = main(["generate", str(generation_bundle.path), "--backend", "npu-sim", *options, "--prompt-ids", prompt])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "the request needs 86 cache positions (prompt plus new tokens); npu-sim's largest cache gear holds 64" in err
