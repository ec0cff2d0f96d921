"""Text in and out of generation, with the tokenizer a Hugging Face bundle carries.

A bundle exported from a checkpoint directory that had tokenizer files carries them in
``tokenizer/`` (listed in the manifest's ``tokenizer`` entry and hashed like every file).
``tokenizer.json`` is read with the ``tokenizers`` library, imported only when text is asked for.

Needs no torch.
"""

from __future__ import annotations

from typing import Any

from portable_moe import safety
from portable_moe.bundle import Bundle
from portable_moe.errors import InputError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(bundle: Bundle) -> Any:
    """The bundle's tokenizer as a ``tokenizers.Tokenizer``.

    Raises:
        InputError: the bundle carries no ``tokenizer.json`` (use token ids instead), or the
            ``tokenizers`` library is missing.
        BundleError: the manifest's tokenizer entry points outside the bundle.
    """
    entry = bundle.manifest.get("tokenizer") or {}
    if TOKENIZER_FILE not in (entry.get("files") or []):
        raise InputError(
            f"{bundle.path} has no tokenizer ({TOKENIZER_FILE} was not in the directory it was exported from); "
            "give the prompt as token ids with --prompt-ids"
        )
    where = f"{bundle.path}: tokenizer entry"
    path = safety.resolve_inside(bundle.path, f"{entry.get('directory', '')}/{TOKENIZER_FILE}", where)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(
            "--prompt needs the tokenizers library: pip install 'portable-moe[text]' (or give --prompt-ids)"
        ) from None
    return Tokenizer.from_file(str(path))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text``, special tokens added as the tokenizer's post-processor says.

    Raises:
        InputError: the text encodes to no tokens.
    """
    ids = list(tokenizer.encode(text).ids)
    if not ids:
        raise InputError(f"the prompt {text!r} encodes to no tokens; give some text or --prompt-ids")
    return ids


class TextStream:
    """Decodes generated tokens as they come, returning only the text each new token adds.

    Tokens are decoded together (a character may span several tokens, and tokenizers join words
    with spaces or merge pieces), and each call returns the new suffix of the whole decoded text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """Take one generated token; return the text it adds (possibly empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        added = text[len(self.text) :] if text.startswith(self.text) else text
        self.text = text
        return added
