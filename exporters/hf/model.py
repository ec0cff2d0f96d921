"""A transformers MoE model as a :class:`~exporters.layered.LayeredModel`, with our MoE lowerings.

Embeddings, rotary embeddings, attention and norms are transformers' own modules, run as they are
(eager attention). Each MoE block is replaced by :class:`LoweredMoEBlock`, which keeps the block's
router and shared-expert modules, computes the routing as transformers does (see
:mod:`exporters.hf.architectures`) and hands the routed experts to the chosen lowering, fed the
block's expert weights.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from exporters.hf.architectures import Architecture
from exporters.reference_model import RoutedExperts, routed_experts_dense
from portable_moe.config import ModelConfig


class LoweredMoEBlock(nn.Module):
    """One transformers MoE block, routed as transformers does, with a swappable routed-experts part.

    ``forward(hidden [B, S, H])`` returns ``(output, expert_ids [B, S, k], dropped or None)``, as the
    reference model's MoE block does.
    """

    def __init__(self, hf_block: nn.Module, architecture: Architecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.gate = hf_block.gate
        experts = hf_block.experts
        width = experts.intermediate_dim
        # Separate contiguous w1/w3 so every lowering sees the [E, I, H] tensors it was written for.
        self.w1 = nn.Parameter(experts.gate_up_proj.data[:, :width].contiguous(), requires_grad=False)
        self.w3 = nn.Parameter(experts.gate_up_proj.data[:, width:].contiguous(), requires_grad=False)
        self.w2 = nn.Parameter(experts.down_proj.data, requires_grad=False)
        # This block now owns the expert weights: drop the fused copy so that memory stays ~1x the weights.
        del experts.gate_up_proj
        for name in architecture.shared_modules:
            setattr(self, name, getattr(hf_block, name))
        self.routed_experts: RoutedExperts = routed_experts_dense

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch, seq, size = hidden.shape
        tokens = hidden.reshape(-1, size)
        expert_ids, expert_weights = self.architecture.router(self.gate, tokens)
        out = self.routed_experts(tokens, expert_ids, expert_weights, self.w1, self.w3, self.w2)
        dropped = None
        if isinstance(out, tuple):
            out, dropped = out
        if self.architecture.shared is not None:
            out = out + self.architecture.shared(self, tokens)
        return out.reshape(batch, seq, size), expert_ids.reshape(batch, seq, -1), dropped


class DecoderLayer(nn.Module):
    """A transformers decoder layer (pre-norm attention, then pre-norm feed-forward, both residual)
    whose feed-forward is either transformers' dense MLP or a :class:`LoweredMoEBlock`."""

    def __init__(self, hf_layer: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = hf_layer.input_layernorm
        self.self_attn = hf_layer.self_attn
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.mlp = mlp

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One layer on ``hidden``; ``cache`` is what transformers' attention takes as its cache (None:
        no cache; :class:`exporters.hf.decoder.PastAndPresent` for the cache-carrying decoder)."""
        # The cache goes by position: transformers 5 renamed that argument (past_key_values -> cache).
        attended, _ = self.self_attn(self.input_layernorm(hidden), (cos, sin), mask, cache)
        hidden = hidden + attended
        normed = self.post_attention_layernorm(hidden)
        if isinstance(self.mlp, LoweredMoEBlock):
            out, expert_ids, dropped = self.mlp(normed)
            return hidden + out, expert_ids, dropped
        return hidden + self.mlp(normed), None, None


class HFLayeredModel(nn.Module):
    """A transformers causal LM as prologue -> layers -> head, returning the reference model's outputs.

    ``forward(input_ids [B, S])`` returns ``(logits, expert_ids per MoE layer)`` and, with a
    capacity-limited lowering, a third item with the dropped slots per MoE layer.
    """

    def __init__(self, hf_model: nn.Module, architecture: Architecture, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.architecture = architecture
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        moe = set(config.moe_layer_indices)
        self.layers = nn.ModuleList(
            DecoderLayer(layer, LoweredMoEBlock(layer.mlp, architecture) if index in moe else layer.mlp)
            for index, layer in enumerate(inner.layers[: config.num_hidden_layers])
        )

    @property
    def moe_blocks(self) -> list[LoweredMoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, LoweredMoEBlock)]

    def cached_decoder(self) -> nn.Module:
        """This model as a one-step decoder with a key/value cache (:class:`exporters.hf.decoder.HFCachedDecoder`)."""
        from exporters.hf.decoder import HFCachedDecoder

        return HFCachedDecoder(self).eval()

    def set_routed_experts(self, implementation: RoutedExperts) -> None:
        """Use ``implementation`` (a lowering's routed experts) in every MoE block."""
        for block in self.moe_blocks:
            block.routed_experts = implementation

    def prologue(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(hidden, cos, sin, mask)``: embeddings, transformers' rotary embedding at positions
        0..S-1, and the additive causal mask [1, 1, S, S] (0 where visible, the dtype's minimum
        elsewhere, as transformers' eager mask)."""
        hidden = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(hidden, positions)
        mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        return hidden, cos, sin, mask.triu(1)[None, None]

    def layer_modules(self) -> list[nn.Module]:
        return list(self.layers)

    def layer_kind(self, index: int) -> Hashable:
        return "moe" if isinstance(self.layers[index].mlp, LoweredMoEBlock) else "dense"

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: torch.Tensor) -> tuple[Any, ...]:
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
