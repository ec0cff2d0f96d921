"""Token-level conformance: each backend's greedy continuation against the bundle's golden one.

The backend is fed the golden tokens step by step (teacher forcing), so every step compares the
same context: the step's logits (error relative to the golden logits' largest magnitude), the
experts each MoE layer chose (agreement as sets) and the token the backend would pick (its
argmax). Up to the first step where that pick differs, this is exactly the backend's own greedy
continuation; after it, the per-step figures still compare like with like.

A divergence is explained when it follows a near-tie: in the logits, when the golden margin
between the best and the runner-up token is no larger than the backend's logit error at that
step; in routing, when some MoE layer chose other experts at or before it (the router's top-k
margin of that token is shown, from :func:`portable_moe.conformance.routing.routing_margins`). An explained
divergence passes with its reason; an unexplained one fails.

Needs no torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portable_moe import safety
from portable_moe.bundle import Bundle, read_tensors
from portable_moe.conformance.model_check import ERROR, FAILED, PASSED, UNAVAILABLE, JunitCase
from portable_moe.errors import BackendUnavailableError, InputError, PortableMoEError


@dataclass
class GenerationCheck:
    """One backend's token-level comparison with the golden continuation."""

    backend: str
    status: str
    reason: str = ""
    steps: int = 0
    chosen: list[int] = field(default_factory=list)
    golden: list[int] = field(default_factory=list)
    logit_errors: list[float] = field(default_factory=list)
    routing_agreement: list[float] = field(default_factory=list)
    first_divergence: int | None = None
    logit_margin: float | None = None
    routing_flip: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def token_agreement(self) -> float:
        """The share of steps whose chosen token is the golden one (nan when nothing ran)."""
        if not self.chosen:
            return float("nan")
        return float(np.mean([a == b for a, b in zip(self.chosen, self.golden)]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "status": self.status,
            "reason": self.reason,
            "steps": self.steps,
            "token_agreement": self.token_agreement,
            "first_divergence": self.first_divergence,
            "logit_margin_at_divergence": self.logit_margin,
            "routing_flip": self.routing_flip,
            "chosen_ids": self.chosen,
            "golden_ids": self.golden,
            "logit_error_per_step": self.logit_errors,
            "routing_agreement_per_step": self.routing_agreement,
            "seconds": self.seconds,
        }


def golden_logits(bundle: Bundle, entry: Mapping[str, Any]) -> np.ndarray:
    """The golden continuation's logits per step ``[steps, vocab]``, read as untrusted data.

    Raises:
        BundleError: if the directory leaves the bundle or the file is not a sane TensorProto.
    """
    where = f"{bundle.path}: generation golden-logits directory"
    directory = safety.resolve_inside(bundle.path, entry.get("golden_logits_dir"), where)
    return read_tensors(directory, "output")["logits"]


def check_generate_steps(bundle: Bundle, steps: int) -> Any:
    """Refuse a bundle without a decoder graph, or more steps than its golden continuation holds.

    Returns:
        the bundle's :class:`~portable_moe.run.generation.DecoderSpec`.

    Raises:
        InputError: naming the problem and the limit.
    """
    from portable_moe.run.generation import decoder_spec

    spec = decoder_spec(bundle)
    stored = len(spec.golden["tokens"])
    if not 1 <= steps <= stored:
        raise InputError(
            f"--generate takes 1 to {stored} steps (the golden continuation this bundle stores), got {steps}"
        )
    return spec


def check_generation(
    bundle: Bundle,
    backend: str,
    steps: int,
    options: Mapping[str, Any] | None = None,
) -> GenerationCheck:
    """Compare ``backend``'s continuation with the golden one over ``steps`` steps.

    Raises:
        InputError: if the bundle has no decoder graph, or stores fewer golden steps than asked.
    """
    from portable_moe.run.generation import Generator

    golden = check_generate_steps(bundle, steps).golden
    started = time.perf_counter()
    try:
        generator = Generator(bundle, backend, options)
    except BackendUnavailableError as error:
        return GenerationCheck(backend, UNAVAILABLE, str(error))
    except PortableMoEError as error:
        return GenerationCheck(backend, ERROR, str(error))
    expected = golden_logits(bundle, bundle.manifest["generation"])
    result = GenerationCheck(backend, PASSED, steps=steps, golden=list(golden["tokens"][:steps]))
    feed = np.array([golden["prompt_ids"]], dtype=np.int64)
    try:
        cache = generator.empty_cache(positions=len(golden["prompt_ids"]) + steps)
        for step in range(steps):
            output = generator.step(feed, cache)
            cache = output.cache
            scale = float(np.max(np.abs(expected[step]))) or 1.0
            result.logit_errors.append(float(np.max(np.abs(output.logits - expected[step]))) / scale)
            agreements = {
                int(layer): len(set(output.expert_ids[int(layer)]) & set(ids)) / len(ids)
                for layer, ids in golden["expert_ids"][step].items()
            }
            result.routing_agreement.append(float(np.mean(list(agreements.values()))) if agreements else 1.0)
            flipped = sorted(layer for layer, agreement in agreements.items() if agreement < 1.0)
            if flipped and result.routing_flip is None:
                result.routing_flip = {"step": step, "layer": flipped[0], "margin": None}
            result.chosen.append(int(np.argmax(output.logits)))
            feed = np.array([[golden["tokens"][step]]], dtype=np.int64)
    except PortableMoEError as error:
        result.status, result.reason = ERROR, str(error)
        return result
    result.seconds = time.perf_counter() - started
    _explain_divergence(result, bundle, golden, expected)
    return result


def _explain_divergence(
    result: GenerationCheck, bundle: Bundle, golden: Mapping[str, Any], expected: np.ndarray
) -> None:
    """Set the first divergence, its logit margin and any routing flip before it, and the verdict."""
    diverged = [step for step, (a, b) in enumerate(zip(result.chosen, result.golden)) if a != b]
    flip = result.routing_flip
    if flip is not None:
        flip["margin"] = _routing_margin(bundle, golden, flip["step"], flip["layer"])
    if not diverged:
        if flip is not None:
            result.reason = f"tokens agree; routing differs from step {flip['step']} (layer {flip['layer']})"
        return
    step = result.first_divergence = diverged[0]
    logits = expected[step]
    top_two = np.sort(logits)[-2:]
    result.logit_margin = float(top_two[1] - top_two[0])
    error = result.logit_errors[step] * (float(np.max(np.abs(logits))) or 1.0)
    near_tie = result.logit_margin <= error
    routing_first = flip is not None and flip["step"] <= step
    if near_tie or routing_first:
        causes = []
        if near_tie:
            causes.append(f"a near-tie in the logits (golden margin {result.logit_margin:.2e} <= error {error:.2e})")
        if flip is not None and routing_first:
            margin = "not measured" if flip["margin"] is None else f"{flip['margin']:.2e}"
            causes.append(
                f"a routing flip at step {flip['step']} (layer {flip['layer']}, router top-k margin {margin})"
            )
        result.reason = f"diverges at step {step}, after {' and '.join(causes)}"
        return
    result.status = FAILED
    result.reason = (
        f"diverges at step {step} (chose {result.chosen[step]}, golden {result.golden[step]}) with a golden "
        f"logit margin of {result.logit_margin:.2e}, larger than the error {error:.2e}: not a near-tie"
    )


def _routing_margin(bundle: Bundle, golden: Mapping[str, Any], step: int, layer: int) -> float | None:
    """The router's top-k margin of the position that chose ``golden["tokens"][step]`` in ``layer``.

    It comes from the full-sequence graph run on the golden tokens up to that step (on cpu); None
    when the router's scores cannot be found in the graph or cpu cannot run it.
    """
    from portable_moe.conformance.routing import routing_margins

    sequence = np.array([[*golden["prompt_ids"], *golden["tokens"][:step]]], dtype=np.int64)
    name = next((name for name, index in bundle.routing_outputs.items() if index == layer), None)
    try:
        margins = routing_margins(bundle.load_onnx(), list(bundle.routing_outputs), {"input_ids": sequence})
    except PortableMoEError:
        return None
    values = margins.get(name or "")
    return float(np.asarray(values).reshape(-1)[-1]) if values is not None and np.size(values) else None


def generation_junit_cases(checks: Sequence[GenerationCheck]) -> list[JunitCase]:
    """One JUnit case per backend for its token-level comparison."""
    return [
        JunitCase(check.backend, "generation", f"greedy {check.steps} steps", check.status, check.seconds, check.reason)
        for check in checks
    ]
