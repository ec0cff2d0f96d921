"""The one worker pool: task function as a parameter, crashes, hangs and raising tasks, start failures."""

from __future__ import annotations

import os
import signal

import pytest

from portable_moe.errors import InputError
from portable_moe.run.pool import LostTask, WorkerPool, WorkerStartError, describe_exit

# Task functions live in a module the spawned workers can import (the pool sends them by reference).
POOL_TASKS = """
import os
import time

from portable_moe.run.pool import note_stage


def setup(offset):
    return {"offset": offset, "pid": os.getpid()}


def broken_setup(offset):
    raise SystemExit(3)


def work(task, state):
    note_stage("working on " + str(task))
    if task == "crash":
        os.abort()
    if task == "hang":
        time.sleep(60)
    if task == "raise":
        raise ValueError("bad task")
    return task + state["offset"]


def lost(task, why):
    return (task, why)
"""


@pytest.fixture
def pool_tasks(tmp_path, monkeypatch):
    (tmp_path / "pool_tasks.py").write_text(POOL_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers get this sys.path
    import pool_tasks

    yield pool_tasks
    monkeypatch.delitem(__import__("sys").modules, "pool_tasks")


def test_outcomes_come_back_in_order_from_the_task_function_given(pool_tasks):
    with WorkerPool(pool_tasks.work, pool_tasks.lost, jobs=2, setup=pool_tasks.setup, argument=10) as pool:
        seen = []
        assert pool.run([1, 2, 3, 4], on_result=seen.append) == [11, 12, 13, 14]
    assert sorted(seen) == [11, 12, 13, 14]


def test_a_crash_a_hang_and_a_raising_task_are_lost_alone(pool_tasks):
    tasks = [1, "crash", 2, "hang", "raise", 3]
    with WorkerPool(pool_tasks.work, pool_tasks.lost, jobs=1, timeout=3, setup=pool_tasks.setup, argument=0) as pool:
        outcomes = pool.run(tasks)
    assert [outcomes[0], outcomes[2], outcomes[5]] == [1, 2, 3]
    crash, hang, raised = (outcomes[1][1], outcomes[3][1], outcomes[4][1])
    assert crash.kind == "crashed" and crash.how.startswith("killed by SIGABRT") and crash.stage == "working on crash"
    assert hang == LostTask("timed-out", "", "working on hang", 3)
    assert raised.kind == "raised" and raised.how == "ValueError: bad task"


def test_workers_that_cannot_start_raise_after_the_allowed_failures(pool_tasks):
    with WorkerPool(pool_tasks.work, pool_tasks.lost, setup=pool_tasks.broken_setup, max_start_failures=1) as pool:
        with pytest.raises(
            WorkerStartError, match=r"worker processes exited with status 3 before taking a task"
        ) as error:
            pool.run([1])
    assert error.value.kind == "crashed"


def test_a_ctrl_c_while_a_worker_starts_does_not_reach_it(pool_tasks, monkeypatch, capfd):
    """The caller handles Ctrl-C; a worker sent one while its interpreter starts must neither die nor print."""
    spawn = WorkerPool._spawn

    def spawn_then_interrupt(pool):
        worker = spawn(pool)
        os.kill(worker.process.pid, signal.SIGINT)  # the worker is still starting Python
        return worker

    monkeypatch.setattr(WorkerPool, "_spawn", spawn_then_interrupt)
    with WorkerPool(pool_tasks.work, pool_tasks.lost, setup=pool_tasks.setup, argument=1, max_start_failures=0) as pool:
        assert pool.run([1, 2]) == [2, 3]
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_bad_pool_settings_are_refused(pool_tasks):
    with pytest.raises(InputError, match="--jobs must be at least 1 for worker processes, got 0"):
        WorkerPool(pool_tasks.work, pool_tasks.lost, jobs=0)
    with pytest.raises(InputError, match="--timeout must be a positive number of seconds, got 0"):
        WorkerPool(pool_tasks.work, pool_tasks.lost, timeout=0)


# A process that runs a task on a pool, then ends without closing it (as a Ray worker is ended at shutdown).
ABANDONING = """
import os, sys
sys.path.insert(0, sys.argv[1])
import pool_tasks
from portable_moe.run.pool import WorkerPool

pool = WorkerPool(pool_tasks.work, pool_tasks.lost, jobs=2, setup=pool_tasks.setup, argument=10)
assert pool.run([1, 2]) == [11, 12]
print(pool.directory, flush=True)
os._exit(0)  # no close(), no exit handlers
"""


def test_workers_remove_the_pool_directory_when_its_process_ends_without_closing_it(pool_tasks, tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    ended = subprocess.run(
        [sys.executable, "-c", ABANDONING, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert ended.returncode == 0, ended.stderr
    directory = Path(ended.stdout.strip())
    assert directory.name.startswith("portable-moe-worker-")
    deadline = time.monotonic() + 30
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not directory.exists()


def test_a_pool_given_a_directory_uses_it_and_removes_it_on_close(pool_tasks, tmp_path):
    directory = tmp_path / "pool"
    directory.mkdir()
    (directory / "shared.txt").write_text("a file of the caller's that the workers read")
    with WorkerPool(pool_tasks.work, pool_tasks.lost, setup=pool_tasks.setup, argument=1, directory=directory) as pool:
        assert pool.run([1]) == [2]
        assert sorted(path.name for path in directory.iterdir()) == ["shared.txt", "worker-1.log"]
    assert not directory.exists()


def test_exits_are_described_by_signal_or_status():
    assert describe_exit(-11) == "killed by SIGSEGV (segmentation fault)"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(None) == "gone without an exit status"
