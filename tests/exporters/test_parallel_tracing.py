"""Tracing the parts of a layer-wise export in forked processes: when, what comes back, and how it fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from exporters.parallel_tracing import ENVIRONMENT_VARIABLE, TracingFailed, run_traces, tracing_processes, usable_cores
from portable_moe.errors import ExportError

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="tracing processes are forked; this platform cannot")


@pytest.fixture
def cores(monkeypatch):
    """Set how many cores this process may use, and clear the settings that change the count."""
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)

    def set_cores(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)

    return set_cores


def test_one_process_per_usable_core_and_never_more_than_the_parts(cores):
    cores(2)
    assert usable_cores() == 2
    assert tracing_processes(4) == 2
    assert tracing_processes(1) == 1
    cores(8)
    assert tracing_processes(4) == 4
    cores(1)
    assert tracing_processes(4) == 1


def test_pytest_xdist_workers_share_the_cores(cores, monkeypatch):
    cores(2)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert usable_cores() == 1 and tracing_processes(4) == 1
    cores(8)
    assert usable_cores() == 4


def test_the_environment_variable_sets_the_most_processes(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    assert tracing_processes(4) == 1
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    assert tracing_processes(4) == 1
    cores(1)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "3")
    assert tracing_processes(4) == 3


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ExportError, match=r"PORTABLE_MOE_PARALLEL_TRACING is 'yes'; set it to the most processes"):
        tracing_processes(4)


def _gone(pid: int) -> bool:
    """True when no process has this id any more (a zombie still has one until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _pid() -> bytes:
    return str(os.getpid()).encode()


@needs_fork
def test_the_first_part_traces_here_then_children_take_the_longest_and_this_process_the_shortest(monkeypatch):
    """Tasks come longest first: children start from the front while this process traces from the back."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "3")
    told = []
    results = run_traces([_pid] * 5, list("abcde"), told.append)
    pids = [int(result) for result in results]
    assert pids[0] == pids[4] == os.getpid(), "the first part and the last (the shortest) trace here"
    assert len({pids[1], pids[2], os.getpid()}) == 3, "the two longest in two children of their own"
    assert all(_gone(pid) for pid in set(pids) - {os.getpid()}), "every child is reaped"
    assert told == ["tracing the other 4 parts in 3 processes side by side"]


@needs_fork
def test_with_more_processes_allowed_than_parts_left_this_process_still_traces_one(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "4")
    told = []
    pids = [int(result) for result in run_traces([_pid] * 3, list("abc"), told.append)]
    assert pids[0] == pids[2] == os.getpid() != pids[1]
    assert told == ["tracing the other 2 parts in 2 processes side by side"]


def test_in_one_process_a_failure_names_the_part(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")

    def broken() -> bytes:
        raise ValueError("no translation for aten::frobnicate")

    with pytest.raises(TracingFailed, match=r"^tracing layer kind 1 \(first at layer 1\): ValueError: no translation"):
        run_traces([_pid, broken], ["the head", "layer kind 1 (first at layer 1)"])


def _raises_value_error() -> bytes:
    raise ValueError("no translation for aten::frobnicate")


def _raises_export_error() -> bytes:
    raise ExportError("layers 1 and 2 have the same kind but different parameters")


def _killed() -> bytes:
    os.kill(os.getpid(), signal.SIGKILL)
    return b""


def _exits() -> bytes:
    os._exit(3)


@needs_fork
@pytest.mark.parametrize(
    ("task", "error", "message"),
    [
        (
            _raises_value_error,
            TracingFailed,
            r"^tracing the prologue: ValueError: no translation for aten::frobnicate$",
        ),
        (_raises_export_error, ExportError, r"^layers 1 and 2 have the same kind but different parameters$"),
        (
            _killed,
            TracingFailed,
            r"^tracing the prologue: its process ended \(killed by SIGKILL.*\) before it sent the graph$",
        ),
        (
            _exits,
            TracingFailed,
            r"^tracing the prologue: its process ended \(exited with status 3\) before it sent the graph$",
        ),
    ],
    ids=["raises", "export-error", "killed", "exits"],
)
def test_a_child_that_fails_fails_the_export_with_the_part_and_the_cause(monkeypatch, task, error, message):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "2")
    with pytest.raises(error, match=message):
        run_traces([_pid, task, _pid], ["the head", "the prologue", "layer kind 0 (first at layer 0)"])


@pytest.fixture
def ctrl_c_as_from_a_terminal():
    """Python's own Ctrl-C handler in this process, as a program started from a terminal has it.

    A test run started in the background (``pytest &``) inherits Ctrl-C ignored, and a tracing
    process keeps a signal its parent ignores: there no Ctrl-C would reach the children at all.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupted() -> bytes:
    os.kill(os.getpid(), signal.SIGINT)  # at its default in a child: the child dies of it
    time.sleep(60)
    return b""


@needs_fork
def test_a_child_that_ctrl_c_killed_makes_the_export_interrupted(monkeypatch, ctrl_c_as_from_a_terminal):
    """Ctrl-C reaches the children too, and one may die of it before this process raises KeyboardInterrupt."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "2")
    with pytest.raises(KeyboardInterrupt, match="tracing the prologue was interrupted"):
        run_traces([_pid, _interrupted, _pid], ["the head", "the prologue", "layer kind 0 (first at layer 0)"])


@needs_fork
def test_ctrl_c_the_moment_a_child_is_forked_is_an_interruption_not_a_traceback(
    monkeypatch, capfd, ctrl_c_as_from_a_terminal
):
    """The child starts with this process's handler, which raises; a signal before its own are set must wait."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "2")
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid == 0:  # the child, before multiprocessing's start-up code has run
            os.kill(os.getpid(), signal.SIGINT)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(KeyboardInterrupt, match="tracing the prologue was interrupted"):
        run_traces([_pid, _pid, _pid], ["the head", "the prologue", "layer kind 0 (first at layer 0)"])
    assert "Traceback" not in capfd.readouterr().err


INTERRUPTED_TRACING_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path

from exporters.parallel_tracing import run_traces

started_directory = Path(sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever the parent set
PARENT = os.getpid()


def first():
    return b""


def slow():
    if os.getpid() != PARENT:  # a child: counted, and looked for once the interrupt is over
        (started_directory / str(os.getpid())).touch()
    time.sleep(60)
    return b""


def interrupt_when_both_started():
    deadline = time.monotonic() + 30
    while len(list(started_directory.iterdir())) < 2:
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


threading.Thread(target=interrupt_when_both_started, daemon=True).start()
started = time.monotonic()
try:
    run_traces([first, slow, slow, slow], ["the head", "the prologue", "layer kind 0", "layer kind 1"])
    print("not interrupted")
except KeyboardInterrupt:
    def answers(pid):
        try:
            os.kill(pid, 0)  # a zombie (ended, not reaped) still answers
        except ProcessLookupError:
            return False
        return True

    alive = [path.name for path in started_directory.iterdir() if answers(int(path.name))]
    print(f"interrupted after {time.monotonic() - started:.1f} s; children left: {len(alive)}")
"""


@needs_fork
def test_an_interrupt_kills_and_reaps_the_children(tmp_path):
    """Ctrl-C (or SIGTERM through the termination handler, a KeyboardInterrupt too) while children trace.

    In a process of its own: a signal sent to the test process would reach whatever else runs there.
    """
    started = tmp_path / "started"
    started.mkdir()
    # Three processes: two children trace a slow part each, this process the third.
    environment = {**os.environ, ENVIRONMENT_VARIABLE: "3"}
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_TRACING_SCRIPT, str(started)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[:2] == ["interrupted", "after"], result.stdout
    assert float(words[2]) < 30
    assert result.stdout.strip().endswith("children left: 0")
    assert len(list(started.iterdir())) == 2
