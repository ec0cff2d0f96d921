"""A checkpoint's tokenizer files, copied into its bundle so that ``generate --prompt "text"`` works.

The files go to ``tokenizer/`` inside the bundle, where the manifest's table of sha256 hashes
covers them like every other file; the manifest's ``tokenizer`` entry lists them. Running a bundle
reads ``tokenizer.json`` with the ``tokenizers`` library (:mod:`portable_moe.run.text`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKENIZER_DIRECTORY = "tokenizer"
# What save_pretrained writes for a tokenizer (fast and slow forms); other files are not copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def copy_tokenizer(source: str | os.PathLike[str], staging: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Copy the tokenizer files of checkpoint directory ``source`` into the staged bundle.

    Returns:
        ``{"tokenizer": {"directory": "tokenizer", "files": [...]}}`` for the manifest, or ``{}``
        when the checkpoint has no tokenizer files.
    """
    found = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    if not found:
        say("no tokenizer files in the checkpoint: the bundle takes token ids only (--prompt-ids)")
        return {}
    target = staging / TOKENIZER_DIRECTORY
    target.mkdir()
    for name in found:
        shutil.copyfile(Path(source) / name, target / name)
    say(f"tokenizer copied into the bundle ({', '.join(found)})")
    return {"tokenizer": {"directory": TOKENIZER_DIRECTORY, "files": found}}
