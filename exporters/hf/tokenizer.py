"""A checkpoint's tokenizer files, copied into its bundle so that ``generate --prompt "text"`` works.

The files go to ``tokenizer/`` inside the bundle, where the manifest's table of sha256 hashes
covers them like every other file; the manifest's ``tokenizer`` entry lists them. Running a bundle
reads ``tokenizer.json`` with the ``tokenizers`` library (:mod:`portable_moe.run.text`).

A checkpoint whose tokenizer is a sentencepiece ``tokenizer.model`` without ``tokenizer.json`` gets
one made at export: transformers loads the tokenizer as its ``tokenizer_config.json`` says (reading
the sentencepiece model) and saves it in the ``tokenizers`` form, so that running the bundle needs
only the ``tokenizers`` library, as for every other bundle.
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
    entry: dict[str, Any] = {"directory": TOKENIZER_DIRECTORY, "files": found}
    if (
        "tokenizer.json" not in found
        and "tokenizer.model" in found
        and _write_tokenizer_json(Path(source), target, say)
    ):
        entry["files"] = [*found, "tokenizer.json"]
        entry["made"] = {"tokenizer.json": "from tokenizer.model, by transformers at export"}
    return {"tokenizer": entry}


def _write_tokenizer_json(source: Path, target: Path, say: Callable[[str], None]) -> bool:
    """Write ``tokenizer.json`` into ``target`` from the sentencepiece tokenizer of ``source``.

    Returns:
        Whether it was written. When transformers cannot load the tokenizer (no ``sentencepiece``
        package, an unreadable ``tokenizer.model``) the export goes on and says why: the bundle then
        takes token ids only, and ``generate --prompt`` says so.
    """
    import tempfile

    import transformers

    say("making tokenizer.json from the sentencepiece tokenizer.model")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer.save_pretrained(scratch)
            made = Path(scratch) / "tokenizer.json"
            if not made.is_file():
                raise ValueError(f"{type(tokenizer).__name__}.save_pretrained wrote no tokenizer.json")
            shutil.copyfile(made, target / "tokenizer.json")
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        say(
            f"warning: tokenizer.json could not be made from tokenizer.model ({reason}); the bundle takes token "
            "ids only. Install the hf extra (pip install 'portable-moe[hf]', which brings sentencepiece) and "
            "export again for --prompt"
        )
        return False
    return True
