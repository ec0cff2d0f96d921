"""The cache-carrying decoder of a Hugging Face checkpoint, built from transformers' own modules.

:class:`HFCachedDecoder` has the contract of :func:`exporters.decode_graph.cached_decoder`:
``forward(input_ids, *past)`` returns ``(logits, *present, *expert_ids)``. Each layer runs
transformers' own attention module, handed a :class:`PastAndPresent` in place of a transformers
``Cache``: the attention calls its ``update`` with the new positions' cache entries, as it would a
``DynamicCache``, and gets back the past with them appended. What the attention stores is what the
graph carries:

- per-head keys and values ``[batch, key_value_heads, past, head_dim]`` for Qwen2-MoE, Qwen3-MoE
  and Mixtral (the cache layout ``per-head``, tensors ``past_key_layerN`` and ``past_value_layerN``);
- for DeepSeek-V3's multi-head latent attention, the compressed latent after its norm
  (``kv_lora_rank`` values) and the rotary key (``qk_rope_head_dim`` values), one "head" per
  token, as DeepSeek serves it: the layout ``latent``, one tensor ``past_latent_layerN``
  ``[batch, 1, past, kv_lora_rank + qk_rope_head_dim]`` per layer. The attention expands it to
  per-head keys and values at every step, as it does with transformers' own cache.

The MoE blocks are the project's lowered blocks (:class:`exporters.hf.model.LoweredMoEBlock`);
norms, rotary embeddings and the head are transformers' modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exporters.decode_graph import CACHE_BYTES_PER_VALUE, CacheLayout


def cache_layout(model: Any) -> CacheLayout:
    """The cache layout of a wrapped checkpoint (:class:`~exporters.hf.model.HFLayeredModel`), read
    from its first attention module."""
    attention = model.layers[0].self_attn
    layers = len(model.layers)
    if hasattr(attention, "kv_lora_rank"):  # DeepSeek's multi-head latent attention
        per_head = attention.qk_head_dim + attention.v_head_dim
        expanded = CACHE_BYTES_PER_VALUE * layers * attention.num_heads * per_head
        width = attention.kv_lora_rank + attention.qk_rope_head_dim
        return CacheLayout("latent", layers, 1, width, ("latent",), expanded_bytes_per_token=expanded)
    return CacheLayout("per-head", layers, attention.config.num_key_value_heads, attention.head_dim)


class PastAndPresent:
    """Stands in for a transformers ``Cache`` for one layer and one step.

    ``update(new_key, new_value, layer_idx)`` returns the past with the new entries appended along
    the position axis and keeps them as :attr:`present`. For the latent layout the past is one
    tensor holding both entries side by side (``split`` gives their widths).

    Args:
        past: the layer's past tensors, in layout order.
        split: for the latent layout, the widths of the two entries in the one past tensor.
    """

    def __init__(self, past: tuple[torch.Tensor, ...], split: list[int] | None = None) -> None:
        self.past = past
        self.split = split
        self.present: tuple[torch.Tensor, ...] = ()

    def update(
        self, new_key: torch.Tensor, new_value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split:  # one Concat(past, new) along the positions, which a preallocated cache rewrites
            latent = torch.cat((self.past[0], torch.cat((new_key, new_value), dim=-1)), dim=2)
            self.present = (latent,)
            key, value = torch.split(latent, self.split, dim=-1)
            return key, value
        key = torch.cat((self.past[0], new_key), dim=2)
        value = torch.cat((self.past[1], new_value), dim=2)
        self.present = (key, value)
        return key, value


class HFCachedDecoder(nn.Module):
    """A wrapped checkpoint as a one-step decoder with a cache (see the module docstring).

    ``forward(input_ids [B, new], *past)`` takes the past tensors of every layer in layout order
    and returns ``(logits [B, new, vocab], *present, *expert_ids [B, new, k])``. New tokens sit at
    positions ``past .. past + new - 1``; the additive mask lets each attend every past position
    and the new ones up to its own (0 where visible, the dtype's minimum elsewhere, as transformers'
    eager mask).

    Args:
        model: an :class:`~exporters.hf.model.HFLayeredModel` (its modules and weights are shared).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.layout = cache_layout(model)
        attention = model.layers[0].self_attn
        self.split = [attention.kv_lora_rank, attention.qk_rope_head_dim] if self.layout.form == "latent" else None

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, parts = self.model, len(self.layout.parts)
        hidden = model.embed_tokens(input_ids)
        past_length, new = past[0].shape[2], input_ids.shape[1]
        positions = (torch.arange(new, device=input_ids.device) + past_length).unsqueeze(0)
        cos, sin = model.rotary_emb(hidden, positions)
        future = torch.arange(past_length + new)[None, :] > positions[0][:, None]
        mask = torch.zeros(future.shape, dtype=hidden.dtype).masked_fill(future, torch.finfo(hidden.dtype).min)
        present: list[torch.Tensor] = []
        routing: list[torch.Tensor] = []
        for index, layer in enumerate(model.layers):
            cache = PastAndPresent(past[parts * index : parts * (index + 1)], self.split)
            hidden, expert_ids, _ = layer(hidden, cos, sin, mask[None, None], cache)
            if expert_ids is not None:
                routing.append(expert_ids)
            present += cache.present
        return (model.head(hidden), *present, *routing)
