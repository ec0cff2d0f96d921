"""Latency and throughput of a compiled model: warm-up, repeated timed runs, percentiles.

Figures from one machine are only comparable with figures taken in the same run on the same
machine; the benchmark script (``scripts/benchmark.py``) therefore measures every alternative side
by side in one process.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from portable_moe.bundle import Bundle
from portable_moe.errors import InputError


@dataclass(frozen=True)
class BenchResult:
    """Timings of repeated runs on one input shape.

    Attributes:
        runs: timed runs (after ``warmup`` untimed ones).
        p50_ms / p90_ms / min_ms / mean_ms: latency per run, in milliseconds.
        tokens: tokens per run (batch x sequence).
        tokens_per_second: ``tokens`` / median latency.
        peak_rss_mib: the process's peak resident memory so far (MiB), which includes the model.
    """

    runs: int
    warmup: int
    tokens: int
    p50_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    tokens_per_second: float
    peak_rss_mib: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def time_callable(
    function: Callable[[], object],
    tokens: int,
    warmup: int = 3,
    runs: int = 20,
    min_seconds: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time ``function`` after ``warmup`` calls.

    Args:
        function: what to time (one call = one run).
        tokens: tokens processed per call, for tokens/s.
        warmup: untimed calls first (allocations, caches, lazy compilation).
        runs: timed calls, at least; more are made until ``min_seconds`` have passed.
        min_seconds: keep timing until this much time has been spent (steadier medians for fast calls).
        progress: called with (done, planned) after each timed call.

    Raises:
        InputError: if ``runs`` is below 1 or ``warmup`` below 0.
    """
    if runs < 1 or warmup < 0:
        raise InputError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        function()
    timings: list[float] = []
    started = time.perf_counter()
    while len(timings) < runs or time.perf_counter() - started < min_seconds:
        before = time.perf_counter()
        function()
        timings.append(time.perf_counter() - before)
        if progress:
            progress(len(timings), runs)
    milliseconds = np.array(timings) * 1000.0
    median = float(np.percentile(milliseconds, 50))
    return BenchResult(
        runs=len(timings),
        warmup=warmup,
        tokens=tokens,
        p50_ms=median,
        p90_ms=float(np.percentile(milliseconds, 90)),
        min_ms=float(milliseconds.min()),
        mean_ms=float(milliseconds.mean()),
        tokens_per_second=tokens / (median / 1000.0) if median > 0 else float("inf"),
        peak_rss_mib=peak_rss_mib(),
    )


def token_feeds(bundle: Bundle, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random token ids of shape [batch, seq] for a bundle's ``input_ids`` input.

    Raises:
        InputError: for non-positive sizes, or a bundle whose inputs are not just ``input_ids``.
    """
    if batch < 1 or seq < 1:
        raise InputError(f"batch and sequence must be >= 1, got batch={batch}, seq={seq}")
    if [spec.name for spec in bundle.inputs] != ["input_ids"] or bundle.config is None:
        raise InputError(f"{bundle.path}: random token inputs need a bundle with one 'input_ids' input and a config")
    generator = np.random.default_rng(seed)
    return {"input_ids": generator.integers(0, bundle.config.vocab_size, size=(batch, seq), dtype=np.int64)}


def bench_compiled(
    compiled: object,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    warmup: int = 3,
    runs: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time ``compiled.run`` (a :class:`~portable_moe.backend.CompiledModel`).

    Args:
        compiled: the compiled model.
        feeds: one input set, run every call (which measures warm caches), or a sequence of
            input sets of one shape, taken in turn so that every call sees new inputs.
        warmup / runs / progress: see :func:`time_callable`.
    """
    sets = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    first = next(iter(sets[0].values()))
    tokens = int(first.shape[0] * first.shape[1]) if first.ndim >= 2 else int(first.size)
    calls = itertools.cycle(sets)
    return time_callable(lambda: compiled.run(next(calls)), tokens, warmup, runs, progress=progress)


def changing_token_feeds(bundle: Bundle, batch: int, seq: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` seeded random token inputs (seeds 0..count-1), one per timed call."""
    return [token_feeds(bundle, batch, seq, seed=seed) for seed in range(count)]


def model_bytes(bundle: Bundle) -> int:
    """Bytes of the bundle's model: every listed file outside its golden-data directories."""
    golden = {str(entry.get("dir")) for entry in bundle.manifest.get("golden", [])}
    return sum(
        (bundle.path / name).stat().st_size
        for name in bundle.manifest.get("files", {})
        if name.split("/", 1)[0] not in golden
    )
