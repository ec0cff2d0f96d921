"""A Hugging Face checkpoint decoding with transformers' own cache in eager mode: the baseline of
``bench --decode`` for bundles exported from a checkpoint.

The model is the unmodified transformers model the bundle's golden data came from (eager
attention, transformers' eager experts, which run each expert only on its tokens), with a
``DynamicCache`` kept in torch tensors between steps. The checkpoint is checked against the
bundle's manifest (the sha256 of every weight file the export read) before it is timed, so the
baseline is the same model as the bundle. Imports torch and transformers when built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from portable_moe.bundle import Bundle
from portable_moe.errors import InputError


def check_checkpoint_matches(bundle: Bundle, directory: str | os.PathLike[str]) -> Path:
    """The checkpoint directory, once its weight files are the ones ``bundle`` was exported from.

    Raises:
        InputError: the bundle was not exported from a checkpoint, the directory is missing, or a
            weight file is missing or differs (its sha256) from what the manifest records.
    """
    from portable_moe.bundle import sha256_of

    source = bundle.manifest.get("source") or {}
    if source.get("kind") != "huggingface":
        raise InputError(f"{bundle.path} was not exported from a Hugging Face checkpoint; leave out --hf")
    path = Path(directory)
    if not path.is_dir():
        raise InputError(f"--hf {directory}: no such directory (the checkpoint {bundle.path} was exported from)")
    for name, expected in sorted((source.get("weight_files") or {}).items()):
        file = path / name
        if not file.is_file():
            raise InputError(
                f"--hf {directory}: {name} is missing; {bundle.path} was exported from a checkpoint with it"
            )
        if sha256_of(file) != expected:
            raise InputError(
                f"--hf {directory}: {name} differs from the file {bundle.path} was exported from (sha256); "
                "give the checkpoint directory the bundle was exported from"
            )
    return path


class TransformersEagerDecoder:
    """The checkpoint in ``directory`` as a decode engine (see :mod:`portable_moe.perf.decode_bench`).

    Args:
        directory: the checkpoint directory (see :func:`check_checkpoint_matches`).
        threads: torch intra-op threads (0: torch's default).
    """

    name = "transformers eager"

    def __init__(self, directory: str | os.PathLike[str], threads: int = 0) -> None:
        import torch

        from exporters.hf.loading import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.model = load_checkpoint(directory).hf_model

    def empty_cache(self, batch: int, positions: int) -> Any:
        """An empty ``DynamicCache`` (``batch`` and ``positions`` are not needed: it grows)."""
        import transformers

        return transformers.DynamicCache(config=self.model.config)

    def step(self, input_ids: np.ndarray, cache: Any) -> Any:
        """One step; the cache holds the new positions afterwards."""
        import torch

        ids = torch.from_numpy(input_ids)
        past = cache.get_seq_length()
        positions = torch.arange(past, past + ids.shape[1]).expand(ids.shape[0], -1)
        with torch.inference_mode():
            self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions)
        return cache
