"""The bundle: the portable artifact that export writes and every backend runs.

A bundle is a directory::

    model.onnx                      the graph (plus external data files when large)
    manifest.json                   format version, config, lowering, specs, versions, sha256 of every file
    test_data_set_0/input_0.pb ...  golden inputs and outputs from the torch reference, in ONNX's
                     output_0.pb    own test-data layout (TensorProto files)

Loading needs only numpy and onnx (never torch). A bundle may come from anywhere, so loading
treats it as hostile until checked: the manifest's structure, every path it names (which must stay
inside the bundle), the total size (see :mod:`portable_moe.safety`), every file's sha256, and the
model itself (parsed, checked, and compared with what the manifest says of it) are verified before
any backend sees it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from portable_moe import safety
from portable_moe.config import ModelConfig
from portable_moe.errors import BundleError, ConfigError
from portable_moe.tensors import TensorSpec, specs_from_onnx

BUNDLE_FORMAT = "portable-moe-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
# A manifest is a few kilobytes; one far bigger is not a manifest (and would be parsed into memory).
MAX_MANIFEST_BYTES = 16 * 2**20
# How often a writer retries when other processes keep replacing the same target.
_MOVE_ATTEMPTS = 100
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What rename() reports when something already occupies the target.
_TARGET_IN_THE_WAY = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}

GoldenSet = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk_error(error: OSError) -> None:
    raise BundleError(f"{error.filename}: cannot be read ({error.strerror})")


def scan_bundle_files(directory: Path) -> dict[str, int]:
    """Every file below ``directory`` except the top-level manifest: relative POSIX path -> size.

    A bundle holds only regular files. A symlink to a file inside the bundle counts as that file;
    a symlink that leads out of the bundle, a symlinked directory, or a special file (a FIFO would
    hang a reader) is refused.

    Raises:
        BundleError: naming the offending entry.
    """
    found: dict[str, int] = {}
    for current, directory_names, file_names in os.walk(directory, onerror=_walk_error):
        here = Path(current)
        for name in directory_names:
            if (here / name).is_symlink():
                raise BundleError(f"{here / name}: a bundle may not contain symlinked directories")
        for name in file_names:
            path = here / name
            relative = path.relative_to(directory).as_posix()
            if relative == MANIFEST_NAME:
                continue
            if path.is_symlink():
                safety.resolve_inside(directory, relative, f"{directory}: symlink")
            try:
                info = path.stat()
            except OSError as error:
                raise BundleError(f"{path}: cannot be read ({error.strerror})") from None
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{path}: not a regular file; a bundle holds only regular files")
            found[relative] = info.st_size
    return dict(sorted(found.items()))


def _bundle_files(directory: Path) -> list[str]:
    """Every file below ``directory`` except the manifest, as sorted POSIX relative paths."""
    return list(scan_bundle_files(directory))


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
        max_bytes: the size limit applied when loading the model (None: the default, see
            :func:`portable_moe.safety.max_bundle_bytes`).
    """

    path: Path
    manifest: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: ModelConfig | None = None
    moe_lowering: str | None = None
    routing_outputs: dict[str, int] = field(default_factory=dict)
    max_bytes: int | None = None

    @property
    def model_path(self) -> Path:
        """The model file (checked to lie inside the bundle directory).

        Raises:
            BundleError: if the manifest's ``model_file`` would leave the bundle.
        """
        model_file = self.manifest.get("model_file")
        safety.resolve_inside(self.path, model_file, f"{self.path / MANIFEST_NAME}: model_file")
        return self.path / str(model_file)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def weight_format(self) -> str:
        """The weights' format key ("float32", "float16", "int8/channel", "int4/block", ...), from the manifest."""
        weights = self.manifest.get("weights")
        key = weights.get("key") if isinstance(weights, dict) else None
        return key if isinstance(key, str) else "float32"

    def load_onnx(self, load_external_data: bool = True) -> onnx.ModelProto:
        """Read the ONNX graph (with its external data unless told otherwise), checking it first.

        The file is size-checked, parsed, checked (IR version, opsets, tensor shapes, external
        data locations, declared sizes) and compared with the manifest before any external data
        is read; see :func:`portable_moe.safety.load_model`.

        Raises:
            BundleError: if the file is not a readable, sane ONNX model, refers to files outside
                the bundle, is over the size limit, or does not match the manifest.
        """
        model = safety.load_model(
            self.model_path, root=self.path, max_bytes=self.max_bytes, load_external_data=load_external_data
        )
        self._check_matches_manifest(model)
        return model

    def _check_matches_manifest(self, model: onnx.ModelProto) -> None:
        if not (self.inputs or self.outputs):
            return  # a bare .onnx file: there is no manifest to disagree with
        where = f"{self.path / MANIFEST_NAME}"
        model_inputs, model_outputs = specs_from_onnx(model, source=str(self.model_path))
        for kind, listed, actual in (("inputs", self.inputs, model_inputs), ("outputs", self.outputs, model_outputs)):
            if listed != actual:
                raise BundleError(
                    f"{where}: the manifest lists {kind} {_describe_specs(listed)} but "
                    f"{self.manifest.get('model_file')} has {_describe_specs(actual)}; the manifest does not belong "
                    "to this model. Re-export the bundle"
                )
        opsets = {opset.domain or "ai.onnx": opset.version for opset in model.opset_import}
        for key, actual in (("opset", opsets.get("ai.onnx")), ("ir_version", model.ir_version)):
            listed = self.manifest.get(key)
            if listed is not None and listed != actual:
                raise BundleError(f"{where}: the manifest says {key} {listed!r}, the model has {actual!r}")
        logits = next((spec for spec in self.outputs if spec.name == "logits"), None)
        if self.config and logits and logits.shape and isinstance(logits.shape[-1], int):
            if logits.shape[-1] != self.config.vocab_size:
                raise BundleError(
                    f"{where}: the config's vocab_size {self.config.vocab_size} does not match the model's logits "
                    f"size {logits.shape[-1]}"
                )

    def golden_sets(self) -> list[GoldenSet]:
        """The golden (inputs, expected outputs) pairs, keyed by tensor name.

        Raises:
            BundleError: if a golden directory lies outside the bundle or a file is not a sane TensorProto.
        """
        sets = []
        for entry in self.manifest.get("golden", []):
            where = f"{self.path / MANIFEST_NAME}: golden-data directory"
            directory = safety.resolve_inside(self.path, entry.get("dir"), where)
            sets.append((read_tensors(directory, "input"), read_tensors(directory, "output")))
        return sets


def _describe_specs(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{spec.name!r}: {spec.describe()}" for spec in specs) or "none"


def read_tensors(directory: Path, prefix: str) -> dict[str, np.ndarray]:
    """The TensorProto files ``PREFIX_0.pb, PREFIX_1.pb ...`` of a directory, by tensor name, each checked as untrusted.

    Raises:
        BundleError: if a file is not a sane, inline TensorProto.
    """
    tensors: dict[str, np.ndarray] = {}
    index = 0
    while (path := directory / f"{prefix}_{index}.pb").exists():
        proto = onnx.TensorProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception as error:  # DecodeError, or OSError for an unreadable file
            raise BundleError(f"{path}: not a readable TensorProto ({error})") from None
        # Golden data is always inline: an external reference here could read any file.
        safety.check_tensor(proto, f"{path}: tensor {proto.name!r}", root=None, base=None)
        try:
            tensors[proto.name] = numpy_helper.to_array(proto)
        except Exception as error:
            raise BundleError(f"{path}: not a readable TensorProto ({error})") from None
        index += 1
    return tensors


def write_tensors(directory: Path, prefix: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` as ``PREFIX_0.pb, PREFIX_1.pb ...`` (ONNX's test-data layout) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, (name, value) in enumerate(tensors.items()):
        (directory / f"{prefix}_{index}.pb").write_bytes(
            numpy_helper.from_array(np.asarray(value), name).SerializeToString()
        )


def _remove_tree(path: Path) -> None:
    """Remove a directory, finishing the job even if a second Ctrl-C or SIGTERM lands meanwhile."""
    interrupted: BaseException | None = None
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except KeyboardInterrupt as error:
            interrupted = error
    if interrupted is not None:
        raise interrupted


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where the OS tells it)."""
    try:
        with open("/proc/self/status") as status:  # Linux: no window where the mask is changed
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Interruption signals (Ctrl-C, SIGTERM) received by the handlers of portable_moe.run.termination.
_INTERRUPTIONS = [0]


def note_interruption() -> None:
    """Count an interruption signal; the termination handlers call it before raising.

    The KeyboardInterrupt a signal raises can be lost: raised while a finalizer runs (a ``__del__``
    or weakref callback the garbage collector started), Python prints it and carries on. A bundle
    being written when a signal arrives is not moved into place even then (see :func:`bundle_writer`).
    """
    _INTERRUPTIONS[0] += 1


@contextlib.contextmanager
def bundle_writer(output_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Stage a bundle in a temporary directory and move it into place only when complete.

    The staging directory sits beside ``output_dir`` (same file system, so the final rename is
    atomic). If the block raises, or the process is interrupted (Ctrl-C; SIGTERM once
    :func:`portable_moe.run.termination.install_termination_handler` is installed), the staging directory is
    removed and ``output_dir`` is left as it was. Several processes writing the same target with
    ``overwrite`` each leave one whole bundle there (the last one to finish wins).

    Raises:
        BundleError: if ``output_dir`` exists and ``overwrite`` is false.
    """
    target = Path(output_dir)
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; choose another directory or pass overwrite (--force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    # mkdtemp makes the directory private (0700); a bundle is shared like any directory the user makes.
    staging.chmod(0o777 & ~current_umask())
    interruptions = _INTERRUPTIONS[0]
    try:
        yield staging
        if _INTERRUPTIONS[0] != interruptions:  # a signal arrived and its KeyboardInterrupt was lost
            raise KeyboardInterrupt("interrupted while the bundle was written")
        if not (staging / MANIFEST_NAME).exists():
            raise BundleError(f"internal error: bundle staged in {staging} has no {MANIFEST_NAME}")
        _move_into_place(staging, target, overwrite)
    except BaseException:
        _remove_tree(staging)
        raise


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; with ``overwrite``, move the old bundle aside first.

    Between moving the old bundle aside and renaming the new one in, another writer may put its
    own bundle there: then that one is moved aside in turn (the last writer wins, and every
    bundle that lands is whole). If interrupted in between, the old bundle is put back.
    """
    holders: list[Path] = []
    placed = False
    try:
        for _ in range(_MOVE_ATTEMPTS):
            try:
                os.rename(staging, target)  # fails while a non-empty target exists
                placed = True
                return
            except OSError as error:
                # Judge by the error, not by looking again: another writer may have moved it meanwhile.
                if error.errno not in _TARGET_IN_THE_WAY:
                    raise BundleError(
                        f"{target}: cannot move the staged bundle into place ({error.strerror})"
                    ) from None
            if not overwrite:
                raise BundleError(f"{target} already exists; choose another directory or pass overwrite (--force)")
            holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
            holders.append(holder)
            with contextlib.suppress(FileNotFoundError):  # another writer moved it away first
                os.rename(target, holder / "old")
        raise BundleError(f"{target}: other processes kept replacing it; gave up after {_MOVE_ATTEMPTS} attempts")
    finally:
        if not placed and not os.path.lexists(target):
            for holder in reversed(holders):  # put the most recently displaced bundle back
                with contextlib.suppress(OSError):
                    os.rename(holder / "old", target)
                    break
        for holder in holders:
            _remove_tree(holder)


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
        write_tensors(staging / directory, "input", golden_inputs)
        write_tensors(staging / directory, "output", golden_outputs)
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


def _check_relative_names(directory: Path, manifest_path: Path, manifest: Mapping[str, Any]) -> None:
    """Every path the manifest names must stay inside the bundle; checked before anything is opened."""
    model_file = manifest.get("model_file")
    if not isinstance(model_file, str):
        raise BundleError(f"{manifest_path}: malformed manifest (no 'model_file')")
    safety.resolve_inside(directory, model_file, f"{manifest_path}: model_file")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"{manifest_path}: has no 'files' table of sha256 hashes")
    for name, digest in listed.items():
        safety.resolve_inside(directory, name, f"{manifest_path}: listed file")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{manifest_path}: the hash of {name!r} is {digest!r}, not a sha256 hex digest")
    golden = manifest.get("golden", [])
    if not isinstance(golden, list) or not all(isinstance(entry, dict) for entry in golden):
        raise BundleError(f"{manifest_path}: malformed manifest ('golden' must be a list of objects)")
    for entry in golden:
        safety.resolve_inside(directory, entry.get("dir"), f"{manifest_path}: golden-data directory")


def _verify_files(directory: Path, manifest: Mapping[str, Any], present: Mapping[str, int]) -> None:
    listed = manifest["files"]
    for name, expected in listed.items():
        path = directory / name
        if name not in present:
            raise BundleError(f"{directory}: file {name!r} listed in the manifest is missing; re-export the bundle")
        if sha256_of(path) != expected:
            raise BundleError(
                f"{path}: sha256 does not match the manifest; the file was changed or corrupted after export. "
                "Re-export the bundle, or restore the original file"
            )
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise BundleError(
            f"{directory}: file(s) not in the manifest: {', '.join(unlisted)}; a bundle must contain only the files it lists"
        )


def _read_manifest(manifest_path: Path, directory: Path) -> dict[str, Any]:
    if manifest_path.is_symlink():
        safety.resolve_inside(directory, MANIFEST_NAME, f"{directory}: symlinked manifest")
    try:
        info = manifest_path.stat()
    except OSError as error:
        raise BundleError(f"{manifest_path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{directory}: no {MANIFEST_NAME} (or not a regular file); this is not a portable-moe bundle")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{manifest_path}: {safety.format_bytes(info.st_size)}, far bigger than any manifest; refusing to parse it"
        )
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError covers JSONDecodeError
        raise BundleError(f"{manifest_path}: not valid JSON ({type(error).__name__}: {error})") from None
    except OSError as error:
        raise BundleError(f"{manifest_path}: cannot be read ({error.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a portable-moe bundle manifest (no format {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(
            f"{manifest_path}: bundle format version {version!r} is not supported (this portable-moe reads "
            f"version {BUNDLE_FORMAT_VERSION}); re-export the bundle or upgrade portable-moe"
        )
    return manifest


def _routing_outputs(manifest: Mapping[str, Any], outputs: list[TensorSpec]) -> dict[str, int]:
    routing = manifest.get("routing_outputs") or {}
    names = {spec.name for spec in outputs}
    if not isinstance(routing, dict) or not all(
        name in names and isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
        for name, layer in routing.items()
    ):
        raise ValueError("'routing_outputs' must map output names to layer indices")
    return dict(routing)


def load_bundle(path: str | os.PathLike[str], verify: bool = True, max_bytes: int | None = None) -> Bundle:
    """Load a bundle directory, treating it as untrusted until every check has passed.

    Args:
        path: the bundle directory.
        verify: check every file's sha256 against the manifest (on by default).
        max_bytes: refuse a bundle whose files, or whose model's declared tensors, exceed this
            many bytes (default: ``PORTABLE_MOE_MAX_BUNDLE_BYTES`` or 64 GiB).

    Raises:
        BundleError: if the directory, its manifest or a listed file is missing, the format is
            unknown or newer than this version of portable-moe, a hash does not match, a path
            leaves the bundle, the bundle is over the size limit, or the model is not a sane ONNX
            model matching the manifest. The message names the file and the problem.
        ConfigError: if ``max_bytes`` (or the environment variable) is not a size.
    """
    limit = safety.max_bundle_bytes(max_bytes)
    directory = Path(path)
    if not directory.exists():
        raise BundleError(f"{directory}: no such bundle directory; create one with 'portable-moe export'")
    if not directory.is_dir():
        raise BundleError(f"{directory}: a bundle is a directory (with {MANIFEST_NAME} and {MODEL_NAME}), not a file")
    manifest_path = directory / MANIFEST_NAME
    if not os.path.lexists(manifest_path):
        raise BundleError(f"{directory}: no {MANIFEST_NAME}; this is not a portable-moe bundle")
    manifest = _read_manifest(manifest_path, directory)
    _check_relative_names(directory, manifest_path, manifest)
    present = scan_bundle_files(directory)
    total = sum(present.values())
    if total > limit:
        raise BundleError(
            f"{directory}: the bundle's files total {safety.format_bytes(total)}, more than the limit of "
            f"{safety.format_bytes(limit)}; raise it with max_bytes= or {safety.MAX_BYTES_ENV} if you trust this bundle"
        )
    if verify:
        _verify_files(directory, manifest, present)
    try:
        config = ModelConfig.from_dict(manifest["config"]) if manifest.get("config") else None
        inputs = [TensorSpec.from_dict(entry) for entry in manifest["inputs"]]
        outputs = [TensorSpec.from_dict(entry) for entry in manifest["outputs"]]
        routing = _routing_outputs(manifest, outputs)
        lowering = manifest.get("moe_lowering")
        if lowering is not None and not isinstance(lowering, str):
            raise ValueError("'moe_lowering' must be a string")
    except (KeyError, TypeError, ValueError, ArithmeticError, ConfigError) as error:
        raise BundleError(f"{manifest_path}: malformed manifest ({type(error).__name__}: {error})") from None
    bundle = Bundle(
        path=directory,
        manifest=manifest,
        inputs=inputs,
        outputs=outputs,
        config=config,
        moe_lowering=lowering,
        routing_outputs=routing,
        max_bytes=limit,
    )
    bundle.load_onnx(load_external_data=False)  # parse and check the model now, before any backend sees it
    return bundle
