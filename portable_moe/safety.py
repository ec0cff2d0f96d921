"""Loading untrusted models and bundles safely, and dying cleanly when told to stop.

A bundle may come from anywhere, so everything read from it is checked before it is trusted:

* paths named inside a bundle (the manifest's files, the model file, golden-data directories,
  ONNX external-data locations) must be relative, free of ``..``, and resolve (symlinks
  included) to a place inside the bundle directory; this is checked *before* the file is opened;
* the model must parse as an ``onnx.ModelProto`` that has a graph, an IR version and opsets this
  onnx knows, and tensors whose declared shapes are sane (no negative dimension, data that
  matches the declared size);
* sizes are bounded: a model or bundle that declares more bytes than a limit (64 GiB unless
  ``max_bytes=`` or ``PORTABLE_MOE_MAX_BUNDLE_BYTES`` says otherwise) is refused before loading.

External data is read by this module, not by ``onnx.load``: the installed onnx's own path checks
have had traversal bugs, and this code must not depend on which onnx version is installed.
"""

from __future__ import annotations

import functools
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from portable_moe.errors import BundleError, ConfigError

DEFAULT_MAX_BUNDLE_BYTES = 64 * 2**30
MAX_BYTES_ENV = "PORTABLE_MOE_MAX_BUNDLE_BYTES"
# Protobuf cannot serialise or parse a message over 2 GiB; bigger models keep weights in external data.
PROTOBUF_LIMIT = 2**31 - 1
# ONNX Runtime reads an initializer from a raw memory address when its location is this tag: a
# model file must never be allowed to name it (it would make the runtime read arbitrary memory).
ORT_MEMORY_ADDRESS_TAG = "*/_ORT_MEM_ADDR_/*"
# The IR version that introduced opset_import; older files are from before ONNX 1.0.
MIN_IR_VERSION = 3

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# Bits per element of the sub-byte types, which ONNX packs into bytes (raw_data).
_SUB_BYTE_BITS = {
    name_value: bits
    for name, bits in (
        ("UINT4", 4),
        ("INT4", 4),
        ("FLOAT4E2M1", 4),
        ("UINT2", 2),
        ("INT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if (name_value := getattr(onnx.TensorProto, name, None)) is not None
}
# The typed field that holds each data type's values, and how many entries one element takes.
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.INT32: ("int32_data", 1),
    onnx.TensorProto.STRING: ("string_data", 1),
}


def format_bytes(count: int) -> str:
    """``68719476736`` -> ``"64.0 GiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    exponent = min(len(units) - 1, max(0, (count.bit_length() - 1) // 10))
    return f"{count} B" if exponent == 0 else f"{count / 1024**exponent:.1f} {units[exponent]}"


def max_bundle_bytes(explicit: int | None = None) -> int:
    """The size limit for a bundle or model: ``explicit``, else the environment variable, else 64 GiB.

    ``PORTABLE_MOE_MAX_BUNDLE_BYTES`` takes a number of bytes, optionally with a binary unit
    (``512M``, ``8G``, ``1T``).

    Raises:
        ConfigError: if the limit given is not a positive whole number of bytes.
    """
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit <= 0:
            raise ConfigError(f"max_bytes must be a positive number of bytes, got {explicit!r}")
        return explicit
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BUNDLE_BYTES
    number, unit = raw.rstrip("bB").rstrip("iI"), ""
    if number and number[-1].lower() in _UNITS:
        number, unit = number[:-1], number[-1].lower()
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_BYTES_ENV}={raw!r} is not a size; give bytes, e.g. 68719476736 or 64G")
    return value


def resolve_inside(root: Path, relative: object, what: str, base: Path | None = None) -> Path:
    """Resolve a path named by a bundle, refusing anything that would leave the bundle directory.

    Nothing is opened: the path is judged on its text and on where its symlinks point.

    Args:
        root: the bundle directory everything must stay in.
        relative: the path as written in the manifest or model.
        what: what names the path, starting with the file that names it, for the error message
            (e.g. ``"b/model.onnx: initializer 'w': external data location"``).
        base: the directory ``relative`` is relative to (default ``root``); must be inside ``root``.

    Returns:
        The fully resolved path (no symlinks left in it).

    Raises:
        BundleError: if the path is empty, absolute, contains ``..``, or resolves (through a
            symlink anywhere along it) to a place outside ``root``.
    """
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{what} is empty or not a string (got {relative!r})")
    if "\x00" in relative or relative == ORT_MEMORY_ADDRESS_TAG:
        raise BundleError(f"{what} {relative!r} is not a file name; refusing to load")
    windows = PureWindowsPath(relative)  # splits on both separators, so "..\\x" is caught too
    if PurePosixPath(relative).is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise BundleError(f"{what} {relative!r} is an absolute path; a bundle may only refer to files inside itself")
    if ".." in windows.parts:
        raise BundleError(f"{what} {relative!r} climbs out of the bundle with '..'; refusing to load")
    real_root = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath((base or root) / relative))
    if resolved != real_root and not resolved.is_relative_to(real_root):
        raise BundleError(
            f"{what} {relative!r} resolves through a symlink to {resolved}, outside the bundle {root}; refusing to load"
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Walking every tensor and graph of a model (iteratively: nesting depth is attacker-controlled)


@dataclass(frozen=True)
class _TensorSite:
    tensor: onnx.TensorProto
    where: str
    dense_dims: tuple[int, ...] | None = None  # for a sparse tensor's values: the dense shape it expands to


def _attribute_items(node: onnx.NodeProto, scope: str) -> Iterator[tuple[str, object]]:
    for attribute in node.attribute:
        label = f"{scope}node {node.name or node.op_type!r} attribute {attribute.name!r}"
        if attribute.HasField("t"):
            yield label, attribute.t
        for tensor in attribute.tensors:
            yield label, tensor
        if attribute.HasField("sparse_tensor"):
            yield label, attribute.sparse_tensor
        for sparse in attribute.sparse_tensors:
            yield label, sparse
        if attribute.HasField("g"):
            yield label, attribute.g
        for graph in attribute.graphs:
            yield label, graph


def _sparse_sites(sparse: onnx.SparseTensorProto, where: str) -> Iterator[_TensorSite]:
    yield _TensorSite(sparse.values, f"{where} (values)", dense_dims=tuple(sparse.dims))
    yield _TensorSite(sparse.indices, f"{where} (indices)")


def _walk(model: onnx.ModelProto) -> tuple[list[_TensorSite], list[tuple[onnx.GraphProto, str]]]:
    """Every tensor (initializers, sparse initializers, tensor attributes) and every (sub)graph."""
    tensors: list[_TensorSite] = []
    graphs: list[tuple[onnx.GraphProto, str]] = []
    pending_nodes: list[tuple[onnx.NodeProto, str]] = []
    pending_graphs: list[tuple[onnx.GraphProto, str]] = [(model.graph, "")]
    for function in model.functions:
        pending_nodes += [(node, f"function {function.name!r} ") for node in function.node]
    while pending_graphs or pending_nodes:
        if pending_graphs:
            graph, scope = pending_graphs.pop()
            graphs.append((graph, scope))
            tensors += [_TensorSite(init, f"{scope}initializer {init.name!r}") for init in graph.initializer]
            for sparse in graph.sparse_initializer:
                tensors += _sparse_sites(sparse, f"{scope}sparse initializer {sparse.values.name!r}")
            pending_nodes += [(node, scope) for node in graph.node]
            continue
        node, scope = pending_nodes.pop()
        for label, item in _attribute_items(node, scope):
            if isinstance(item, onnx.TensorProto):
                tensors.append(_TensorSite(item, label))
            elif isinstance(item, onnx.SparseTensorProto):
                tensors += _sparse_sites(item, label)
            else:
                pending_graphs.append((item, f"{label} subgraph: "))
    return tensors, graphs


# ---------------------------------------------------------------------------------------------
# Tensor checks


def _element_count(dims: list[int], where: str) -> int:
    negative = [dim for dim in dims if dim < 0]
    if negative:
        raise BundleError(f"{where} has a negative dimension ({negative[0]}) in its shape {dims}")
    return math.prod(dims)


def storage_bytes(data_type: int, elements: int) -> int:
    """How many bytes ``elements`` values of an ONNX data type take in ``raw_data``.

    Raises:
        BundleError: for a data type this onnx does not know.
    """
    if data_type in _SUB_BYTE_BITS:
        return -(-elements * _SUB_BYTE_BITS[data_type] // 8)
    if data_type == onnx.TensorProto.STRING:
        return 0  # variable length: counted from the strings themselves
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:  # onnx raises KeyError or ValueError depending on the version
        raise BundleError(f"unknown tensor data type {data_type}") from None
    return elements * itemsize


def _external_fields(tensor: onnx.TensorProto, where: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in fields:
            raise BundleError(f"{where}: external data names {entry.key!r} twice")
        fields[entry.key] = entry.value
    if "basepath" in fields:
        # onnx and ONNX Runtime disagree on whether this key moves the base directory: refuse it.
        raise BundleError(f"{where}: external data key 'basepath' is not supported; re-save the model with onnx")
    return fields


def _non_negative(fields: dict[str, str], key: str, where: str) -> int | None:
    if key not in fields:
        return None
    try:
        value = int(fields[key])
    except ValueError:
        value = -1
    if value < 0:
        raise BundleError(f"{where}: external data {key} {fields[key]!r} is not a non-negative integer")
    return value


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes lie outside the model file (already checked to be inside the bundle)."""

    path: Path
    offset: int
    length: int


def check_tensor(
    tensor: onnx.TensorProto,
    where: str,
    *,
    root: Path | None,
    base: Path | None,
    dense_elements: int | None = None,
    max_bytes: int | None = None,
) -> tuple[int, ExternalRef | None]:
    """Check one tensor's shape, data and (if any) external-data location.

    Args:
        tensor: the tensor.
        where: what it is, for messages ("model.onnx: initializer 'w'").
        root / base: the bundle directory and the model file's directory; ``root=None`` means the
            tensor may not refer to external data (golden data, in-memory models).
        dense_elements: for a sparse tensor's values, the number of elements it expands to.
        max_bytes: the size limit (see :func:`max_bundle_bytes`).

    Returns:
        ``(declared bytes, external reference or None)``.

    Raises:
        BundleError: a negative dimension, an unknown data type, a declared size over the limit,
            data that does not match the declared shape, or an external location that is unsafe,
            missing or too short.
    """
    elements = _element_count(list(tensor.dims), where)
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise BundleError(f"{where} has no data type")
    try:
        expected = storage_bytes(tensor.data_type, elements)
    except BundleError as error:
        raise BundleError(f"{where}: {error}") from None
    declared = expected
    if dense_elements is not None:
        declared = max(declared, storage_bytes(tensor.data_type, dense_elements))
    limit = max_bundle_bytes(max_bytes)
    if declared > limit:
        raise BundleError(
            f"{where} declares {format_bytes(declared)} of data, more than the limit of {format_bytes(limit)}; "
            f"raise it with max_bytes= or {MAX_BYTES_ENV} if you trust this model"
        )
    is_external = tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0
    if not is_external:
        _check_inline_data(tensor, where, elements, expected)
        return declared, None
    if root is None:
        raise BundleError(f"{where} refers to external data, which is not allowed here")
    if tensor.data_type == onnx.TensorProto.STRING:
        raise BundleError(f"{where}: string tensors cannot be stored as external data")
    fields = _external_fields(tensor, where)
    path = resolve_inside(root, fields.get("location"), f"{where}: external data location", base)
    offset = _non_negative(fields, "offset", where) or 0
    length = _non_negative(fields, "length", where)
    if length is not None and length != expected:
        raise BundleError(
            f"{where}: external data length {length} does not match its shape {list(tensor.dims)} ({expected} bytes)"
        )
    try:
        info = path.stat()
    except OSError as error:
        raise BundleError(
            f"{where}: external data file {fields['location']!r} cannot be read ({error.strerror})"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{where}: external data {fields['location']!r} is not a regular file")
    if offset + expected > info.st_size:
        raise BundleError(
            f"{where}: external data file {fields['location']!r} is {info.st_size} bytes, too short for "
            f"{expected} bytes at offset {offset}; the bundle is truncated"
        )
    return declared, ExternalRef(path, offset, expected)


def _check_inline_data(tensor: onnx.TensorProto, where: str, elements: int, expected: int) -> None:
    if tensor.HasField("raw_data"):
        if tensor.data_type != onnx.TensorProto.STRING and len(tensor.raw_data) != expected:
            raise BundleError(
                f"{where} declares shape {list(tensor.dims)} ({expected} bytes) but holds {len(tensor.raw_data)} bytes"
            )
        return
    field, per_element = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
    if tensor.data_type in _SUB_BYTE_BITS:
        return  # packed several to an entry; the runtime checks those
    count = len(getattr(tensor, field))
    if count != elements * per_element:
        raise BundleError(f"{where} declares shape {list(tensor.dims)} ({elements} values) but holds {count}")


# ---------------------------------------------------------------------------------------------
# Model checks


@functools.cache
def _max_opsets() -> dict[str, int]:
    newest: dict[str, int] = {}
    for (domain, version), _ in onnx.helper.OP_SET_ID_VERSION_MAP.items():
        newest[domain] = max(newest.get(domain, 0), version)
    newest[""] = newest.get("ai.onnx", onnx.defs.onnx_opset_version())
    return newest


def _check_header(model: onnx.ModelProto, source: str, graphs: list[tuple[onnx.GraphProto, str]]) -> None:
    if not model.HasField("graph") and not model.ir_version and not model.opset_import:
        raise BundleError(
            f"{source}: not an ONNX model (no graph, IR version or opset); is it another kind of file or protobuf message?"
        )
    if not model.HasField("graph"):
        raise BundleError(f"{source}: the ONNX model has no graph")
    if model.ir_version > onnx.IR_VERSION:
        raise BundleError(
            f"{source}: ONNX IR version {model.ir_version} is newer than {onnx.IR_VERSION}, the newest this onnx "
            f"{onnx.__version__} reads; upgrade onnx or re-export with an older exporter"
        )
    if model.ir_version < MIN_IR_VERSION:
        raise BundleError(
            f"{source}: ONNX IR version {model.ir_version} is not supported (need {MIN_IR_VERSION} or newer); "
            "re-export the model"
        )
    newest = _max_opsets()
    imported: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in imported:
            raise BundleError(f"{source}: the model imports opset domain {opset.domain or 'ai.onnx'!r} twice")
        imported[domain] = opset.version
        if domain in newest and not 1 <= opset.version <= newest[domain]:
            raise BundleError(
                f"{source}: the model uses opset {opset.version} of domain {opset.domain or 'ai.onnx'!r}; this onnx "
                f"{onnx.__version__} knows versions 1-{newest[domain]}. Re-export with a supported opset or upgrade onnx"
            )
    if not imported:
        raise BundleError(f"{source}: the model imports no opset")
    known_domains = set(imported) | {function.domain for function in model.functions}
    for graph, scope in graphs:
        for node in graph.node:
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain not in known_domains:
                raise BundleError(
                    f"{source}: {scope}node {node.name or node.op_type!r} uses operator domain {node.domain!r}, "
                    "which the model does not import"
                )


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older versions only have label
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _check_text(model: onnx.ModelProto, source: str) -> None:
    """Refuse string fields that are not UTF-8: protobuf's Python API hands them over as bytes.

    Tensors are checked by name only, so that their (possibly large) data is never copied.
    """
    pending: list[Message] = [model]
    while pending:
        message = pending.pop()
        if isinstance(message, onnx.TensorProto):
            strings = [message.name, *(part for entry in message.external_data for part in (entry.key, entry.value))]
            if any(not isinstance(text, str) for text in strings):
                raise BundleError(
                    f"{source}: a tensor name or external-data entry is not UTF-8 text; the file is corrupt"
                )
            continue
        for field, value in message.ListFields():
            values = value if _is_repeated(field) else [value]
            if field.type == FieldDescriptor.TYPE_STRING:
                bad = next((item for item in values if not isinstance(item, str)), None)
                if bad is not None:
                    raise BundleError(
                        f"{source}: {field.full_name} holds {bytes(bad)[:40]!r}, which is not UTF-8 text; "
                        "the file is corrupt"
                    )
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                pending.extend(values)


def _check_graph_shapes(model: onnx.ModelProto, source: str) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise BundleError(
                    f"{source}: graph input/output {value.name!r} has size {dim.dim_value} on axis {axis}"
                )


def check_model(
    model: onnx.ModelProto, source: str, *, root: Path | None, base: Path | None, max_bytes: int | None = None
) -> list[tuple[onnx.TensorProto, ExternalRef]]:
    """Check a parsed model before any of its external data is read.

    Args:
        model: the model, parsed without external data.
        source: the file it came from (for messages).
        root: the bundle directory external data must stay inside; None refuses external data.
        base: the directory external locations are relative to (the model file's directory).
        max_bytes: the size limit (see :func:`max_bundle_bytes`).

    Returns:
        The tensors stored as external data, with their checked locations.

    Raises:
        BundleError: naming the file and the problem.
    """
    limit = max_bundle_bytes(max_bytes)
    _check_text(model, source)
    tensors, graphs = _walk(model)
    _check_header(model, source, graphs)
    _check_graph_shapes(model, source)
    total = 0
    external: list[tuple[onnx.TensorProto, ExternalRef]] = []
    for site in tensors:
        where = f"{source}: {site.where}"
        dense_elements = None if site.dense_dims is None else _element_count(list(site.dense_dims), where)
        declared, reference = check_tensor(
            site.tensor, where, root=root, base=base, dense_elements=dense_elements, max_bytes=limit
        )
        total += declared
        if reference is not None:
            external.append((site.tensor, reference))
    if total > limit:
        raise BundleError(
            f"{source}: the model declares {format_bytes(total)} of tensor data, more than the limit of "
            f"{format_bytes(limit)}; raise it with max_bytes= or {MAX_BYTES_ENV} if you trust this model"
        )
    return external


def parse_model(data: bytes, source: str) -> onnx.ModelProto:
    """Parse bytes as an ONNX ModelProto.

    Raises:
        BundleError: if the bytes are not a well-formed protobuf ModelProto.
    """
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:  # upb reports nesting and size limits as these
        raise BundleError(f"{source}: not a readable ONNX model (truncated or not protobuf: {error})") from None
    return model


def _read_external(tensor: onnx.TensorProto, reference: ExternalRef, source: str) -> None:
    try:
        with open(reference.path, "rb") as handle:
            handle.seek(reference.offset)
            data = handle.read(reference.length)
    except OSError as error:
        raise BundleError(f"{source}: cannot read external data {reference.path} ({error.strerror})") from None
    if len(data) != reference.length:
        raise BundleError(f"{source}: external data {reference.path} ended early (the file changed while loading)")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def load_model(
    path: Path,
    *,
    root: Path | None = None,
    max_bytes: int | None = None,
    load_external_data: bool = True,
) -> onnx.ModelProto:
    """Read an ONNX file that may be hostile: size-check, parse, check, then read external data.

    Args:
        path: the .onnx file.
        root: the directory every external-data file must stay inside (default: the file's directory).
        max_bytes: the size limit (see :func:`max_bundle_bytes`).
        load_external_data: read the external data into the model (after checking every location).

    Raises:
        BundleError: naming the file and the problem.
    """
    limit = max_bundle_bytes(max_bytes)
    root = path.parent if root is None else root
    try:
        info = path.stat()
    except OSError as error:
        raise BundleError(f"{path}: cannot read the ONNX model ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path}: the ONNX model is not a regular file")
    if info.st_size > limit:
        raise BundleError(
            f"{path}: {format_bytes(info.st_size)}, more than the limit of {format_bytes(limit)}; raise it with "
            f"max_bytes= or {MAX_BYTES_ENV} if you trust this model"
        )
    if info.st_size > PROTOBUF_LIMIT:
        raise BundleError(
            f"{path}: {format_bytes(info.st_size)} in one file; ONNX files over 2 GiB must keep weights in external data"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BundleError(f"{path}: cannot read the ONNX model ({error.strerror})") from None
    model = parse_model(data, str(path))
    external = check_model(model, str(path), root=root, base=path.parent, max_bytes=limit)
    if load_external_data:
        for tensor, reference in external:
            _read_external(tensor, reference, str(path))
    return model
