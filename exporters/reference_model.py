"""The reference DeepSeek-style MoE decoder in plain torch.

Imports torch: only export and tests use this module, never bundle loading or checking.

The MoE block follows DeepSeek-V3's published routing: sigmoid (or another) scores in float32, a
selection-only correction bias, group-limited selection, unbiased weights normalised and scaled
by ``routed_scaling_factor``, SwiGLU experts and shared experts. Selection uses a stable
descending sort so that equal scores go to the lower expert index, which is ONNX TopK's rule
(``torch.topk`` does not promise any order for ties).

Two independent implementations of the routed experts live here: :func:`routed_experts_dense`
(every expert on every token, weighted by a mostly-zero gate) and :func:`routed_experts_loop`
(each expert on the tokens routed to it). The tests check them against each other before anything
else is compared against the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn
from torch.nn import functional

from portable_moe.config import ModelConfig
from portable_moe.errors import ConfigError

# (hidden [T, H], expert_ids [T, k], expert_weights [T, k], w1 [E, I, H], w3 [E, I, H], w2 [E, H, I]) -> [T, H]
RoutedExperts = Callable[..., torch.Tensor]


def stable_topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last axis; ties go to the lower index.

    Eagerly this is a stable descending sort. While exporting it is ``topk``, which becomes ONNX
    TopK: its specification gives ties to the lower index, the same rule (the ONNX exporter has no
    lowering for a stable sort).
    """
    if torch.compiler.is_exporting():
        return torch.topk(values, k, dim=-1, largest=True, sorted=True).indices
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Turn float32 router logits into per-expert scores."""
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    if scoring_func == "sqrtsoftplus":
        return torch.sqrt(functional.softplus(logits))
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ConfigError(f"unknown scoring_func {scoring_func!r}")


def route(
    hidden: torch.Tensor, gate_weight: torch.Tensor, correction_bias: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts per token with DeepSeek-V3's group-limited top-k routing.

    Args:
        hidden: [T, H] token states.
        gate_weight: [E, H] router weight (float32).
        correction_bias: [E] bias added to the scores for selection only.
        config: routing sizes and rules.

    Returns:
        ``(expert_ids [T, k] int64, expert_weights [T, k] float32)``.
    """
    logits = hidden.float() @ gate_weight.float().t()
    scores = router_scores(logits, config.scoring_func)
    biased = scores + correction_bias.float()
    if config.n_group > 1:
        tokens = biased.shape[0]
        grouped = biased.reshape(tokens, config.n_group, -1)
        best_in_group = min(2, grouped.shape[-1])
        group_scores = torch.topk(grouped, best_in_group, dim=-1).values.sum(dim=-1)
        kept_groups = stable_topk_indices(group_scores, config.topk_group)
        group_mask = torch.zeros_like(group_scores).scatter(1, kept_groups, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, -1)
        biased = biased.masked_fill(expert_mask == 0.0, float("-inf"))
    expert_ids = stable_topk_indices(biased, config.num_experts_per_tok)
    weights = scores.gather(1, expert_ids)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights * config.routed_scaling_factor


def _swiglu(hidden: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (functional.silu(hidden @ w1.t()) * (hidden @ w3.t())) @ w2.t()


def routed_experts_dense(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Every expert on every token, weighted by a gate that is zero except at the selected experts."""
    num_experts = w1.shape[0]
    gate = torch.zeros(hidden.shape[0], num_experts, dtype=hidden.dtype, device=hidden.device)
    gate = gate.scatter(1, expert_ids, expert_weights.to(hidden.dtype))
    # Batched matmuls over the expert axis (ONNX MatMul broadcasts them; its Einsum is slower on ORT).
    tokens = hidden.unsqueeze(0)  # [1, T, H]
    up_gate = torch.matmul(tokens, w1.transpose(1, 2))  # [E, T, I]
    up = torch.matmul(tokens, w3.transpose(1, 2))
    expert_out = torch.matmul(functional.silu(up_gate) * up, w2.transpose(1, 2))  # [E, T, H]
    return (gate.t().unsqueeze(-1) * expert_out).sum(dim=0)


def routed_experts_loop(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Each expert on only the tokens routed to it (eager only: its control flow depends on data)."""
    out = torch.zeros_like(hidden)
    for expert in range(w1.shape[0]):
        token_index, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
        if token_index.numel() == 0:
            continue
        contribution = _swiglu(hidden[token_index], w1[expert], w3[expert], w2[expert])
        out.index_add_(0, token_index, contribution * expert_weights[token_index, slot, None].to(hidden.dtype))
    return out


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(dim=-1, keepdim=True)
        return hidden * torch.rsqrt(variance + self.eps) * self.weight


def rotary_tables(positions: torch.Tensor, inverse_frequency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin) [S, head_dim]``: the rotary tables of ``positions [S, 1]`` (float32)."""
    angles = positions * inverse_frequency[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., S, head_dim]`` by its positions' angles (the two halves of each head as pairs)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings.

    DeepSeek-V3 uses MLA (low-rank compressed keys and values); the MoE plumbing this project is
    about does not depend on it, so plain multi-head attention keeps the reference short. The
    rotary tables and the causal mask are the same for every layer: the model computes them once
    (:meth:`MoETransformer.prologue`) and passes them in.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, self.heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """Attend over ``hidden [B, S, H]`` with rotary ``cos``/``sin [S, head_dim]`` and ``future [S, S]`` masked."""
        query, key, value = self.project(hidden)
        return self.attend(apply_rotary(query, cos, sin), apply_rotary(key, cos, sin), value, future)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query, key, value) [B, heads, S, head_dim]`` of ``hidden [B, S, H]``, before rotation."""
        batch, seq, _ = hidden.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)

        return split_heads(self.q_proj(hidden)), split_heads(self.k_proj(hidden)), split_heads(self.v_proj(hidden))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]``: each query position's softmax over the keys, ``future [S, keys]`` masked, then projected.

        Keys and values may hold more positions than the queries (a cache's past before them).
        """
        batch, _, seq, _ = query.shape
        scores = (query @ key.transpose(-1, -2)) * (self.head_dim**-0.5)
        scores = scores.masked_fill(future, float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ value
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq, -1))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(functional.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class MoEBlock(nn.Module):
    """Shared experts plus routed experts with DeepSeek-V3 routing.

    ``routed_experts`` is the implementation of the routed part; the exporter swaps it for the
    chosen MoE lowering. All implementations compute the same function.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        experts, hidden, width = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_weight = nn.Parameter(torch.empty(experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts))
        self.w1 = nn.Parameter(torch.empty(experts, width, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, width, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, width))
        self.shared_experts = DenseMLP(hidden, width * config.n_shared_experts) if config.n_shared_experts else None
        self.routed_experts: RoutedExperts = routed_experts_dense

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(output, expert_ids [B, S, k], dropped)``.

        ``dropped`` is the number of (token, slot) pairs a capacity-limited implementation had no
        room for (an int64 scalar), or None for the dropless implementations.
        """
        batch, seq, size = hidden.shape
        tokens = hidden.reshape(-1, size)
        expert_ids, expert_weights = route(tokens, self.gate_weight, self.e_score_correction_bias, self.config)
        out = self.routed_experts(tokens, expert_ids, expert_weights, self.w1, self.w3, self.w2)
        dropped = None
        if isinstance(out, tuple):
            out, dropped = out
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(batch, seq, size), expert_ids.reshape(batch, seq, -1), dropped


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEBlock(config) if use_moe else DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, future: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return ``(hidden, expert_ids or None, dropped or None)``; the extra inputs come from the prologue."""
        hidden = hidden + self.attention(self.input_norm(hidden), cos, sin, future)
        normed = self.post_attention_norm(hidden)
        if isinstance(self.mlp, MoEBlock):
            mlp_out, expert_ids, dropped = self.mlp(normed)
            return hidden + mlp_out, expert_ids, dropped
        return hidden + self.mlp(normed), None, None


class MoETransformer(nn.Module):
    """A DeepSeek-style decoder: embedding, layers (dense first, then MoE), final norm, LM head.

    ``forward(input_ids [B, S] int64)`` returns ``(logits [B, S, vocab] float32, expert_ids)``
    where ``expert_ids`` is a tuple with one ``[B, S, k]`` int64 tensor per MoE layer: the experts
    each token was routed to, a diagnostic output that conformance compares across backends. With
    a capacity-limited routed-experts implementation it returns a third item, a tuple with the
    number of dropped (token, slot) pairs per MoE layer.

    It is an ``exporters.layered.LayeredModel``: :meth:`prologue`, :meth:`layer_modules`,
    :meth:`layer_kind` and :meth:`head` split ``forward`` so that the exporter can export each kind
    of layer once.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, use_moe=index >= config.first_k_dense_replace)
            for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = config.head_dim
        inverse_frequency = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def set_routed_experts(self, implementation: RoutedExperts) -> None:
        """Use ``implementation`` for the routed experts of every MoE block."""
        for block in self.moe_blocks:
            block.routed_experts = implementation

    def prologue(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(hidden [B, S, H], cos [S, head_dim], sin [S, head_dim], future [S, S] bool)``.

        ``cos``/``sin`` are the rotary tables of positions ``0..S-1`` and ``future`` marks the
        keys after each query (masked out); every layer takes them.
        """
        # Positions 0..S-1 as a running count rather than arange: ONNX shape inference follows a
        # CumSum's shape but not a Range's length, and static-shape tools (npu-sim's gears,
        # bisection) need every shape to follow from the input's.
        seq = input_ids.shape[1]
        positions = torch.ones(seq, 1, dtype=torch.float32, device=input_ids.device).cumsum(0) - 1.0  # [S, 1]
        cos, sin = rotary_tables(positions, self.inverse_frequency)
        future = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).triu(1)
        return self.embed_tokens(input_ids), cos, sin, future

    def layer_modules(self) -> list[nn.Module]:
        """The decoder layers: ``layer(hidden, cos, sin, future) -> (hidden, expert_ids, dropped)``."""
        return list(self.layers)

    def layer_kind(self, index: int) -> Hashable:
        """``("dense",)`` or ``("moe", routed_experts)``: MoE layers sharing an implementation share a kind."""
        mlp = self.layers[index].mlp
        return ("moe", mlp.routed_experts) if isinstance(mlp, MoEBlock) else ("dense",)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits ``[B, S, vocab]``."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...] | torch.Tensor, ...]:
        hidden, *shared = self.prologue(input_ids)
        routing, dropped = [], []
        for layer in self.layers:
            hidden, expert_ids, dropped_here = layer(hidden, *shared)
            if expert_ids is not None:
                routing.append(expert_ids)
            if dropped_here is not None:
                dropped.append(dropped_here)
        logits = self.head(hidden)
        return (logits, tuple(routing), tuple(dropped)) if dropped else (logits, tuple(routing))


def build_model(config: ModelConfig, seed: int = 0) -> MoETransformer:
    """Build the reference model with seeded random weights.

    The same config and seed give bit-identical weights on every run.

    Raises:
        ConfigError: for presets that exist for cost estimates only.
    """
    if config.cost_estimate_only:
        total = config.parameter_count()["total"]
        raise ConfigError(
            f"preset {config.name!r} has {total / 1e9:.0f}B parameters and exists for cost estimates only; "
            "use 'tiny' or 'small' to build a model"
        )
    model = MoETransformer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm gains around 1, perturbed so a wrong norm axis cannot go unnoticed.
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("e_score_correction_bias"):
                # Large enough to change which experts win, as DeepSeek's learned bias does.
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("gate_weight") or name.endswith("embed_tokens.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / config.hidden_size**0.5)
            else:
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    return model.eval()


def golden_inputs(config: ModelConfig, seed: int = 0, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Seeded token ids used as the bundle's golden inputs."""
    generator = torch.Generator().manual_seed(seed + 1)
    return {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=generator, dtype=torch.int64)}
