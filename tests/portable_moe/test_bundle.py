"""Bundle round trip, verification, and atomic writing."""

import json
import os
import stat
import sys

import numpy as np
import pytest

from portable_moe import BundleError, load_bundle
from portable_moe.bundle import bundle_writer


def test_round_trip(tiny_bundle):
    bundle = load_bundle(tiny_bundle.path)
    manifest = bundle.manifest
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0 and manifest["moe_lowering"] == "dense"
    assert manifest["opset"] == 20 and manifest["versions"]["torch"] and manifest["versions"]["onnx"]
    assert [spec.name for spec in bundle.inputs] == ["input_ids"]
    assert bundle.inputs[0].shape == ("batch", "seq") and bundle.inputs[0].dtype == "int64"
    assert bundle.routing_outputs == {"expert_ids_layer1": 1, "expert_ids_layer2": 2}
    assert bundle.config.name == "tiny"
    [(inputs, outputs)] = bundle.golden_sets()
    assert inputs["input_ids"].shape == (2, 16)
    assert outputs["logits"].shape == (2, 16, 256) and outputs["expert_ids_layer1"].shape == (2, 16, 2)
    assert set(manifest["files"]) == {
        "model.onnx",
        "test_data_set_0/input_0.pb",
        "test_data_set_0/output_0.pb",
        "test_data_set_0/output_1.pb",
        "test_data_set_0/output_2.pb",
    }


def test_loading_does_not_import_torch(tiny_bundle):
    import subprocess

    code = (
        "import sys, portable_moe; b = portable_moe.load_bundle(sys.argv[1]); "
        "r = portable_moe.check_bundle(b, ['cpu']); assert r[0].passed, r[0].reason; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_bundle.path)], check=True)


def test_one_changed_byte_is_refused(tiny_bundle_copy):
    model = tiny_bundle_copy.path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match the manifest"):
        load_bundle(tiny_bundle_copy.path)


def test_changed_golden_data_is_refused(tiny_bundle_copy):
    path = tiny_bundle_copy.path / "test_data_set_0" / "output_0.pb"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BundleError, match="output_0.pb: sha256 does not match"):
        load_bundle(tiny_bundle_copy.path)


def test_missing_and_unlisted_files_are_refused(tiny_bundle_copy):
    (tiny_bundle_copy.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"file\(s\) not in the manifest: extra.bin"):
        load_bundle(tiny_bundle_copy.path)
    (tiny_bundle_copy.path / "extra.bin").unlink()
    (tiny_bundle_copy.path / "test_data_set_0" / "input_0.pb").unlink()
    with pytest.raises(BundleError, match="'test_data_set_0/input_0.pb' listed in the manifest is missing"):
        load_bundle(tiny_bundle_copy.path)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "manifest.json: not valid JSON"),
        ('["a list"]', "not a portable-moe bundle manifest"),
        ('{"format": "portable-moe-bundle", "format_version": 99}', "format version 99 is not supported"),
    ],
)
def test_bad_manifests_are_refused(tiny_bundle_copy, manifest, message):
    (tiny_bundle_copy.path / "manifest.json").write_text(manifest)
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny_bundle_copy.path)


def test_missing_or_wrong_paths(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory; create one with 'portable-moe export'"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="a bundle is a directory"):
        load_bundle(tmp_path / "file")
    with pytest.raises(BundleError, match="no manifest.json; this is not a portable-moe bundle"):
        load_bundle(tmp_path)


def test_malformed_manifest_is_refused(tiny_bundle_copy):
    manifest_path = tiny_bundle_copy.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["inputs"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed manifest"):
        load_bundle(tiny_bundle_copy.path)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with bundle_writer(target) as staging:
            (staging / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_writer_refuses_to_overwrite_and_replaces_atomically_when_told(tmp_path, tiny_bundle):
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, target)
    # Refused on entry, before the block could stage anything.
    with pytest.raises(BundleError, match="already exists"):
        bundle_writer(target).__enter__()
    # A failed overwrite keeps the old bundle whole.
    with pytest.raises(RuntimeError):
        with bundle_writer(target, overwrite=True) as staging:
            (staging / "model.onnx").write_bytes(b"new")
            raise RuntimeError("export failed")
    assert load_bundle(target).manifest["preset"] == "tiny"
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_golden_outputs_match_the_reference(tiny_bundle):
    torch = pytest.importorskip("torch", reason="needs torch (pip install 'portable-moe[export]')")
    from exporters.reference_model import build_model

    [(inputs, outputs)] = tiny_bundle.golden_sets()
    model = build_model(tiny_bundle.config, tiny_bundle.manifest["seed"])
    with torch.no_grad():
        logits, _ = model(torch.tensor(inputs["input_ids"]))
    np.testing.assert_array_equal(logits.numpy(), outputs["logits"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_bundle_directory_permissions_follow_the_umask(tmp_path, tiny_bundle, umask):
    from portable_moe.bundle import current_umask

    target = tmp_path / "bundle"
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        with bundle_writer(target) as staging:
            (staging / "manifest.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(tiny_bundle.path.stat().st_mode) == 0o777 & ~previous  # the exporter's bundle too
