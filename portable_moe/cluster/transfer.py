"""Bundles travel to the nodes through Ray's object store, in chunks, and are verified on arrival.

The driver reads each file the (already verified) manifest lists and puts it in the object store
in chunks of at most ``chunk_bytes``, so a model with gigabytes of external data never needs one
object that large. A node writes the chunks into its own cache directory (staged, then renamed
into place, so a half-written copy is never used), then loads it with :func:`load_bundle`, which
checks every file's sha256 against the manifest before any backend compiles it. Each worker
process verifies a bundle once and keeps it for the tasks that follow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_moe import safety
from portable_moe.bundle import MANIFEST_NAME, Bundle, load_bundle
from portable_moe.errors import InputError

DEFAULT_CHUNK_BYTES = 64 * 2**20
CACHE_ENV = "PORTABLE_MOE_CLUSTER_CACHE"

# Per worker process: manifest digest -> the verified bundle (a worker runs many tasks).
_verified: dict[str, Bundle] = {}


@dataclass(frozen=True)
class ShippedBundle:
    """A bundle in the object store: the manifest itself, and each listed file as chunk references.

    Attributes:
        name: the bundle directory's name (kept on the node, so reports name it alike).
        manifest: the manifest's bytes.
        digest: sha256 of the manifest (which holds every file's sha256): the bundle's identity.
        files: relative path -> object references of its chunks, in order.
        total_bytes: the size of every listed file together.
    """

    name: str
    manifest: bytes
    digest: str
    files: dict[str, tuple[Any, ...]]
    total_bytes: int


def ship_bundle(bundle: Bundle, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ShippedBundle:
    """Put ``bundle``'s files in the object store (``ray.init`` first); chunks are at most ``chunk_bytes``.

    Raises:
        InputError: if ``chunk_bytes`` is not positive.
    """
    import ray

    if chunk_bytes < 1:
        raise InputError(f"chunk size must be a positive number of bytes, got {chunk_bytes}")
    manifest = (bundle.path / MANIFEST_NAME).read_bytes()
    files: dict[str, tuple[Any, ...]] = {}
    total = 0
    for name in bundle.manifest["files"]:
        chunks = []
        with open(bundle.path / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_bytes), b""):
                chunks.append(ray.put(chunk))
                total += len(chunk)
        files[name] = tuple(chunks)
    return ShippedBundle(bundle.path.name, manifest, hashlib.sha256(manifest).hexdigest(), files, total)


def cache_root() -> Path:
    """Where nodes keep received bundles: ``$PORTABLE_MOE_CLUSTER_CACHE`` or a folder in the temp directory."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "portable-moe-cluster"


def receive_bundle(shipped: ShippedBundle, node_id: str) -> Bundle:
    """On a node: write ``shipped`` into this node's cache (once) and load it, verifying every hash.

    Raises:
        BundleError: if a file's hash does not match the manifest (corrupted on the way), or the
            received bundle is otherwise not a valid bundle.
    """
    known = _verified.get(shipped.digest)
    if known is not None and known.path.is_dir():
        return known
    # One folder per node: nodes sharing a disk (or one machine in tests) still each receive their copy.
    target = cache_root() / node_id[:16] / f"{shipped.name}-{shipped.digest[:16]}"
    if not (target / MANIFEST_NAME).is_file():
        _write_received(shipped, target)
    bundle = load_bundle(target)
    _verified[shipped.digest] = bundle
    return bundle


def _write_received(shipped: ShippedBundle, target: Path) -> None:
    import ray

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    try:
        for name, chunks in shipped.files.items():
            path = safety.resolve_inside(staging, name, "received bundle file")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                for reference in chunks:  # one chunk in memory at a time
                    handle.write(ray.get(reference))
        (staging / MANIFEST_NAME).write_bytes(shipped.manifest)
        try:
            os.rename(staging, target)
        except OSError:  # another worker on this node received it first: use theirs
            if not (target / MANIFEST_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
