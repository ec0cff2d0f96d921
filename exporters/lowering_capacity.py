"""The "capacity" lowering of the routed experts: static-capacity dispatch.

Some compilers need every expert's input buffer to have a shape known from the input shapes alone,
never from the routing decisions. This lowering gives every expert the same number of slots,

    C = max(min_capacity, ceil(capacity_factor * T * k / E)),

copies each routed (token, slot) pair into its expert's buffer [E, C, H], runs every expert as one
batched matmul over that buffer and gathers the results back. A (token, slot) pair that finds its
expert's buffer full is dropped and contributes nothing; the number dropped is returned.

Drop priority is deterministic: all first choices (slot j = 0) of all tokens are placed before any
second choice, and within one slot index a lower token index goes first. A token's own first
choice therefore never loses to someone else's second choice.

Everything is plain torch with static-shape-friendly ops (one-hot, cumulative sum, scatter of
indices, gather of rows, batched matmul), so the same code runs eagerly and exports with a dynamic
token count; C is computed from the symbolic T inside the graph.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch.nn import functional

# The capacity factor is turned into a fraction with a denominator at most this large so that C is
# computed with integer arithmetic only: the eager result and the exported graph then agree exactly
# (floating point ceil(1.1 * 10) is 12, not 11), and the exporter only sees integer symbolic maths.
_MAX_FACTOR_DENOMINATOR = 10_000


def expert_capacity(
    tokens: int | torch.SymInt, k: int, num_experts: int, capacity_factor: float, min_capacity: int
) -> int | torch.SymInt:
    """Slots per expert, ``max(min_capacity, ceil(capacity_factor * tokens * k / num_experts))``.

    The factor is rounded to the nearest fraction with denominator at most 10 000 and the ceiling is
    taken exactly in integers, so a factor like 1.1 gives 11 slots (not 12) for 10 routed slots per
    expert. ``tokens`` may be a symbolic int while exporting; the result is then symbolic too.

    Args:
        tokens: T, the number of tokens (an int, or a SymInt while tracing).
        k: selected experts per token.
        num_experts: E.
        capacity_factor: multiple of the average load per expert to reserve; must be positive.
        min_capacity: lower bound on the slots per expert; must be at least 1.

    Returns:
        C as an int (or SymInt while tracing).
    """
    factor = Fraction(capacity_factor).limit_denominator(_MAX_FACTOR_DENOMINATOR)
    numerator = factor.numerator * k
    denominator = factor.denominator * num_experts
    # Ceiling division as (a + b - 1) // b on non-negative operands: the exporter lowers symbolic
    # floor division to ONNX Div, which truncates, so the -(-a // b) idiom would round the wrong way.
    scaled = (tokens * numerator + denominator - 1) // denominator
    return torch.sym_max(min_capacity, scaled)


def routed_experts_capacity(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    capacity_factor: float,
    min_capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed SwiGLU experts with a fixed number of slots per expert.

    Args:
        hidden: [T, H] float32 token states.
        expert_ids: [T, k] int64 experts chosen per token.
        expert_weights: [T, k] float32 weights of those experts (already normalised and scaled).
        w1: [E, I, H] gate projections (nn.Linear layout).
        w3: [E, I, H] up projections.
        w2: [E, H, I] down projections.
        capacity_factor: slots per expert as a multiple of the average load ``T * k / E``; with
            ``E / k`` or more there is room for every token in every expert and nothing drops.
        min_capacity: lower bound on the slots per expert (keeps decode steps with few tokens from
            dropping when the average load rounds down).

    Returns:
        ``(routed [T, H], dropped_count)``: the weighted sum of the experts' outputs over the slots
        that found room, and the number of (token, slot) pairs dropped as an int64 scalar.

    Raises:
        ValueError: for a non-positive capacity factor or a minimum capacity below 1.
    """
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    if min_capacity < 1:
        raise ValueError(f"min_capacity must be at least 1, got {min_capacity}")

    tokens, width = hidden.shape
    top_k = expert_ids.shape[1]
    num_experts = w1.shape[0]
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor, min_capacity)
    num_slots = num_experts * capacity

    # Slot-major order (all j = 0 first, then j = 1, ...; tokens ascending inside each) is the drop
    # priority, so a cumulative count in this order is each pair's place in its expert's queue.
    flat_ids = expert_ids.t().reshape(-1)  # [k*T]
    flat_weights = expert_weights.t().reshape(-1)  # [k*T]
    flat_tokens = torch.arange(tokens, device=hidden.device).repeat(top_k)  # [k*T]

    # A compare with every expert id, not functional.one_hot: torchlib has no function for one_hot.
    one_hot = (flat_ids.unsqueeze(1) == torch.arange(num_experts, device=hidden.device)).to(torch.int64)  # [k*T, E]
    queue_position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(dim=1) - 1  # [k*T]
    kept = queue_position < capacity
    dropped_count = (~kept).to(torch.int64).sum()  # cast first: a sum of booleans needs the type promotion pass

    # Kept pairs go to row e*C + position of the flattened [E*C] buffer; dropped ones all go to one
    # extra trash row past the end, so every write has a valid, static-range destination.
    destination = torch.where(kept, flat_ids * capacity + queue_position, num_slots)

    # Scatter token indices (cheap: k*T integers) rather than rows of H floats, then fill the buffer
    # with one gather. Empty slots point at an appended zero row, so they compute zeros.
    slot_token = torch.full((num_slots + 1,), tokens, dtype=torch.int64, device=hidden.device)
    slot_token = slot_token.scatter(0, destination, flat_tokens)
    padded_hidden = torch.cat([hidden, hidden.new_zeros(1, width)], dim=0)  # [T+1, H]
    dispatched = padded_hidden[slot_token[:num_slots]].reshape(num_experts, capacity, width)  # [E, C, H]

    # One batched matmul per projection over all experts: [E, C, H] x [E, H, I].
    gate = torch.matmul(dispatched, w1.transpose(1, 2))
    up = torch.matmul(dispatched, w3.transpose(1, 2))
    expert_out = torch.matmul(functional.silu(gate) * up, w2.transpose(1, 2))  # [E, C, H]

    # Gather each pair's result back (dropped pairs read the zero trash row) and sum over slots.
    padded_out = torch.cat([expert_out.reshape(num_slots, width), expert_out.new_zeros(1, width)], dim=0)
    contributions = padded_out[destination] * (flat_weights * kept.to(flat_weights.dtype)).unsqueeze(1)
    routed = contributions.reshape(top_k, tokens, width).sum(dim=0)
    return routed, dropped_count


# The exporter's defaults. "auto" calibrates the factor on the golden inputs (see
# exporters.torch_export): the smallest quarter-step factor with 25% headroom over the busiest
# expert's load, so the golden data is dropless, as DeepSeek's inference is. A floor of 8 slots
# keeps decode steps of up to 8 tokens dropless whatever the routing (no expert can get more
# pairs than there are tokens).
OPTION_DEFAULTS = {"capacity_factor": "auto", "min_capacity": 8}

routed_experts = routed_experts_capacity
