"""The offline-compile cache: one artifact per (model, gear, options), checked before it is trusted.

Layout::

    <cache_dir>/<model sha256[:24]>/<gear>-<options digest[:16]>.onnx   the compiled (transformed) model
    <cache_dir>/<model sha256[:24]>/<gear>-<options digest[:16]>.json   its sha256, size and compile analysis

Each file is written to a temporary file in the same directory and moved into place with
``os.replace``, artifact first, so a reader never sees half a file and concurrent compiles of the
same entry (which write identical bytes) cannot corrupt it. An entry whose artifact is missing,
truncated or does not match its recorded sha256 is reported as corrupt and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY_FORMAT = "portable-moe/npu-sim-artifact"
ENTRY_VERSION = 1


def default_cache_dir() -> Path:
    """``$PORTABLE_MOE_CACHE/npu-sim`` if that variable is set, else ``~/.cache/portable-moe/npu-sim``."""
    root = os.environ.get("PORTABLE_MOE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "portable-moe") / "npu-sim"


@dataclass
class CacheEntry:
    """A verified artifact and its metadata."""

    artifact: Path
    meta: dict[str, Any]


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ArtifactCache:
    """Artifacts of compiled gears under one directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def paths(self, model_digest: str, key: str) -> tuple[Path, Path]:
        folder = self.directory / model_digest[:24]
        return folder / f"{key}.onnx", folder / f"{key}.json"

    def load(self, model_digest: str, key: str) -> tuple[str, CacheEntry | None]:
        """Look an entry up and verify it.

        Returns:
            ``("hit", entry)``, ``("miss", None)``, or ``("corrupt: <why>", None)``.
        """
        artifact, meta_path = self.paths(model_digest, key)
        if not artifact.exists() and not meta_path.exists():
            return "miss", None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"corrupt: metadata unreadable ({type(error).__name__})", None
        if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT or meta.get("version") != ENTRY_VERSION:
            return "corrupt: metadata of an unknown format", None
        try:
            data = artifact.read_bytes()
        except OSError as error:
            return f"corrupt: artifact unreadable ({type(error).__name__})", None
        if len(data) != meta.get("bytes"):
            return f"corrupt: artifact has {len(data)} bytes, expected {meta.get('bytes')} (truncated?)", None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return "corrupt: artifact sha256 does not match its metadata", None
        return "hit", CacheEntry(artifact, meta)

    def store(self, model_digest: str, key: str, data: bytes, meta: dict[str, Any]) -> CacheEntry:
        """Write an artifact and its metadata atomically (artifact first)."""
        artifact, meta_path = self.paths(model_digest, key)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        full_meta = {
            "format": ENTRY_FORMAT,
            "version": ENTRY_VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            **meta,
        }
        _atomic_write(artifact, data)
        _atomic_write(meta_path, (json.dumps(full_meta, indent=1) + "\n").encode())
        return CacheEntry(artifact, full_meta)
