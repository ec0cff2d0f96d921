"""Hostile inputs, for the hardening tests, the fuzzer and the reliability report.

* :func:`write_toy_bundle`: a complete, valid bundle of a toy model (an embedding, a projection
  to logits and a TopK "routing" output), written without torch in milliseconds, optionally
  with its weights in external data.
* :func:`mutate_bundle`: damage a bundle in one of several ways (bytes of the model or the
  manifest, fields of the parsed model, values in the manifest's JSON), re-hashing the manifest
  where needed so the sha256 check does not hide the parser behind it.
* :func:`exercise_bundle`: what a user does with a bundle (load, compile, run the golden inputs)
  on the given backends; a hardened pipeline ends in success or a PortableMoEError, nothing else.
* :func:`fuzz_case`: one fuzz case (copy, mutate, exercise), shared by the fuzz test and
  ``scripts/fuzz_bundles.py``.

Everything random is driven by a ``random.Random`` the caller seeds, so every case is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from portable_moe.bundle import MANIFEST_NAME, MODEL_NAME, bundle_writer, sha256_of, write_manifest
from portable_moe.config import ModelConfig
from portable_moe.tensors import specs_from_onnx

TOY_VOCAB = 16
TOY_HIDDEN = 4
TOY_TOP_K = 2
TOY_CONFIG = ModelConfig(
    name="toy",
    vocab_size=TOY_VOCAB,
    hidden_size=TOY_HIDDEN,
    num_hidden_layers=1,
    num_attention_heads=1,
    intermediate_size=8,
    moe_intermediate_size=4,
    n_routed_experts=TOY_VOCAB,
    n_shared_experts=0,
    num_experts_per_tok=TOY_TOP_K,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    first_k_dense_replace=0,
    notes="A toy stand-in for hardening tests: logits = embedding[ids] @ projection; experts = top-2 of the logits.",
)
EXTERNAL_DATA_NAME = "weights.bin"


def toy_model(seed: int = 0) -> onnx.ModelProto:
    """The toy model: ``input_ids [batch, seq] -> logits [batch, seq, 16], expert_ids_layer0 [batch, seq, 2]``."""
    generator = np.random.default_rng(seed)
    embedding = generator.standard_normal((TOY_VOCAB, TOY_HIDDEN)).astype(np.float32)
    projection = generator.standard_normal((TOY_HIDDEN, TOY_VOCAB)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embedding", "input_ids"], ["hidden"], name="embed"),
            helper.make_node("MatMul", ["hidden", "projection"], ["logits"], name="project"),
            helper.make_node(
                "Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.array([TOY_TOP_K], np.int64))
            ),
            helper.make_node("TopK", ["logits", "k"], ["top_values", "expert_ids_layer0"], name="route"),
        ],
        "toy",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", TOY_VOCAB]),
            helper.make_tensor_value_info("expert_ids_layer0", onnx.TensorProto.INT64, ["batch", "seq", TOY_TOP_K]),
        ],
        [numpy_helper.from_array(embedding, "embedding"), numpy_helper.from_array(projection, "projection")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def toy_outputs(model: onnx.ModelProto, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The toy model's outputs, computed with numpy (independently of any backend)."""
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    logits = weights["embedding"][input_ids] @ weights["projection"]
    # ONNX TopK picks the lower index on ties: a stable sort of the negated scores does the same.
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :TOY_TOP_K]
    return {"logits": logits.astype(np.float32), "expert_ids_layer0": order.astype(np.int64)}


def write_toy_bundle(
    output_dir: str | os.PathLike[str], *, seed: int = 0, external_data: bool = False, overwrite: bool = False
) -> Path:
    """Write a valid toy bundle (through the real bundle writer) and return its path.

    Args:
        output_dir: the bundle directory to create.
        seed: weight seed; also written to the manifest, so bundles of different seeds differ.
        external_data: keep every initializer in ``weights.bin`` beside ``model.onnx``.
        overwrite: replace an existing bundle.
    """
    model = toy_model(seed)
    input_ids = np.random.default_rng(seed).integers(0, TOY_VOCAB, (2, 5), dtype=np.int64)
    expected = toy_outputs(model, input_ids)  # before saving: external-data saving rewrites the model
    inputs, outputs = specs_from_onnx(model)
    with bundle_writer(output_dir, overwrite=overwrite) as staging:
        model_path = staging / MODEL_NAME
        if external_data:
            onnx.save_model(
                model,
                str(model_path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_NAME,
                size_threshold=0,
            )
        else:
            onnx.save_model(model, str(model_path))
        write_manifest(
            staging,
            inputs=inputs,
            outputs=outputs,
            golden=[({"input_ids": input_ids}, expected)],
            config=TOY_CONFIG,
            extra={
                "preset": "toy",
                "seed": seed,
                "opset": 17,
                "ir_version": model.ir_version,
                "moe_lowering": "dense",
                "routing_outputs": {"expert_ids_layer0": 0},
            },
        )
    return Path(output_dir)


def rehash(bundle_dir: Path) -> None:
    """Recompute the manifest's sha256 of every file it lists (after a deliberate change)."""
    manifest_path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {
        name: sha256_of(bundle_dir / name) if (bundle_dir / name).is_file() else digest
        for name, digest in manifest["files"].items()
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------------------------------------
# Mutations

# Values a hostile manifest or model might carry where something sane is expected.
_NASTY_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**70,
    1.5,
    float("nan"),
    "",
    "x",
    "../outside",
    "/etc/passwd",
    "..",
    "model.onnx",
    [],
    {},
    [1, 2],
    ["batch", -3],
    {"name": "x"},
    "a" * 300,
]
_NASTY_LOCATIONS = [
    "/etc/passwd",
    "../outside.bin",
    "sub/../../outside.bin",
    "..\\outside.bin",
    "C:\\weights.bin",
    "*/_ORT_MEM_ADDR_/*",
    "",
    "missing.bin",
    ".",
    "manifest.json",
]
_NASTY_DIMS = [-1, 0, 1, 3, 2**20, 2**31, 2**40, 2**62]


def _edit_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to eight edits: flip bits, overwrite, insert, delete, truncate or duplicate a slice."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not buffer:
            buffer.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        position = rng.randrange(len(buffer))
        kind = rng.choice(["flip", "set", "insert", "delete", "truncate", "duplicate", "varint"])
        if kind == "flip":
            buffer[position] ^= 1 << rng.randrange(8)
        elif kind == "set":
            buffer[position] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == "insert":
            buffer[position:position] = rng.randbytes(rng.randint(1, 16))
        elif kind == "delete":
            del buffer[position : position + rng.randint(1, 16)]
        elif kind == "truncate":
            del buffer[position:]
        elif kind == "duplicate":
            end = min(len(buffer), position + rng.randint(1, 64))
            buffer[position:position] = buffer[position:end]
        else:  # a maximal varint: protobuf lengths and sizes that claim far more than there is
            buffer[position:position] = b"\xff" * 9 + b"\x01"
    return bytes(buffer)


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [attribute.t for attribute in node.attribute if attribute.HasField("t")]
    return tensors


def _mutate_model_fields(model: onnx.ModelProto, rng: random.Random) -> None:
    """One semantic change to a parsed model: sizes, types, versions, names, external data."""
    tensor = rng.choice(_all_tensors(model))
    node = rng.choice(list(model.graph.node))
    kind = rng.randrange(12)
    if kind == 0:
        if tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice(_NASTY_DIMS)
        else:
            tensor.dims.append(rng.choice(_NASTY_DIMS))
    elif kind == 1:
        tensor.data_type = rng.randrange(0, 40)
    elif kind == 2:
        model.ir_version = rng.choice([0, 1, 2, 3, 11, 99, 2**40])
    elif kind == 3:
        model.opset_import[0].version = rng.choice([0, 1, 6, 13, 99, 2**40])
    elif kind == 4:
        model.opset_import.add(domain=rng.choice(["", "ai.onnx", "com.microsoft", "x"]), version=rng.randint(-1, 50))
    elif kind == 5:
        node.op_type = rng.choice(["", "Loop", "If", "Identity", "NotAnOp", node.op_type.lower()])
    elif kind == 6:
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "unknown.domain", "ai.onnx"])
    elif kind == 7:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=rng.choice(_NASTY_LOCATIONS))
        if rng.random() < 0.5:
            tensor.external_data.add(key=rng.choice(["offset", "length"]), value=str(rng.choice(_NASTY_DIMS)))
    elif kind == 8:
        value = model.graph.input[0] if rng.random() < 0.5 else model.graph.output[0]
        dims = value.type.tensor_type.shape.dim
        dims[rng.randrange(len(dims))].dim_value = rng.choice(_NASTY_DIMS)
    elif kind == 9:
        value = rng.choice([*model.graph.input, *model.graph.output])
        value.type.tensor_type.elem_type = rng.randrange(0, 40)
    elif kind == 10:
        node.input.append(rng.choice(["", "nothing", "input_ids", "logits"]))
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "nothing", "input_ids", "logits"])
    else:
        sparse = model.graph.sparse_initializer.add()
        sparse.values.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "sparse"))
        sparse.indices.CopyFrom(numpy_helper.from_array(np.array([0, 1], np.int64), "sparse_indices"))
        sparse.dims.extend([rng.choice(_NASTY_DIMS), rng.choice(_NASTY_DIMS)])


def _random_path(value: Any, rng: random.Random) -> list[Any]:
    path: list[Any] = []
    while isinstance(value, (dict, list)) and value and rng.random() < 0.7:
        key = rng.choice(list(value)) if isinstance(value, dict) else rng.randrange(len(value))
        path.append(key)
        value = value[key]
    return path


def _mutate_manifest_fields(manifest: dict[str, Any], rng: random.Random) -> None:
    """Replace or delete one value somewhere in the manifest."""
    path = _random_path(manifest, rng) or [rng.choice(list(manifest))]
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(_NASTY_VALUES)


def _model_bytes(bundle_dir: Path, rng: random.Random) -> str:
    path = bundle_dir / MODEL_NAME
    path.write_bytes(_edit_bytes(path.read_bytes(), rng))
    rehash(bundle_dir)
    return "model bytes"


def _model_fields(bundle_dir: Path, rng: random.Random) -> str:
    path = bundle_dir / MODEL_NAME
    model = onnx.load(str(path), load_external_data=False)
    _mutate_model_fields(model, rng)
    path.write_bytes(model.SerializeToString())
    rehash(bundle_dir)
    return "model fields"


def _manifest_bytes(bundle_dir: Path, rng: random.Random) -> str:
    path = bundle_dir / MANIFEST_NAME
    path.write_bytes(_edit_bytes(path.read_bytes(), rng))
    return "manifest bytes"


def _manifest_fields(bundle_dir: Path, rng: random.Random) -> str:
    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    _mutate_manifest_fields(manifest, rng)
    path.write_text(json.dumps(manifest))
    return "manifest fields"


MUTATIONS: dict[str, Callable[[Path, random.Random], str]] = {
    "model bytes": _model_bytes,
    "model fields": _model_fields,
    "manifest bytes": _manifest_bytes,
    "manifest fields": _manifest_fields,
}


def mutate_bundle(bundle_dir: Path, rng: random.Random, kind: str | None = None) -> str:
    """Damage a bundle in place with one mutation of ``kind`` (random if None); return the kind."""
    return MUTATIONS[kind or rng.choice(list(MUTATIONS))](bundle_dir, rng)


def exercise_bundle(path: Path, backends: Sequence[str] = ("cpu", "reference")) -> None:
    """Use a bundle as a user would: load, compile on each backend, run the golden inputs.

    Args:
        path: a bundle directory, or a loose .onnx file (then run on a one-token input).
        backends: the backends to compile and run on.

    Raises:
        PortableMoEError: the only kind of error a hardened pipeline may raise.
    """
    from portable_moe.backend import as_model_input
    from portable_moe.bundle import load_bundle
    from portable_moe.registry import get_backend

    if path.is_dir():
        bundle = load_bundle(path)
        model = as_model_input(bundle)
        golden = bundle.golden_sets()
        feeds = golden[0][0] if golden else {"input_ids": np.zeros((1, 1), np.int64)}
    else:
        model = as_model_input(path)
        feeds = {"input_ids": np.zeros((1, 1), np.int64)}
    for name in backends:
        get_backend(name).compile(model).run(feeds)


def fuzz_case(
    pristine: Path,
    workdir: Path,
    rng: random.Random,
    *,
    kind: str | None = None,
    loose: bool = False,
    backends: Sequence[str] = ("cpu", "reference"),
) -> tuple[str, str]:
    """One fuzz case: copy a pristine bundle to ``workdir``, damage it, use it.

    Args:
        pristine: a valid bundle (e.g. from :func:`write_toy_bundle`); it is not modified.
        workdir: where the damaged copy goes (must not exist).
        rng: drives the mutation.
        kind: the mutation (see :data:`MUTATIONS`; random if None).
        loose: after a model mutation, load model.onnx as a loose file instead of the bundle.
        backends: the backends to compile and run on.

    Returns:
        ``(mutation kind, outcome)``: outcome is "ok" or the name of the PortableMoEError raised.

    Raises:
        Exception: anything other than a PortableMoEError that the pipeline raised (a bug).
    """
    from portable_moe.errors import PortableMoEError

    shutil.copytree(pristine, workdir, symlinks=True)
    kind = mutate_bundle(workdir, rng, kind)
    target = workdir / MODEL_NAME if loose and kind.startswith("model") else workdir
    try:
        exercise_bundle(target, backends)
    except PortableMoEError as error:
        return kind, type(error).__name__
    return kind, "ok"
