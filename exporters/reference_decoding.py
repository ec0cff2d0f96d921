"""The torch reference model decoding with a key/value cache in eager mode: the baseline of
``bench --decode``.

Its MoE blocks run each expert only on the tokens routed to it (the loop implementation), as an
eager deployment would; the cache stays in torch tensors between steps. Imports torch when built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_moe.config import ModelConfig


class TorchEagerDecoder:
    """The reference model (``config``, ``seed``) as a decode engine (see :mod:`portable_moe.perf.decode_bench`).

    Args:
        config: the bundle's model config.
        seed: the bundle's weight seed (same weights as the bundle).
        threads: torch intra-op threads (0: torch's default).
    """

    name = "torch eager"

    def __init__(self, config: ModelConfig, seed: int = 0, threads: int = 0) -> None:
        import torch

        from exporters.decode_graph import cached_decoder
        from exporters.reference_model import build_model, routed_experts_loop

        if threads:
            torch.set_num_threads(threads)
        model = build_model(config, seed)
        model.set_routed_experts(routed_experts_loop)
        self.config = config
        self.decoder = cached_decoder(model)

    def empty_cache(self, batch: int, positions: int) -> list[Any]:
        """Zero-length keys and values per layer (``positions`` is not needed: torch grows the cache)."""
        import torch

        shape = (batch, self.config.num_attention_heads, 0, self.config.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.config.num_hidden_layers)]

    def step(self, input_ids: np.ndarray, cache: list[Any]) -> list[Any]:
        """One step; returns the present keys and values (torch tensors)."""
        import torch

        with torch.inference_mode():
            outputs = self.decoder(torch.from_numpy(input_ids), *cache)
        return list(outputs[1 : 1 + len(cache)])
