"""Hostile bundles and models: every one is refused with a BundleError naming the file and the problem.

The bundles here are toy bundles (portable_moe.testing.hostile: written in milliseconds, no torch) damaged
on purpose. Where the damage is inside model.onnx, the manifest is re-hashed so that the sha256
check does not hide the parser and the model checks behind it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from portable_moe import BundleError, ConfigError, get_backend, load_bundle
from portable_moe.backend import as_model_input
from portable_moe.compare import compare_outputs
from portable_moe.safety import MAX_BYTES_ENV, load_model, max_bundle_bytes
from portable_moe.testing.hostile import rehash, toy_model, write_toy_bundle

# ---------------------------------------------------------------------------------------------
# Helpers

_opened: list[str] = []
_watching: list[Path] = []


def _audit(event: str, args: tuple) -> None:
    # Records every Python-level open() of a watched path: proves a file was never read.
    if event == "open" and _watching and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(os.path.realpath(path) == os.path.realpath(watched) for watched in _watching):
            _opened.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def secret(tmp_path):
    """A file outside every bundle, which nothing may open; the test fails if anything does."""
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(b"\x00" * 4096)
    _opened.clear()
    _watching.append(path)
    yield path
    _watching.remove(path)
    assert not _opened, f"the outside file was opened: {_opened}"


@pytest.fixture
def toy(tmp_path) -> Path:
    return write_toy_bundle(tmp_path / "toy")


@pytest.fixture
def toy_external(tmp_path) -> Path:
    return write_toy_bundle(tmp_path / "toy-external", external_data=True)


def _rewrite_model(bundle_dir: Path, change) -> None:
    """Apply ``change`` to the parsed model.onnx (external data left where it is), then re-hash."""
    path = bundle_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    change(model)
    path.write_bytes(model.SerializeToString())
    rehash(bundle_dir)


def _edit_manifest(bundle_dir: Path, change) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _point_external(location: str, tensor: str = "embedding"):
    def change(model: onnx.ModelProto) -> None:
        [init] = [init for init in model.graph.initializer if init.name == tensor]
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location

    return change


# ---------------------------------------------------------------------------------------------
# The model file: not ONNX, damaged, too new, absurd


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda data: data[: len(data) // 2], r"model.onnx: not a readable ONNX model \(truncated or not protobuf"),
        (lambda data: b"this is not protobuf at all\n" * 10, "model.onnx: not a readable ONNX model"),
        (
            lambda data: helper.make_node("Relu", ["x"], ["y"]).SerializeToString(),
            r"model.onnx: not an ONNX model \(no graph, IR version or opset\)",
        ),
        (
            lambda data: helper.make_graph([], "g", [], []).SerializeToString(),
            r"model.onnx: not an ONNX model",
        ),
        (lambda data: b"", r"model.onnx: not an ONNX model"),
    ],
    ids=["truncated", "not-protobuf", "wrong-message-node", "wrong-message-graph", "empty"],
)
def test_a_model_that_is_not_onnx_is_refused(toy, content, message):
    path = toy / "model.onnx"
    path.write_bytes(content(path.read_bytes()))
    rehash(toy)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m, "ir_version", 99), r"IR version 99 is newer than \d+, the newest this onnx"),
        (lambda m: setattr(m, "ir_version", 2), "IR version 2 is not supported"),
        (
            lambda m: setattr(m.opset_import[0], "version", 999),
            r"opset 999 of domain 'ai.onnx'; this onnx [\d.]+ knows versions 1-\d+",
        ),
        (lambda m: m.opset_import.add(domain="", version=17), "imports opset domain 'ai.onnx' twice"),
        (lambda m: setattr(m.graph.node[0], "domain", "vendor.secret"), "uses operator domain 'vendor.secret'"),
        (lambda m: m.ClearField("graph"), "the ONNX model has no graph"),
    ],
    ids=["ir-too-new", "ir-too-old", "opset-too-new", "opset-twice", "domain-not-imported", "no-graph"],
)
def test_unknown_or_too_new_versions_are_refused(toy, change, message):
    _rewrite_model(toy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


def _set_dims(name: str, dims: list[int]):
    def change(model: onnx.ModelProto) -> None:
        [init] = [init for init in model.graph.initializer if init.name == name]
        del init.dims[:]
        init.dims.extend(dims)

    return change


def _claim_elements(count: int):
    def change(model: onnx.ModelProto) -> None:
        huge = model.graph.initializer.add()
        huge.name, huge.data_type = "huge", onnx.TensorProto.FLOAT
        huge.dims.append(count)
        huge.raw_data = b"\x00" * 4

    return change


def _huge_sparse(model: onnx.ModelProto) -> None:
    sparse = model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(numpy_helper.from_array(np.ones(1, np.float32), "sparse"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.zeros(1, np.int64), "sparse_indices"))
    sparse.dims.extend([2**20, 2**20])  # 1 value, but 4 TiB once densified (runtimes densify)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_claim_elements(2**40), r"initializer 'huge' declares 4.0 TiB of data, more than the limit of 64.0 GiB"),
        (_set_dims("embedding", [-16, 4]), r"initializer 'embedding' has a negative dimension \(-16\)"),
        (
            _set_dims("embedding", [16, 5]),
            r"initializer 'embedding' declares shape \[16, 5\] \(320 bytes\) but holds 256",
        ),
        (_huge_sparse, r"sparse initializer 'sparse' \(values\) declares 4.0 TiB"),
        (
            lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", -2),
            "graph input/output 'input_ids' has size -2 on axis 0",
        ),
        (
            lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", 77),
            "graph input/output 'logits' has unknown element type 77",
        ),
    ],
    ids=[
        "2^40-elements",
        "negative-dim",
        "data-size-mismatch",
        "sparse-densifies-huge",
        "negative-input-dim",
        "bad-type",
    ],
)
def test_absurd_dimensions_are_refused(toy, change, message):
    _rewrite_model(toy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


def test_text_that_is_not_utf8_is_refused(toy):
    # Protobuf's Python API returns such a string field as bytes; runtimes choke on it differently.
    path = toy / "model.onnx"
    path.write_bytes(path.read_bytes().replace(b"MatMul", b"MatM\xe9l"))
    rehash(toy)
    with pytest.raises(
        BundleError, match=r"model.onnx: onnx.NodeProto.op_type holds b'MatM\\xe9l', which is not UTF-8"
    ):
        load_bundle(toy)


def test_a_constant_attribute_is_checked_like_an_initializer(toy):
    def change(model: onnx.ModelProto) -> None:
        model.graph.node[2].attribute[0].t.dims[0] = 2**40

    _rewrite_model(toy, change)
    with pytest.raises(BundleError, match=r"node 'k' attribute 'value' declares 8.0 TiB of data"):
        load_bundle(toy)


# ---------------------------------------------------------------------------------------------
# The manifest against the files


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["inputs"][0].update(dtype="int32"),
            r"the manifest lists inputs 'input_ids': int32 \[batch, seq\] but model.onnx has 'input_ids': int64",
        ),
        (
            lambda m: m["outputs"][0].update(shape=["batch", "seq", 32]),
            r"the manifest lists outputs 'logits': float32 \[batch, seq, 32\], .* but model.onnx has 'logits': float32 \[batch, seq, 16\]",
        ),
        (lambda m: m["config"].update(vocab_size=32), r"vocab_size 32 does not match the model's logits size 16"),
        (lambda m: m.update(opset=18), "the manifest says opset 18, the model has 17"),
        (lambda m: m["files"].pop("model.onnx"), r"file\(s\) not in the manifest: model.onnx"),
        (lambda m: m["files"].update({"model.onnx": "abc"}), "the hash of 'model.onnx' is 'abc', not a sha256 hex"),
        (lambda m: m.update(routing_outputs={"nope": 1}), "'routing_outputs' must map output names"),
        (lambda m: m["inputs"][0].update(shape=["batch", -1]), r"has shape \['batch', -1\]; give a list of sizes"),
        (lambda m: m["inputs"][0].update(dtype="pickle"), "unknown dtype 'pickle'"),
    ],
    ids=[
        "input-dtype",
        "output-shape",
        "vocab-vs-logits",
        "opset",
        "file-unlisted",
        "bad-hash",
        "routing",
        "negative-dim",
        "dtype",
    ],
)
def test_a_manifest_that_does_not_match_the_files_is_refused(toy, change, message):
    _edit_manifest(toy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["files"].update({"../outside/secret.bin": "0" * 64}),
            r"manifest.json: listed file '../outside/secret.bin' climbs out of the bundle with '..'",
        ),
        (lambda m: m.update(model_file="/etc/passwd"), "manifest.json: model_file '/etc/passwd' is an absolute path"),
        (
            lambda m: m["golden"][0].update(dir="../outside"),
            "manifest.json: golden-data directory '../outside' climbs out of the bundle",
        ),
        (lambda m: m["files"].update({"C:\\x": "0" * 64}), r"listed file 'C:\\\\x' is an absolute path"),
    ],
    ids=["listed-file", "model-file", "golden-dir", "windows-drive"],
)
def test_manifest_paths_outside_the_bundle_are_refused_before_reading(toy, secret, change, message):
    _edit_manifest(toy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


def test_a_symlink_out_of_the_bundle_is_refused(toy, secret):
    (toy / "test_data_set_0" / "input_0.pb").unlink()
    (toy / "test_data_set_0" / "input_0.pb").symlink_to(secret)
    with pytest.raises(
        BundleError, match=r"listed file 'test_data_set_0/input_0.pb' resolves through a symlink to .*secret"
    ):
        load_bundle(toy)


def test_a_symlinked_directory_is_refused(toy, secret):
    (toy / "linked").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(BundleError, match="may not contain symlinked directories"):
        load_bundle(toy)


def test_special_files_are_refused_without_being_opened(toy):
    os.mkfifo(toy / "pipe")  # opening a FIFO for reading would block forever
    with pytest.raises(BundleError, match="pipe: not a regular file"):
        load_bundle(toy)
    (toy / "pipe").unlink()
    (toy / "manifest.json").unlink()
    os.mkfifo(toy / "manifest.json")
    with pytest.raises(BundleError, match=r"no manifest.json \(or not a regular file\)"):
        load_bundle(toy)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, r"not valid JSON \(RecursionError"),
        (b'{"format": ' + b"9" * 5000 + b"}", r"not valid JSON \(ValueError: Exceeds the limit"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
    ids=["nesting-bomb", "huge-integer", "not-utf8"],
)
def test_hostile_json_is_refused(toy, content, message):
    (toy / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(toy)


def test_an_oversized_manifest_is_not_parsed(toy):
    with open(toy / "manifest.json", "ab") as handle:
        handle.truncate(17 * 2**20)
    with pytest.raises(BundleError, match=r"manifest.json: 17.0 MiB, far bigger than any manifest"):
        load_bundle(toy)


def test_golden_data_may_not_refer_to_external_data(toy, secret):
    tensor = numpy_helper.from_array(np.zeros((2, 5), np.int64), "input_ids")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=str(secret))
    (toy / "test_data_set_0" / "input_0.pb").write_bytes(tensor.SerializeToString())
    rehash(toy)
    bundle = load_bundle(toy)
    with pytest.raises(
        BundleError, match="input_0.pb: tensor 'input_ids' refers to external data, which is not allowed"
    ):
        bundle.golden_sets()


# ---------------------------------------------------------------------------------------------
# External data


def test_a_model_with_external_data_loads_and_runs(toy_external):
    bundle = load_bundle(toy_external)
    assert "weights.bin" in bundle.manifest["files"]
    [(inputs, expected)] = bundle.golden_sets()
    model = as_model_input(bundle)
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in model.proto.graph.initializer)
    for name in ("cpu", "reference"):
        outputs = get_backend(name).compile(model).run(inputs)
        assert all(c.passed for c in compare_outputs(expected, outputs, bundle.routing_outputs)), name


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("{secret}", "'/.*' is an absolute path"),
        ("../outside/secret.bin", "'../outside/secret.bin' climbs out of the bundle with '..'"),
        ("sub/../../outside/secret.bin", "'sub/../../outside/secret.bin' climbs out"),
        ("..\\outside\\secret.bin", "'.*' climbs out of the bundle"),
        ("*/_ORT_MEM_ADDR_/*", r"'\*/_ORT_MEM_ADDR_/\*' is not a file name"),
        ("", "is empty or not a string"),
    ],
    ids=["absolute", "dot-dot", "nested-dot-dot", "backslash-dot-dot", "ort-memory-address", "empty"],
)
@pytest.mark.parametrize("entry", ["bundle", "onnx-file"])
def test_external_data_outside_the_bundle_is_refused_before_reading(toy_external, secret, location, message, entry):
    _rewrite_model(toy_external, _point_external(location.format(secret=secret)))
    with pytest.raises(BundleError, match=rf"model.onnx: initializer 'embedding': external data location {message}"):
        if entry == "bundle":
            load_bundle(toy_external)
        else:
            as_model_input(toy_external / "model.onnx")


def test_external_data_through_an_escaping_symlink_is_refused(toy_external, secret):
    # The data file itself a symlink out. As a loose .onnx file, with no manifest scan in front,
    # the model check alone must catch it.
    (toy_external / "weights.bin").unlink()
    (toy_external / "weights.bin").symlink_to(secret)
    with pytest.raises(
        BundleError, match=r"location 'weights.bin' resolves through a symlink to .*secret.bin, outside"
    ):
        as_model_input(toy_external / "model.onnx")
    with pytest.raises(BundleError, match=r"listed file 'weights.bin' resolves through a symlink"):
        load_bundle(toy_external)


def test_external_data_through_a_symlinked_directory_is_refused(toy_external, secret):
    (toy_external / "data").symlink_to(secret.parent, target_is_directory=True)
    _rewrite_model(toy_external, _point_external("data/secret.bin"))
    with pytest.raises(BundleError, match=r"'data/secret.bin' resolves through a symlink to .*outside the bundle"):
        as_model_input(toy_external / "model.onnx")
    with pytest.raises(BundleError, match="may not contain symlinked directories"):
        load_bundle(toy_external)


def test_a_symlink_that_stays_inside_is_fine(toy_external):
    (toy_external / "weights.bin").rename(toy_external / "real.bin")
    (toy_external / "weights.bin").symlink_to("real.bin")
    assert as_model_input(toy_external / "model.onnx").inputs[0].name == "input_ids"


def test_external_data_in_subgraphs_and_sparse_initializers_is_checked(tmp_path, secret):
    outside = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    outside.ClearField("float_data")
    outside.data_location = onnx.TensorProto.EXTERNAL
    outside.external_data.add(key="location", value="../outside/secret.bin")
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then", [], [], [outside])
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c) => (float[4] y) { y = Identity(c) }
    """)
    model.graph.node[0].CopyFrom(
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="choose")
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "sub.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(
        BundleError, match=r"node 'choose' attribute '(then|else)_branch' subgraph: initializer 'w'.*climbs"
    ):
        as_model_input(tmp_path / "model" / "sub.onnx")

    sparse_model = toy_model()
    sparse = sparse_model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(outside)
    sparse.indices.CopyFrom(numpy_helper.from_array(np.arange(4, dtype=np.int64), "indices"))
    sparse.dims.append(4)
    (tmp_path / "model" / "sparse.onnx").write_bytes(sparse_model.SerializeToString())
    with pytest.raises(BundleError, match=r"sparse initializer 'w' \(values\).*climbs out"):
        as_model_input(tmp_path / "model" / "sparse.onnx")


def test_missing_or_short_external_data_is_refused(toy_external):
    weights = toy_external / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    rehash(toy_external)
    with pytest.raises(BundleError, match=r"external data file 'weights.bin' is 100 bytes, too short for"):
        load_bundle(toy_external)
    _rewrite_model(toy_external, _point_external("absent.bin"))
    with pytest.raises(BundleError, match=r"external data file 'absent.bin' cannot be read \(No such file"):
        as_model_input(toy_external / "model.onnx")


def test_an_in_memory_model_may_not_refer_to_external_data(toy_external):
    proto = onnx.load(str(toy_external / "model.onnx"), load_external_data=False)
    with pytest.raises(BundleError, match="the in-memory model: initializer 'embedding' refers to external data"):
        as_model_input(proto)


# ---------------------------------------------------------------------------------------------
# Resource limits


def test_a_bundle_over_the_size_limit_is_refused_before_hashing(toy, monkeypatch):
    import portable_moe.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "sha256_of", lambda path: pytest.fail("hashed a file of an oversized bundle"))
    with pytest.raises(BundleError, match=r"the bundle's files total [\d.]+ KiB, more than the limit of 100 B"):
        load_bundle(toy, max_bytes=100)
    monkeypatch.setenv(MAX_BYTES_ENV, "100")
    with pytest.raises(BundleError, match=f"more than the limit of 100 B; raise it with max_bytes= or {MAX_BYTES_ENV}"):
        load_bundle(toy)


def test_declared_tensor_bytes_count_against_the_limit(toy_external):
    model_path = toy_external / "model.onnx"
    declared = 2 * 16 * 4 * 4 + 8  # embedding, projection, the constant k
    assert model_path.stat().st_size < declared  # the file alone is under the limit...
    with pytest.raises(BundleError, match=r"the model declares 520 B of tensor data, more than the limit of 519 B"):
        load_model(model_path, max_bytes=declared - 1)  # ...what it declares is not
    assert load_model(model_path, max_bytes=declared).graph.initializer[0].raw_data


def test_a_loose_onnx_file_over_the_limit_is_not_read(toy, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "64")
    with pytest.raises(BundleError, match=r"model.onnx: [\d.]+ (B|KiB), more than the limit of 64 B"):
        as_model_input(toy / "model.onnx")


@pytest.mark.parametrize(
    ("raw", "expected"), [("", 64 * 2**30), ("4096", 4096), ("8G", 8 * 2**30), ("512MiB", 512 * 2**20), ("1t", 2**40)]
)
def test_size_limit_setting(monkeypatch, raw, expected):
    monkeypatch.setenv(MAX_BYTES_ENV, raw)
    assert max_bundle_bytes() == expected
    assert max_bundle_bytes(10) == 10


@pytest.mark.parametrize("raw", ["lots", "-5", "0", "1.5G"])
def test_a_bad_size_limit_setting_is_a_config_error(monkeypatch, raw):
    monkeypatch.setenv(MAX_BYTES_ENV, raw)
    with pytest.raises(ConfigError, match=f"{MAX_BYTES_ENV}=.* is not a size"):
        max_bundle_bytes()
    with pytest.raises(ConfigError, match="max_bytes must be a positive number of bytes, got 0"):
        max_bundle_bytes(0)


# ---------------------------------------------------------------------------------------------
# What the user sees


def test_the_cli_reports_a_hostile_bundle_in_one_line(toy, secret):
    _edit_manifest(toy, lambda m: m.update(model_file="../outside/secret.bin"))
    executable = shutil.which("portable-moe")
    command = [executable] if executable else [sys.executable, "-m", "portable_moe.cli"]
    result = subprocess.run(
        [*command, "run", str(toy)], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"}
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "manifest.json: model_file '../outside/secret.bin' climbs out of the bundle with '..'" in result.stderr
