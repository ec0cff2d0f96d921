"""Decode benchmark: prefill and per-token decode speed with a key/value cache, and the bandwidth floor.

An *engine* is anything that starts an empty cache and runs one step on it (a backend through
:class:`~portable_moe.run.generation.Generator`, or the torch reference in eager mode). For each
context length, :func:`time_decode` prefills ``context - steps`` random tokens, then decodes
``steps`` tokens one at a time with a new random token every step (so the routed experts change
from step to step; a repeated token would time one cached expert set). The last step attends
``context`` positions.

Decoding one token is bound by memory bandwidth: every weight the token touches is read once.
:func:`decode_weight_bytes` counts those bytes from the config (for MoE layers only the experts
the batch routes to), :func:`measure_matvec_bandwidth` measures the machine's float32
matrix-vector bandwidth (ONNX Runtime's MatMul, with the threads the engines use), and their
quotient is the floor no implementation can beat.

Needs no torch (the torch engine lives with the reference model, in :mod:`exporters`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from portable_moe.config import ModelConfig
from portable_moe.errors import InputError

# Bytes per stored weight for each weight format key (scales and zero points left out).
BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8/channel": 1.0, "int8/block": 1.0}
_INT4_BYTES = 0.5


class DecodeEngine(Protocol):
    """What :func:`time_decode` times: an empty cache, then steps on it."""

    name: str

    def empty_cache(self, batch: int, positions: int) -> Any:
        """A cache holding nothing, for a request that will need ``positions`` positions."""

    def step(self, input_ids: np.ndarray, cache: Any) -> Any:
        """Run ``input_ids [batch, new]`` after ``cache``; return the cache with them appended."""


@dataclass(frozen=True)
class DecodeTiming:
    """One engine at one context length and batch.

    Attributes:
        prefill_tokens: tokens prefilled (batch x (context - steps)).
        prefill_seconds: the prefill's time.
        decode_steps: decode steps timed, one new token per sequence each.
        decode_step_ms: median time of one decode step; ``decode_step_p90_ms`` its 90th percentile.
        decode_step_cpu_ms: median CPU time of the process over one decode step (all its threads). With
            one thread, ``decode_step_ms`` minus this is time the step waited for a core: on a
            shared machine it tells the work apart from the load.
    """

    engine: str
    context: int
    batch: int
    prefill_tokens: int
    prefill_seconds: float
    decode_steps: int
    decode_step_ms: float
    decode_step_p90_ms: float
    decode_step_cpu_ms: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch * 1000.0 / self.decode_step_ms if self.decode_step_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
        }


def _positive_integers(text: str, flag: str, example: str) -> list[int]:
    """Comma-separated positive integers, or an InputError naming ``flag`` and an ``example``."""
    words = f"{flag} takes comma-separated positive integers (e.g. {example}), got {text!r}"
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(words) from None
    if not values or min(values) < 1:
        raise InputError(words)
    return values


def parse_contexts(text: str) -> list[int]:
    """``"128,1024"`` -> ``[128, 1024]``.

    Raises:
        InputError: for anything but comma-separated positive integers.
    """
    return _positive_integers(text, "--context", "128,1024")


def parse_batches(text: str) -> list[int]:
    """``"1,4"`` -> ``[1, 4]``: the batch sizes ``bench --decode`` times.

    Raises:
        InputError: for anything but comma-separated positive integers.
    """
    return _positive_integers(text, "--batch", "1,4")


def check_decode_request(contexts: Sequence[int], batches: Sequence[int], steps: int, max_positions: int) -> None:
    """Refuse contexts that leave nothing to prefill or exceed the decoder's positions.

    Raises:
        InputError: naming the context and the limit.
    """
    if min(batches) < 1 or steps < 1:
        raise InputError(f"--batch and --steps must be at least 1, got batch={min(batches)}, steps={steps}")
    for context in contexts:
        if context <= steps:
            raise InputError(
                f"context {context} leaves nothing to prefill before {steps} decode steps; give a context above "
                f"{steps} or fewer --steps"
            )
        if context > max_positions:
            raise InputError(
                f"context {context} is longer than the decoder's {max_positions} positions; give at most {max_positions}"
            )


def time_decode(
    engine: DecodeEngine, vocab_size: int, context: int, batch: int, steps: int, seed: int = 0
) -> DecodeTiming:
    """Prefill ``context - steps`` random tokens, then time ``steps`` decode steps of new random tokens.

    Args:
        engine: what to time.
        vocab_size: token ids are drawn from ``[0, vocab_size)``.
        context: positions in the cache after the last step.
        batch: sequences decoded together.
        steps: decode steps timed.
        seed: seeds the token ids (every engine sees the same ones).
    """
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab_size, size=(batch, context - steps), dtype=np.int64)
    tokens = rng.integers(0, vocab_size, size=(steps, batch, 1), dtype=np.int64)
    cache = engine.empty_cache(batch, context)
    started = time.perf_counter()
    cache = engine.step(prompt, cache)
    prefill_seconds = time.perf_counter() - started
    step_seconds, cpu_seconds = [], []
    for step_ids in tokens:
        started, cpu_started = time.perf_counter(), time.process_time()
        cache = engine.step(step_ids, cache)
        step_seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    milliseconds = np.array(step_seconds) * 1000.0
    return DecodeTiming(
        engine=engine.name,
        context=context,
        batch=batch,
        prefill_tokens=int(prompt.size),
        prefill_seconds=prefill_seconds,
        decode_steps=steps,
        decode_step_ms=float(np.median(milliseconds)),
        decode_step_p90_ms=float(np.percentile(milliseconds, 90)),
        decode_step_cpu_ms=float(np.median(cpu_seconds) * 1000.0),
    )


def bench_decode(
    engines: Sequence[DecodeEngine],
    vocab_size: int,
    contexts: Sequence[int],
    batches: Sequence[int],
    steps: int,
    progress: Callable[[str], None] | None = None,
) -> list[DecodeTiming]:
    """Time every engine at every batch size and context, in one process.

    Each engine has one short untimed warm-up per batch size (new shapes) before its timings.

    Returns:
        one :class:`DecodeTiming` per (batch, context, engine), in the order given.
    """
    warm_context = min(min(contexts), steps + 8)
    timings = []
    for batch in batches:
        for engine in engines:
            time_decode(engine, vocab_size, warm_context, batch, min(steps, 2), seed=1)
        for context in contexts:
            for engine in engines:
                if progress:
                    progress(f"timing {engine.name} at context {context}, batch {batch}")
                timings.append(time_decode(engine, vocab_size, context, batch, steps))
    return timings


def _bytes_per_weight(weight_format: str) -> float:
    if weight_format.startswith("int4"):
        return _INT4_BYTES
    try:
        return BYTES_PER_WEIGHT[weight_format]
    except KeyError:
        raise InputError(f"no byte size known for weight format {weight_format!r}") from None


def decode_weight_bytes(config: ModelConfig, batch: int = 1, weight_format: str = "float32") -> float:
    """Bytes of weights one decode step of ``batch`` tokens reads, counted from the config.

    Every attention projection, dense MLP, router, shared expert and the LM head are read once;
    of the routed experts, those the batch's tokens pick (``top_k`` for one token; for more, the
    expected number under uniform routing). The routers stay float32 in every weight format; norms
    and the embedding rows are counted too (they are small).
    """
    hidden = config.hidden_size
    per_weight = _bytes_per_weight(weight_format)
    weights = 4 * hidden * hidden * config.num_hidden_layers + config.vocab_size * hidden
    float32_elements = batch * hidden + (2 * config.num_hidden_layers + 1) * hidden  # embedding rows, norms
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    expert_size = 3 * hidden * config.moe_intermediate_size
    for layer in range(config.num_hidden_layers):
        if layer not in config.moe_layer_indices:
            weights += 3 * hidden * config.intermediate_size
            continue
        touched = experts * (1.0 - (1.0 - top_k / experts) ** batch)
        weights += expert_size * (touched + config.n_shared_experts)
        float32_elements += experts * hidden + experts  # router weight and correction bias
    return weights * per_weight + 4.0 * float32_elements


def cache_read_bytes(config: ModelConfig, context: int, batch: int = 1) -> float:
    """Bytes of float32 keys and values one decode step reads at ``context`` cached positions."""
    return 4.0 * 2 * config.num_hidden_layers * batch * context * config.num_attention_heads * config.head_dim


def measure_matvec_bandwidth(megabytes: int = 128, repeats: int = 5, threads: int = 0) -> float:
    """This machine's float32 matrix-vector bandwidth in bytes/s: ONNX Runtime's CPU MatMul of one
    row by a ``megabytes`` MiB weight (larger than the caches), best of ``repeats``.

    The weight is read once per product, so bytes over seconds is the rate a decode step's weight
    reads can reach with the same runtime and the same ``threads`` (0: ONNX Runtime's default).
    """
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    rows = 4096
    columns = max(1, (megabytes << 20) // (4 * rows))
    weight = np.full((rows, columns), 0.5, dtype=np.float32)  # values do not change the bandwidth
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "matvec",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, columns])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    vector = {"x": np.ones((1, rows), dtype=np.float32)}
    session.run(None, vector)  # warm up threads
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, vector)
        best = min(best, time.perf_counter() - started)
    return weight.nbytes / max(best, 1e-9)
