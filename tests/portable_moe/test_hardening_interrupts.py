"""Interrupting an export or a compile leaves nothing half-written behind.

The exports are interrupted for real: the CLI runs in a subprocess, the test waits until its
staging directory (``.X.partial-*``) appears, then sends SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from portable_moe import load_bundle, registry
from portable_moe.bundle import bundle_writer
from portable_moe.testing.hostile import write_toy_bundle


def _cli() -> list[str]:
    executable = shutil.which("portable-moe")
    return [executable] if executable else [sys.executable, "-m", "portable_moe.cli"]


def _ctrl_c_as_in_a_terminal() -> None:
    """Run in the child before it starts: Ctrl-C at its default, as in a terminal's foreground.

    A shell without job control starts background commands with SIGINT ignored, and a child
    inherits that (Python then installs no handler for it): a test run started that way would send
    its Ctrl-C to a process that cannot hear it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pattern: str, directory: Path, process: subprocess.Popen, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while not list(directory.glob(pattern)):
        if process.poll() is not None:
            pytest.fail(f"the process ended before {pattern} appeared: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{pattern} did not appear within {limit} s")
        time.sleep(0.02)


def _traced_export(target: Path, extra_environment: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """``portable-moe export --preset tiny -o target``, started as from a terminal, output piped.

    Without the session's trace cache: a traced export leaves the signal seconds to arrive in.
    """
    environment = {name: value for name, value in os.environ.items() if name != "PORTABLE_MOE_TRACE_CACHE"}
    environment.update(extra_environment or {})
    return subprocess.Popen(
        [*_cli(), "export", "--preset", "tiny", "-o", str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=_ctrl_c_as_in_a_terminal,
        **popen,
    )


# Ctrl-C (SIGINT) is sent to a whole process group, later in the export, by the test after this one.
@pytest.mark.parametrize("sent", [signal.SIGTERM], ids=["SIGTERM"])
def test_an_interrupted_export_leaves_no_bundle_and_no_staging(tmp_path, sent):
    pytest.importorskip("torch", reason="exporting needs torch")
    target = tmp_path / "X"
    process = _traced_export(target)
    _wait_for(".X.partial-*", tmp_path, process)
    process.send_signal(sent)
    signalled = time.monotonic()
    try:
        _, errors = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the export did not stop within 60 s of {sent.name}")
    assert process.returncode != 0
    assert time.monotonic() - signalled < 60
    assert "interrupted" in errors and "Traceback" not in errors
    assert not target.exists()
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the tracing processes through /proc")
def test_ctrl_c_while_parts_trace_in_parallel_stops_every_process_and_leaves_no_bundle(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the exporting process and its tracing children."""
    pytest.importorskip("torch", reason="exporting needs torch")
    target = tmp_path / "X"
    # Children even on one core; a process group of its own, as a terminal gives a command.
    process = _traced_export(target, {"PORTABLE_MOE_PARALLEL_TRACING": "2"}, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (children := _children_of(process.pid)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no tracing process appeared: {process.communicate()}")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, errors = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the export did not stop within 60 s of Ctrl-C")
    assert process.returncode != 0
    assert "interrupted" in errors and "Traceback" not in errors
    for child in children:  # reaped: not even a zombie is left
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    assert not target.exists()
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_an_interrupted_overwrite_keeps_the_old_bundle(tmp_path, monkeypatch):
    """Interrupted between moving the old bundle aside and moving the new one in: the old one comes back."""
    import portable_moe.bundle as bundle_module

    target = write_toy_bundle(tmp_path / "bundle", seed=1)
    real_rename = os.rename

    def rename(source, destination):
        if Path(source).name.startswith(".bundle.partial-"):  # the new bundle's move into place
            raise KeyboardInterrupt
        return real_rename(source, destination)

    monkeypatch.setattr(bundle_module.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_toy_bundle(target, seed=2, overwrite=True)
    monkeypatch.undo()
    assert load_bundle(target).manifest["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_a_failed_block_removes_its_staging_directory(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with bundle_writer(tmp_path / "b") as staging:
            (staging / "model.onnx").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


LOST_INTERRUPT_SCRIPT = """
import gc, os, signal, sys
from pathlib import Path
from portable_moe.bundle import bundle_writer
from portable_moe.run.termination import install_termination_handler

install_termination_handler()


class SignalsWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # its KeyboardInterrupt is raised here, and Python drops it


with bundle_writer(Path(sys.argv[1]) / "b") as staging:
    (staging / "manifest.json").write_text("{}")
    SignalsWhenCollected()
    gc.collect()
    print("the block went on after the signal", flush=True)
"""


def test_an_interrupt_lost_in_a_finalizer_still_keeps_the_bundle_out(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOST_INTERRUPT_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    assert "the block went on after the signal" in result.stdout  # the KeyboardInterrupt was lost
    assert result.returncode != 0 and "interrupted while the bundle was written" in result.stderr
    assert "Exception ignored" not in result.stderr  # the lost one is not printed: it was acted on
    assert os.listdir(tmp_path) == []


COMPILE_SCRIPT = """
import sys
from portable_moe import get_backend, load_bundle
from portable_moe.run.termination import install_termination_handler

install_termination_handler()
get_backend("npu-sim").compile(load_bundle(sys.argv[1]), {"cache_dir": sys.argv[2]})
"""


@pytest.mark.skipif("npu-sim" not in registry.backend_names(), reason="the npu-sim backend is not installed")
def test_an_interrupted_compile_leaves_no_temporary_cache_files_and_no_trusted_partial_entry(tmp_path, tiny_bundle):
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(COMPILE_SCRIPT), str(tiny_bundle.path), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for("*/*.json", cache, process)  # the first compiled gear's entry is complete
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode != 0, "the compile finished before the signal: nothing was interrupted"
    assert "Terminated: terminated by SIGTERM" in errors
    assert not [path for path in cache.rglob("*") if path.name.endswith(".tmp")]
    # What the interrupted compile left is either whole or detected and rebuilt, never trusted.
    compiled = registry.get_backend("npu-sim").compile(tiny_bundle, {"cache_dir": str(cache)})
    statuses = [row.cache.split(" ")[0] for row in compiled.report().gears]
    assert set(statuses) <= {"hit", "miss", "rebuilt"} and "hit" in statuses
    fresh = registry.get_backend("npu-sim").compile(tiny_bundle, {"cache_dir": str(tmp_path / "fresh")})
    [(inputs, _)] = tiny_bundle.golden_sets()
    np.testing.assert_array_equal(compiled.run(inputs)["logits"], fresh.run(inputs)["logits"])
