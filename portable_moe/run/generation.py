"""Generation with a key/value cache on any backend: the bundle's decoder graph, step by step.

A generation-capable bundle (exported with ``--generation``) carries ``decoder.onnx``: input ids
plus past keys and values per layer in, logits, present keys and values and expert ids out (see
:mod:`exporters.decode_graph`). :class:`Generator` compiles it for a backend and runs prefill (the
whole prompt on an empty cache) and then one decode step per new token, feeding each step's
present cache back as the next step's past.

On backends whose compiled model exposes an ONNX Runtime session, the cache stays in ONNX Runtime's
own values between steps (IOBinding): each step binds the previous step's present outputs as its
past inputs, so the cache is never copied through numpy; on the CPU the cache is moreover
preallocated for the request and written in place (:mod:`portable_moe.run.preallocated_cache`),
growing when it fills up. A compiled model that keeps the cache
itself (:class:`CacheKeepingModel`: npu-sim's cache preallocated at a static gear) is handed its
own cache back each step. Other backends take the numpy path.

Needs no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from portable_moe.backend import CompiledModel, ModelInput
from portable_moe.bundle import Bundle, sha256_of
from portable_moe.errors import InputError, PortableMoEError
from portable_moe.tensors import TensorSpec


@dataclass(frozen=True)
class DecoderSpec:
    """What a bundle's manifest says of its decoder graph.

    Attributes:
        file: the decoder graph's file inside the bundle.
        max_positions: the longest sequence (prompt plus new tokens) it is declared for.
        past / present: cache input and output names, in layer order (key, value per layer).
        routing_outputs: output name -> decoder layer, for the expert-id outputs.
        cache_shape: ``[batch, heads, past, head_dim]`` with names for the dynamic axes.
        golden: the torch reference's greedy continuation (prompt_ids, tokens, expert_ids per step).
    """

    file: str
    max_positions: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    past: list[str]
    present: list[str]
    routing_outputs: dict[str, int]
    cache_shape: list[Any]
    golden: dict[str, Any]


def decoder_spec(bundle: Bundle) -> DecoderSpec:
    """Read the decoder entry of a bundle's manifest.

    Raises:
        InputError: if the bundle has no decoder graph (re-export with --generation), or its entry
            is malformed.
    """
    entry = bundle.manifest.get("generation")
    if entry is None:
        raise InputError(
            f"{bundle.path} has no generation graph; re-export it with 'portable-moe export ... --generation'"
        )
    try:
        return DecoderSpec(
            file=str(entry["decoder_file"]),
            max_positions=int(entry["max_positions"]),
            inputs=[TensorSpec.from_dict(spec) for spec in entry["inputs"]],
            outputs=[TensorSpec.from_dict(spec) for spec in entry["outputs"]],
            past=list(entry["past"]),
            present=list(entry["present"]),
            routing_outputs={str(name): int(layer) for name, layer in entry["routing_outputs"].items()},
            cache_shape=list(entry["cache_shape"]),
            golden=dict(entry["golden"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            f"{bundle.path}: malformed generation entry in the manifest ({type(error).__name__}: {error}); re-export"
        ) from None


@runtime_checkable
class CacheKeepingModel(Protocol):
    """A compiled decoder that keeps the cache in its own form (e.g. preallocated at a static gear)."""

    def cache_gear(self, batch: int, positions: int) -> Any:
        """What a request of ``positions`` positions is given; raises InputError when nothing holds it."""

    def new_cache(self, batch: int, positions: int) -> Any:
        """An empty cache for a request of ``positions`` positions."""

    def run_with_cache(self, input_ids: np.ndarray, cache: Any, length: int) -> tuple[dict[str, np.ndarray], Any]:
        """One step after ``length`` cached positions: (outputs other than the cache, the cache after it)."""


@dataclass
class Cache:
    """The key/value cache after some steps: the values (numpy arrays or backend-held values),
    how many positions they hold, and which decoder graph made them."""

    values: list[Any]
    length: int
    decoder_sha256: str


@dataclass
class StepOutput:
    """One prefill or decode step: the last position's logits and its experts per MoE layer."""

    logits: np.ndarray  # [vocab] of the last new position
    expert_ids: dict[int, list[int]]  # decoder layer -> experts of the last new position
    cache: Cache


@dataclass
class GenerationResult:
    """A whole generation: the tokens, per-step routing and logits, and timings.

    ``expert_ids[step]`` and ``logits[step]`` belong to the position that produced ``tokens[step]``
    (the prompt's last position for step 0).
    """

    prompt_ids: list[int]
    tokens: list[int]
    expert_ids: list[dict[int, list[int]]]
    logits: list[np.ndarray] = field(repr=False)
    prefill_seconds: float
    decode_seconds: float
    io: str

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = len(self.tokens) - 1  # the first new token comes out of prefill
        return decoded / self.decode_seconds if decoded and self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ids, per-step experts (layer as a string key) and timings."""
        return {
            "prompt_ids": self.prompt_ids,
            "generated_ids": self.tokens,
            "expert_ids": [{str(layer): ids for layer, ids in step.items()} for step in self.expert_ids],
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "cache_io": self.io,
        }


def choose_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator | None) -> int:
    """Greedy (``temperature`` 0) or sampled next token from one position's logits.

    Sampling keeps the ``top_k`` largest logits (0: all), divides by ``temperature`` and draws from
    the softmax with ``rng``; greedy ties go to the lower id (numpy's argmax).
    """
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    return int((rng or np.random.default_rng()).choice(scaled.size, p=probabilities))


def check_sampling(temperature: float, top_k: int) -> None:
    """Refuse a negative or non-finite temperature, or a negative top-k.

    Raises:
        InputError: naming the value and what is allowed.
    """
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
    if top_k < 0:
        raise InputError(f"top-k must be 0 (no limit) or a positive number, got {top_k}")


class Generator:
    """A bundle's decoder graph compiled for one backend, run step by step with a cache.

    Args:
        bundle: a generation-capable bundle.
        backend: a backend name or :class:`~portable_moe.backend.Backend`.
        options: backend options, as ``compile`` takes them.
        io_binding: keep the cache in the runtime between steps where the compiled model allows
            it (ONNX Runtime); False always copies through numpy.

    Raises:
        InputError: if the bundle has no decoder graph.
        BackendError / BackendUnavailableError / BundleError: as ``Backend.compile`` raises them.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Any,
        options: Mapping[str, Any] | None = None,
        io_binding: bool = True,
    ) -> None:
        from portable_moe import registry

        self.bundle = bundle
        self.spec = decoder_spec(bundle)
        if bundle.config is None:
            raise InputError(f"{bundle.path}: the manifest has no model config; re-export the bundle")
        self.config = bundle.config
        self.backend = registry.get_backend(backend) if isinstance(backend, str) else backend
        decoder = self._model_input()
        self.compiled: CompiledModel = self.backend.compile(decoder, options)
        self.decoder_sha256 = sha256_of(bundle.path / self.spec.file)
        session = getattr(self.compiled, "session", None)
        if isinstance(self.compiled, CacheKeepingModel):
            self.io = "backend-kept cache"
        else:
            self.io = "iobinding" if io_binding and hasattr(session, "io_binding") else "numpy"
        self._device = self._ort_device(session) if self.io == "iobinding" else None
        # On the CPU the cache is preallocated and written in place (no copy of it per step).
        self._in_place = self._compile_in_place(decoder, options) if self._device == "cpu" else None

    @property
    def writes_in_place(self) -> bool:
        """Whether the cache is preallocated and each step writes only its new positions (on the CPU,
        where the decoder graph's rewrite for a preallocated cache holds); else the cache grows."""
        return self._in_place is not None

    def _model_input(self) -> ModelInput:
        # The decoder file goes through the same safety checks as any model file of a bundle.
        decoder = Bundle(self.bundle.path, {"model_file": self.spec.file}, [], [], max_bytes=self.bundle.max_bytes)
        return ModelInput(
            decoder.load_onnx(),
            decoder.model_path,
            self.spec.inputs,
            self.spec.outputs,
            self.bundle.moe_lowering,
            self.bundle,
        )

    def _compile_in_place(self, decoder: ModelInput, options: Mapping[str, Any] | None) -> Any:
        """The decoder rewritten for a preallocated cache, compiled for this backend; None where that
        graph cannot be made (the grown cache of the decoder graph is used then).

        Where the attention fits ONNX Runtime's fused ``GroupQueryAttention``
        (:mod:`portable_moe.run.fused_attention`) that graph is tried first; whichever graph is used
        was checked against the decoder graph (:func:`verify_rewrite`), so a fusion that does not
        hold falls back to the unfused rewrite.
        """
        from portable_moe.run.fused_attention import fuse_group_query_attention
        from portable_moe.run.preallocated_cache import (
            InPlaceCacheSession,
            divide_by_root_mean_square,
            find_cache_pairs,
            static_cache_graph,
        )

        try:
            pairs = find_cache_pairs(decoder.proto)
            if not pairs:
                return None
            proto = static_cache_graph(decoder.proto, pairs)
        except PortableMoEError:
            return None
        divide_by_root_mean_square(proto)  # lets ONNX Runtime fuse each RMS norm into one node
        fused = fuse_group_query_attention(proto, [pair.past for pair in pairs], self.spec.max_positions)
        for candidate in [graph for graph in (fused, proto) if graph is not None]:
            compiled = self._compile_verified(decoder, candidate, pairs, options)
            if compiled is not None:
                if not hasattr(getattr(compiled, "session", None), "io_binding"):
                    return None
                return InPlaceCacheSession(compiled, pairs, fused_attention=candidate is fused)
        return None

    def _compile_verified(
        self, decoder: ModelInput, proto: Any, pairs: Sequence[Any], options: Mapping[str, Any] | None
    ) -> CompiledModel | None:
        """``proto`` (a rewrite of the decoder graph) compiled, if it gives the decoder graph's results."""
        from portable_moe.run.preallocated_cache import verify_rewrite
        from portable_moe.tensors import specs_from_onnx

        try:
            inputs, outputs = specs_from_onnx(proto, "the preallocated-cache decoder graph")
            rewritten = ModelInput(proto, None, inputs, outputs, decoder.moe_lowering, self.bundle)
            compiled = self.backend.compile(rewritten, options)
            verify_rewrite(decoder.proto, pairs, self.compiled.run, compiled.run)
        except PortableMoEError:
            return None
        return compiled

    @property
    def fused_attention(self) -> bool:
        """Whether the in-place decoder runs its attention as ONNX Runtime's fused ``GroupQueryAttention``."""
        return self._in_place is not None and self._in_place.fused_attention

    @staticmethod
    def _ort_device(session: Any) -> str:
        """Where ONNX Runtime should keep the cache: the device of the session's first provider."""
        return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def empty_cache(self, batch: int = 1, positions: int = 1) -> Cache:
        """A cache holding no positions (what prefill starts from).

        Args:
            batch: sequences in the batch.
            positions: the positions the request will need (prompt plus new tokens): a backend that
                preallocates its cache sizes it from this.

        Raises:
            InputError: when the backend's preallocated caches cannot hold ``positions``.
        """
        if isinstance(self.compiled, CacheKeepingModel):
            return Cache([self.compiled.new_cache(batch, positions)], 0, self.decoder_sha256)
        heads, head_dim = self.spec.cache_shape[1], self.spec.cache_shape[3]
        if self._in_place is not None:
            return Cache(self._in_place.allocate((batch, heads, positions, head_dim)), 0, self.decoder_sha256)
        values = [np.zeros((batch, heads, 0, head_dim), dtype=np.float32) for _ in self.spec.past]
        return Cache(values, 0, self.decoder_sha256)

    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Refuse an empty prompt, ids outside the vocabulary, or a sequence longer than the graph's limit.

        Raises:
            InputError: naming the offending id or length and the limit.
        """
        if not prompt_ids:
            raise InputError("the prompt is empty; give at least one token id (--prompt-ids 1,2,3)")
        if max_new_tokens < 1:
            raise InputError(f"max new tokens must be at least 1, got {max_new_tokens}")
        vocab = self.config.vocab_size
        outside = [token for token in prompt_ids if not 0 <= token < vocab]
        if outside:
            raise InputError(
                f"prompt token id {outside[0]} is outside the vocabulary [0, {vocab}); use ids below {vocab}"
            )
        total = len(prompt_ids) + max_new_tokens
        if total > self.spec.max_positions:
            raise InputError(
                f"the prompt ({len(prompt_ids)} tokens) plus {max_new_tokens} new tokens needs {total} positions; "
                f"this bundle's decoder takes at most {self.spec.max_positions}: shorten the prompt or generate fewer"
            )
        if isinstance(self.compiled, CacheKeepingModel):
            self.compiled.cache_gear(1, total)

    def step(self, input_ids: np.ndarray, cache: Cache) -> StepOutput:
        """Run the decoder on ``input_ids [1, new]`` after ``cache``; return the last position's results.

        Raises:
            InputError: if ``cache`` was made by another bundle's decoder, or the sequence would
                exceed the decoder's positions.
        """
        if cache.decoder_sha256 != self.decoder_sha256:
            raise InputError(
                "this cache was made by another bundle's decoder graph; start from Generator.empty_cache() "
                "of the bundle you generate with"
            )
        new = input_ids.shape[1]
        if cache.length + new > self.spec.max_positions:
            raise InputError(
                f"the cache holds {cache.length} positions; {new} more exceed the decoder's {self.spec.max_positions}"
            )
        if isinstance(self.compiled, CacheKeepingModel):
            outputs, kept = self.compiled.run_with_cache(input_ids, cache.values[0], cache.length)
            present = [kept]
        elif self._in_place is not None:
            present = self._in_place_values(cache, new)
            outputs = self._in_place.run(input_ids, present, cache.length)
        elif self.io == "iobinding":
            outputs, present = self._run_bound(input_ids, cache.values)
        else:
            feeds = {"input_ids": input_ids, **dict(zip(self.spec.past, cache.values))}
            outputs = self.compiled.run(feeds)
            present = [outputs[name] for name in self.spec.present]
        routing = {
            layer: np.asarray(outputs[name])[0, -1].tolist() for name, layer in self.spec.routing_outputs.items()
        }
        return StepOutput(
            np.asarray(outputs["logits"])[0, -1], routing, Cache(present, cache.length + new, self.decoder_sha256)
        )

    def _in_place_values(self, cache: Cache, new: int) -> list[Any]:
        """The preallocated cache, moved into a larger one when ``new`` more positions do not fit."""
        shape = list(cache.values[0].shape())
        if cache.length + new <= shape[2]:
            return cache.values
        shape[2] = min(max(2 * shape[2], cache.length + new), self.spec.max_positions)
        return self._in_place.allocate(shape, cache.values, cache.length)

    def _run_bound(self, input_ids: np.ndarray, past: list[Any]) -> tuple[dict[str, np.ndarray], list[Any]]:
        """One step through IOBinding: past values bound as they are (OrtValues stay in the runtime)."""
        import onnxruntime

        session = self.compiled.session  # type: ignore[attr-defined]
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        for name, value in zip(self.spec.past, past):
            if isinstance(value, np.ndarray):
                value = onnxruntime.OrtValue.ortvalue_from_numpy(value, self._device, 0)
            binding.bind_ortvalue_input(name, value)
        for spec in self.spec.outputs:
            # The cache stays on the session's device; logits and expert ids come back to the host.
            binding.bind_output(spec.name, self._device if spec.name in self.spec.present else "cpu")
        session.run_with_iobinding(binding)
        values = dict(zip([spec.name for spec in self.spec.outputs], binding.get_outputs()))
        host = {name: value.numpy() for name, value in values.items() if name not in self.spec.present}
        return host, [values[name] for name in self.spec.present]

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Prefill ``prompt_ids``, then generate ``max_new_tokens`` tokens one step at a time.

        Args:
            prompt_ids: the prompt's token ids.
            max_new_tokens: how many tokens to generate.
            temperature: 0 for greedy; above 0 samples from the softmax of logits / temperature.
            top_k: sample among the k most likely tokens only (0: all).
            seed: seeds the sampler; the same seed gives the same tokens.
            on_token: called with each token as soon as it is chosen (for streaming).

        Raises:
            InputError: for a bad prompt, length or sampling setting (see :meth:`check_prompt`).
        """
        check_sampling(temperature, top_k)
        self.check_prompt(prompt_ids, max_new_tokens)
        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        prompt = np.array([list(prompt_ids)], dtype=np.int64)
        output = self.step(prompt, self.empty_cache(positions=len(prompt_ids) + max_new_tokens))
        prefill_seconds = time.perf_counter() - started
        tokens, routing, logits = [], [], []
        decode_started = time.perf_counter()
        while True:
            token = choose_token(output.logits, temperature, top_k, rng)
            tokens.append(token)
            routing.append(output.expert_ids)
            logits.append(output.logits)
            if on_token is not None:
                on_token(token)
            if len(tokens) == max_new_tokens:
                break
            output = self.step(np.array([[token]], dtype=np.int64), output.cache)
        return GenerationResult(
            list(prompt_ids),
            tokens,
            routing,
            logits,
            prefill_seconds,
            time.perf_counter() - decode_started,
            self.io,
        )
