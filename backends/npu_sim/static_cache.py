"""A static-shape key/value cache for npu-sim: a decoder graph's cache preallocated at gears.

A static-shape compiler cannot build a graph whose cache grows every step. npu-sim compiles the
decoder graph rewritten for a preallocated cache written in place and masked
(:mod:`portable_moe.run.preallocated_cache`), per *cache gear*: a batch, a number of new tokens
(1 for decode, prompt chunks for prefill) and a cache size in positions (128, 512, 2048...).
Each request gets the smallest cache gear that holds it (recorded in the compile report).

Padding is exact: padded prompt tokens sit after the real ones (causal), and what they write into
the cache lies beyond the real length, masked until a later step overwrites it; padded batch rows
never mix with real ones.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.npu_sim.gears import Gear, build_gears, int_list
from portable_moe.backend import CompiledModel, ModelInput
from portable_moe.errors import InputError
from portable_moe.run.preallocated_cache import CACHE_AXIS, CACHE_POSITION, POSITIONS_DIM, CachePair
from portable_moe.tensors import TensorSpec, check_feeds

DEFAULT_CACHE_POSITIONS = (128, 512, 2048)


def decoder_gears(inputs: Sequence[TensorSpec], options: Mapping[str, Any]) -> list[Gear]:
    """The gears of a static-cache decoder graph: batch x new tokens x cache positions.

    ``new`` takes 1 (a decode step) and the ``seq_lengths`` (prompt chunks for prefill: a longer
    prompt is prefilled in chunks); ``positions`` the ``cache_positions``; only gears whose new
    tokens fit their cache are kept.
    Explicit ``gears`` (mappings over batch, new, positions) replace the product.

    Raises:
        BackendError: for malformed sizes, or explicit gears missing a dimension.
    """
    if options.get("gears"):
        return build_gears(inputs, options)
    batches = int_list(options["batch_sizes"], "batch_sizes")
    news = sorted({1, *int_list(options["seq_lengths"], "seq_lengths")})
    positions = int_list(options["cache_positions"], "cache_positions")
    gears = [
        Gear((("batch", batch), ("new", new), (POSITIONS_DIM, size)))
        for batch in batches
        for new in news
        for size in positions
        if new <= size
    ]
    return sorted(gears, key=lambda gear: (gear.as_dict[POSITIONS_DIM], gear.as_dict["batch"], gear.as_dict["new"]))


def select_cache_gear(gears: Sequence[Gear], batch: int, new: int, length: int, at_least: int = 0) -> Gear:
    """The gear for ``new`` tokens after ``length`` cached positions in a batch of ``batch``.

    The smallest cache (at least ``at_least`` positions: a cache never shrinks during a request)
    whose positions hold the padded new tokens after ``length``; then the smallest batch and new.

    Raises:
        InputError: when no gear holds them (the message gives the largest cache and what to do).
    """
    fitting = [
        gear
        for gear in gears
        if (sizes := gear.as_dict)["batch"] >= batch
        and sizes["new"] >= new
        and sizes[POSITIONS_DIM] >= max(at_least, length + sizes["new"])
    ]
    if not fitting:
        largest = max(gear.as_dict[POSITIONS_DIM] for gear in gears)
        raise InputError(
            f"{length + new} positions (batch {batch}, {new} new after {length}) do not fit npu-sim's cache gears "
            f"(largest: {largest} positions); shorten the prompt or generate fewer tokens, or compile with larger "
            "cache_positions (-O cache_positions=...)"
        )
    return min(fitting, key=lambda gear: (gear.as_dict[POSITIONS_DIM], gear.as_dict["batch"], gear.as_dict["new"]))


def _into_gear(values: Mapping[str, np.ndarray], gear: Gear) -> dict[str, np.ndarray]:
    """Caches padded with zeros to ``gear``'s batch and positions (arrays already that size are kept)."""
    sizes = gear.as_dict
    padded = {}
    for name, value in values.items():
        widths = [(0, sizes["batch"] - value.shape[0]), (0, 0), (0, sizes[POSITIONS_DIM] - value.shape[2]), (0, 0)]
        padded[name] = np.pad(value, widths) if any(after for _, after in widths) else value
    return padded


@dataclass
class GearCache:
    """A cache preallocated at a gear: one array per cache input, ``[gear batch, heads, positions, head_dim]``.

    Attributes:
        values: cache input name -> array, as the last step's run wrote it.
        batch: the request's real batch (the arrays may hold padding rows).
        gear: the gear the cache was last run at (its positions are the cache's size).
    """

    values: dict[str, np.ndarray]
    batch: int
    gear: Gear

    @property
    def positions(self) -> int:
        return self.gear.as_dict[POSITIONS_DIM]


class StaticCacheDecoder(CompiledModel):
    """A decoder graph compiled for npu-sim with its cache in static gears.

    ``run`` keeps the decoder graph's interface (past caches of any length in, present ones
    out: each call places the past into a gear's cache and cuts the present back).
    :meth:`new_cache` and :meth:`run_with_cache` keep the cache in its gear between steps, as a
    generation loop does (:class:`portable_moe.run.generation.Generator` uses them).

    Args:
        backend: the npu-sim backend.
        model: the decoder graph as given (its dynamic specs are what ``run`` checks).
        device: the static-cache graph compiled for npu-sim (gears over batch, new, positions).
        pairs: the cache pairs (:func:`find_cache_pairs`).
    """

    def __init__(self, backend: Any, model: ModelInput, device: Any, pairs: Sequence[CachePair]) -> None:
        super().__init__(backend, model)
        self.device = device
        self.precision = device.precision
        self.gears = device.gears
        self.pairs = list(pairs)
        self._ids_spec = [spec for spec in model.inputs if spec.name == "input_ids"]
        self._cache_gears: Counter[str] = Counter()
        self._lock = threading.Lock()

    def placement(self) -> dict[str, int]:
        return self.device.placement()

    def report(self) -> Any:
        """npu-sim's compile report, with the cache gear each request was given."""
        report = self.device.report()
        with self._lock:
            report.runs["cache_gears"] = dict(self._cache_gears)
        return report

    def cache_gear(self, batch: int, positions: int) -> Gear:
        """The gear a request of ``batch`` sequences needing ``positions`` positions gets.

        Raises:
            InputError: when ``positions`` exceeds the largest cache gear.
        """
        largest = max(gear.as_dict[POSITIONS_DIM] for gear in self.gears)
        if positions > largest:
            raise InputError(
                f"the request needs {positions} cache positions (prompt plus new tokens); npu-sim's largest cache gear "
                f"holds {largest}: shorten the prompt or generate fewer tokens, or compile with larger cache_positions "
                "(-O cache_positions=...)"
            )
        return select_cache_gear(self.gears, batch, 1, positions - 1)

    def new_cache(self, batch: int, positions: int) -> GearCache:
        """An empty cache preallocated at the gear for ``positions`` (recorded in the compile report).

        Raises:
            InputError: when ``positions`` exceeds the largest cache gear.
        """
        gear = self.cache_gear(batch, positions)
        with self._lock:
            self._cache_gears[f"{POSITIONS_DIM}={gear.as_dict[POSITIONS_DIM]}"] += 1
        sizes = gear.as_dict
        values = {}
        for spec in self.device.inputs:
            if len(spec.shape) == 4 and spec.shape[CACHE_AXIS] == POSITIONS_DIM:
                shape = [sizes[dim] if isinstance(dim, str) else dim for dim in spec.shape]
                values[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
        return GearCache(values, batch, gear)

    def run_with_cache(
        self, input_ids: np.ndarray, cache: GearCache, length: int
    ) -> tuple[dict[str, np.ndarray], GearCache]:
        """Run ``input_ids`` after the ``length`` positions ``cache`` holds; write the new ones in place.

        A step whose padded tokens would not fit the cache's gear moves the cache into the next
        larger one.

        Returns:
            ``(outputs other than the caches, cut to the real batch and tokens; the cache after the step)``.

        Raises:
            InputError: for bad token ids, a batch other than the cache's, or a step past the largest gear.
        """
        ids = check_feeds(self._ids_spec, {"input_ids": input_ids}, token_id_limits=self.token_id_limits)["input_ids"]
        if ids.shape[0] != cache.batch:
            raise InputError(f"input_ids has batch {ids.shape[0]}, the cache holds {cache.batch}; start a new cache")
        # More new tokens than the largest gear takes are run in chunks (chunked prefill).
        chunk = max(gear.as_dict["new"] for gear in self.gears)
        pieces = []
        for start in range(0, ids.shape[1], chunk):
            outputs, cache = self._run_chunk(ids[:, start : start + chunk], cache, length + start)
            pieces.append(outputs)
        if len(pieces) == 1:
            return pieces[0], cache
        return {name: np.concatenate([piece[name] for piece in pieces], axis=1) for name in pieces[0]}, cache

    def _run_chunk(self, ids: np.ndarray, cache: GearCache, length: int) -> tuple[dict[str, np.ndarray], GearCache]:
        batch, new = ids.shape
        gear = select_cache_gear(self.gears, cache.gear.as_dict["batch"], new, length, at_least=cache.positions)
        sizes = gear.as_dict
        feeds = {
            "input_ids": np.pad(ids, ((0, sizes["batch"] - batch), (0, sizes["new"] - new))),
            CACHE_POSITION: np.array([length], dtype=np.int64),
            **_into_gear(cache.values, gear),
        }
        results = self.device.run_gear(gear, feeds, (sizes["batch"], sizes["new"]) != (batch, new))
        present = {pair.past: results[pair.present] for pair in self.pairs}
        cache_outputs = {pair.present for pair in self.pairs}
        outputs = {
            name: np.ascontiguousarray(value[:batch, :new])
            for name, value in results.items()
            if name not in cache_outputs
        }
        return outputs, GearCache(present, batch, gear)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, new = feeds["input_ids"].shape
        length = feeds[self.pairs[0].past].shape[CACHE_AXIS]
        gear = select_cache_gear(self.gears, batch, new, length)
        with self._lock:
            self._cache_gears[f"{POSITIONS_DIM}={gear.as_dict[POSITIONS_DIM]}"] += 1
        past = GearCache({pair.past: feeds[pair.past] for pair in self.pairs}, batch, gear)
        outputs, cache = self.run_with_cache(feeds["input_ids"], past, length)
        for pair in self.pairs:
            outputs[pair.present] = np.ascontiguousarray(cache.values[pair.past][:batch, :, : length + new])
        return outputs
