"""The bundle: the portable artifact that export writes and every backend runs.

A bundle is a directory::

    model.onnx                      the graph (plus external data files when large)
    manifest.json                   format version, config, lowering, specs, versions, sha256 of every file
    test_data_set_0/input_0.pb ...  golden inputs and outputs from the torch reference, in ONNX's
                     output_0.pb    own test-data layout (TensorProto files)

Loading needs only numpy and onnx (never torch) and verifies every file's hash, so a tampered,
truncated or incomplete bundle is refused before any backend sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from portable_moe.config import ModelConfig
from portable_moe.errors import BundleError, ConfigError
from portable_moe.tensors import TensorSpec

BUNDLE_FORMAT = "portable-moe-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"

GoldenSet = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(directory: Path) -> list[str]:
    """Every regular file below ``directory`` except the manifest, as sorted POSIX relative paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME
    )


@dataclass
class Bundle:
    """A loaded (and, by default, verified) bundle.

    Attributes:
        path: the bundle directory.
        manifest: the parsed manifest.json.
        inputs / outputs: the model's tensor specs.
        config: the model config the bundle was exported from (None for a bare ONNX model).
        moe_lowering: how the routed experts were lowered ("dense", "sparse", ...), or None.
        routing_outputs: output name -> decoder layer index, for outputs that carry selected experts.
    """

    path: Path
    manifest: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: ModelConfig | None = None
    moe_lowering: str | None = None
    routing_outputs: dict[str, int] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model_file"]

    @property
    def name(self) -> str:
        return self.path.name

    def load_onnx(self, load_external_data: bool = True) -> onnx.ModelProto:
        """Read the ONNX graph (with its external data unless told otherwise).

        Raises:
            BundleError: if the file is not a readable ONNX model.
        """
        try:
            return onnx.load(str(self.model_path), load_external_data=load_external_data)
        except Exception as error:  # onnx raises DecodeError, OSError, ValueError... for bad files
            raise BundleError(f"{self.model_path}: not a readable ONNX model ({error})") from None

    def golden_sets(self) -> list[GoldenSet]:
        """The golden (inputs, expected outputs) pairs, keyed by tensor name."""
        return [
            (_read_tensors(self.path / entry["dir"], "input"), _read_tensors(self.path / entry["dir"], "output"))
            for entry in self.manifest.get("golden", [])
        ]


def _read_tensors(directory: Path, prefix: str) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    index = 0
    while (path := directory / f"{prefix}_{index}.pb").exists():
        proto = onnx.TensorProto()
        try:
            proto.ParseFromString(path.read_bytes())
            tensors[proto.name] = numpy_helper.to_array(proto)
        except Exception as error:
            raise BundleError(f"{path}: not a readable TensorProto ({error})") from None
        index += 1
    return tensors


def _write_tensors(directory: Path, prefix: str, tensors: Mapping[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, (name, value) in enumerate(tensors.items()):
        (directory / f"{prefix}_{index}.pb").write_bytes(
            numpy_helper.from_array(np.asarray(value), name).SerializeToString()
        )


@contextlib.contextmanager
def bundle_writer(output_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Stage a bundle in a temporary directory and move it into place only when complete.

    The staging directory sits beside ``output_dir`` (same file system, so the final rename is
    atomic). If the block raises, or the process is interrupted, the staging directory is removed
    and ``output_dir`` is left as it was.

    Raises:
        BundleError: if ``output_dir`` exists and ``overwrite`` is false.
    """
    target = Path(output_dir)
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; choose another directory or pass overwrite (--force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if not (staging / MANIFEST_NAME).exists():
            raise BundleError(f"internal error: bundle staged in {staging} has no {MANIFEST_NAME}")
        if target.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
            os.replace(target, previous / "old")
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(
    staging: Path,
    *,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    golden: list[GoldenSet],
    config: ModelConfig | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the golden data and the manifest (with every file's sha256) into a staged bundle.

    Call last, after the model files are in ``staging``.
    """
    golden_entries = []
    for index, (golden_inputs, golden_outputs) in enumerate(golden):
        directory = f"test_data_set_{index}"
        _write_tensors(staging / directory, "input", golden_inputs)
        _write_tensors(staging / directory, "output", golden_outputs)
        golden_entries.append({"dir": directory, "inputs": len(golden_inputs), "outputs": len(golden_outputs)})
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_file": MODEL_NAME,
        "config": config.to_dict() if config else None,
        **extra,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
        "golden": golden_entries,
        "files": {name: sha256_of(staging / name) for name in _bundle_files(staging)},
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def _verify_files(directory: Path, manifest: Mapping[str, Any]) -> None:
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"{directory / MANIFEST_NAME}: has no 'files' table of sha256 hashes")
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{directory}: file {name!r} listed in the manifest is missing; re-export the bundle")
        if sha256_of(path) != expected:
            raise BundleError(
                f"{path}: sha256 does not match the manifest; the file was changed or corrupted after export. "
                "Re-export the bundle, or restore the original file"
            )
    unlisted = sorted(set(_bundle_files(directory)) - set(listed))
    if unlisted:
        raise BundleError(
            f"{directory}: file(s) not in the manifest: {', '.join(unlisted)}; a bundle must contain only the files it lists"
        )


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Load a bundle directory.

    Args:
        path: the bundle directory.
        verify: check every file's sha256 against the manifest (on by default).

    Raises:
        BundleError: if the directory, its manifest or a listed file is missing, the format is
            unknown or newer than this version of portable-moe, or a hash does not match.
    """
    directory = Path(path)
    if not directory.exists():
        raise BundleError(f"{directory}: no such bundle directory; create one with 'portable-moe export'")
    if not directory.is_dir():
        raise BundleError(f"{directory}: a bundle is a directory (with {MANIFEST_NAME} and {MODEL_NAME}), not a file")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{directory}: no {MANIFEST_NAME}; this is not a portable-moe bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a portable-moe bundle manifest (no format {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format version {version!r} is not supported (this portable-moe reads "
            f"version {BUNDLE_FORMAT_VERSION}); re-export the bundle or upgrade portable-moe"
        )
    if verify:
        _verify_files(directory, manifest)
    try:
        config = ModelConfig.from_dict(manifest["config"]) if manifest.get("config") else None
        inputs = [TensorSpec.from_dict(entry) for entry in manifest["inputs"]]
        outputs = [TensorSpec.from_dict(entry) for entry in manifest["outputs"]]
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise BundleError(f"{manifest_path}: malformed manifest ({error})") from None
    if not isinstance(manifest.get("model_file"), str):
        raise BundleError(f"{manifest_path}: malformed manifest (no 'model_file')")
    return Bundle(
        path=directory,
        manifest=manifest,
        inputs=inputs,
        outputs=outputs,
        config=config,
        moe_lowering=manifest.get("moe_lowering"),
        routing_outputs={str(name): int(layer) for name, layer in manifest.get("routing_outputs", {}).items()},
    )
