"""``bench --decode`` (portable_moe/perf/decode_bench.py, cli/decode_bench_command.py) on the shared tiny
generation bundle: the command path, the bytes a decode step reads, and bad input. No timing assertions."""

from __future__ import annotations

import importlib.util
import json

import pytest

from portable_moe.config import get_preset
from portable_moe.errors import InputError
from portable_moe.perf.decode_bench import (
    cache_read_bytes,
    check_decode_request,
    decode_weight_bytes,
    measure_matvec_bandwidth,
    parse_batches,
    parse_contexts,
)


@pytest.fixture(scope="module")
def generation_bundle(bundle_factory):
    return bundle_factory("tiny", "dense", 2, generation=True)


def test_cli_bench_decode_times_each_batch_and_context_against_torch(generation_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    report = tmp_path / "decode.json"
    arguments = ["bench", str(generation_bundle.path), "--decode", "--context", "6,10", "--steps", "2"]
    code = main([*arguments, "--batch", "1,2", "--numpy-cache", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "bandwidth floor:" in out and "matrix-vector bandwidth" in out and "batch 2:" in out and "CPU ms/step" in out
    written = json.loads(report.read_text())
    engines = ["cpu (iobinding)", "cpu (numpy)"]
    if importlib.util.find_spec("torch") is not None:
        engines.append("torch eager")
    assert written["batches"] == [1, 2] and written["contexts"] == [6, 10]
    assert [(t["batch"], t["context"], t["engine"]) for t in written["timings"]] == [
        (b, c, e) for b in (1, 2) for c in (6, 10) for e in engines
    ]
    for timing in written["timings"]:
        assert timing["prefill_tokens"] == timing["batch"] * (timing["context"] - 2) and timing["decode_steps"] == 2
        assert timing["decode_step_ms"] > 0 and timing["decode_tokens_per_second"] > 0
        assert timing["decode_step_cpu_ms"] > 0
    config = generation_bundle.config
    for batch in (1, 2):
        floor = written["floors"][str(batch)]
        assert floor["weight_bytes_per_step"] == decode_weight_bytes(config, batch)
        assert floor["floor_ms_per_step"] == pytest.approx(
            floor["weight_bytes_per_step"] / written["matvec_bandwidth_bytes_per_second"] * 1000
        )
        assert floor["cache_bytes_per_step"] == {str(c): cache_read_bytes(config, c, batch) for c in (6, 10)}


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["--decode", "--context", "5000"], "context 5000 is longer than the decoder's 4096 positions"),
        (["--decode", "--context", "4", "--steps", "4"], "context 4 leaves nothing to prefill before 4 decode steps"),
        (["--decode", "--context", "12,x"], "--context takes comma-separated positive integers"),
        (["--decode", "--batch", "1,x"], "--batch takes comma-separated positive integers (e.g. 1,4), got '1,x'"),
        (["--batch", "1,4", "--seq", "1"], "--batch takes one batch size here (a list like 1,4 only with --decode)"),
        (["--decode", "--seq", "4"], "--decode times one bundle with --context"),
        (["--context", "128"], "--context is for --decode"),
    ],
)
def test_cli_bench_decode_bad_input_exits_2(generation_bundle, capsys, arguments, match):
    from portable_moe.cli import main

    code = main(["bench", str(generation_bundle.path), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert match in err


def test_decode_weight_bytes_agree_with_the_configs_active_parameters():
    """One token reads the active parameters, less the embedding table but one row of it."""
    for name in ("tiny", "small"):
        config = get_preset(name)
        active = config.parameter_count()["active_per_token"]
        expected = 4 * (active - config.vocab_size * config.hidden_size + config.hidden_size)
        assert decode_weight_bytes(config, 1) == pytest.approx(expected)


def test_a_batch_reads_more_experts_and_smaller_formats_fewer_bytes():
    config = get_preset("small")
    expert = 4 * 3 * config.hidden_size * config.moe_intermediate_size
    one, two = decode_weight_bytes(config, 1), decode_weight_bytes(config, 2)
    extra = config.n_routed_experts * ((1 - 6 / 64) - (1 - 6 / 64) ** 2)  # expected new experts for a 2nd token
    assert two - one == pytest.approx(extra * expert + 4 * config.hidden_size)
    assert decode_weight_bytes(config, 1, "int4/block") < decode_weight_bytes(config, 1, "float16") < one
    assert cache_read_bytes(config, 1024) == 4 * 2 * 2 * 1024 * 8 * 128


def test_matvec_bandwidth_is_measured():
    assert measure_matvec_bandwidth(megabytes=8, repeats=2) > 0


def test_bad_decode_requests_are_refused():
    with pytest.raises(InputError, match="--batch and --steps must be at least 1"):
        check_decode_request([128], [1, 0], 4, 4096)
    with pytest.raises(InputError, match="--batch takes comma-separated positive integers"):
        parse_batches("0,1")
    with pytest.raises(InputError, match="--context takes comma-separated positive integers"):
        parse_contexts("0,128")
    with pytest.raises(InputError, match="no byte size known for weight format 'fp8'"):
        decode_weight_bytes(get_preset("tiny"), 1, "fp8")


def test_torch_eager_is_left_out_with_the_reason_when_it_cannot_run(generation_bundle, monkeypatch):
    from types import SimpleNamespace

    from portable_moe.cli import decode_bench_command

    not_a_preset = SimpleNamespace(manifest={"preset": None}, config=generation_bundle.config)
    assert decode_bench_command._eager_baseline(not_a_preset, 0, None) == (
        None,
        "torch eager: not timed (the reference model is built for preset bundles only)",
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        decode_bench_command.importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "torch" else real_find_spec(name, *rest),
    )
    engine, reason = decode_bench_command._eager_baseline(generation_bundle, 0, None)
    assert engine is None and "torch is not installed" in reason


def test_a_checkpoint_for_a_preset_bundle_is_refused(generation_bundle, capsys):
    from portable_moe.cli import main

    code = main(["bench", str(generation_bundle.path), "--decode", "--hf", str(generation_bundle.path)])
    assert code == 2
    assert "--hf is for bundles exported from a Hugging Face checkpoint" in capsys.readouterr().err
    assert main(["bench", str(generation_bundle.path), "--hf", str(generation_bundle.path)]) == 2
    assert "--hf is for --decode" in capsys.readouterr().err
