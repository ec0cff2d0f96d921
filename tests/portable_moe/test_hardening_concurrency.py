"""Concurrency: one compiled model shared by threads, and processes racing to write the same bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from portable_moe import load_bundle, registry
from portable_moe.compare import compare_outputs
from portable_moe.testing.hostile import exercise_bundle, toy_model, toy_outputs, write_toy_bundle


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_one_compiled_model_run_from_many_threads_matches_sequential_runs(backend_name, tiny_bundle):
    compiled = registry.get_backend(backend_name).compile(tiny_bundle)
    generator = np.random.default_rng(7)
    vocab = tiny_bundle.config.vocab_size
    shapes = [(1, 4), (2, 9), (3, 16), (1, 1), (2, 5), (4, 3)]
    feeds = [{"input_ids": generator.integers(0, vocab, shape, dtype=np.int64)} for shape in shapes * 2]
    sequential = [compiled.run(feed) for feed in feeds]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(compiled.run, feeds * 2))
    for index, outputs in enumerate(concurrent):
        for name, value in sequential[index % len(feeds)].items():
            np.testing.assert_array_equal(outputs[name], value, err_msg=f"{backend_name} run {index}: {name}")


WRITER = """
import sys, time
from pathlib import Path
from portable_moe.errors import BundleError
from portable_moe.testing.hostile import write_toy_bundle

target, seed, rounds, overwrite, barrier, writers = sys.argv[1:7]
# Start together: every writer announces itself, then waits for the others.
(Path(barrier) / seed).touch()
while len(list(Path(barrier).iterdir())) < int(writers):
    time.sleep(0.001)
for _ in range(int(rounds)):
    try:
        write_toy_bundle(target, seed=int(seed), overwrite=overwrite == "1")
    except BundleError as error:
        print(f"refused: {error}")
        sys.exit(3)
"""


def _writers(target, seeds, rounds: int, overwrite: bool) -> list[subprocess.CompletedProcess]:
    barrier = target.parent / f".barrier-{target.name}"
    barrier.mkdir()
    arguments = [str(target), "", str(rounds), str(int(overwrite)), str(barrier), str(len(seeds))]
    processes = []
    for seed in seeds:
        arguments[1] = str(seed)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(WRITER), *arguments],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [
        subprocess.CompletedProcess(process.args, process.wait(timeout=300), *process.communicate())
        for process in processes
    ]
    shutil.rmtree(barrier)
    return results


def test_processes_overwriting_the_same_bundle_leave_one_whole_bundle(tmp_path):
    target = tmp_path / "shared"
    seeds = [11, 12, 13]
    results = _writers(target, seeds, rounds=30, overwrite=True)
    assert [result.returncode for result in results] == [0, 0, 0], [(r.stdout, r.stderr) for r in results]
    bundle = load_bundle(target)  # every file's hash matches its manifest
    seed = bundle.manifest["seed"]
    assert seed in seeds
    # Model, golden data and manifest all come from the same writer.
    [(inputs, expected)] = bundle.golden_sets()
    assert all(c.passed for c in compare_outputs(toy_outputs(toy_model(seed), inputs["input_ids"]), expected, {}))
    exercise_bundle(target)
    assert sorted(os.listdir(tmp_path)) == ["shared"]  # no staging or displaced bundle left behind


def test_processes_racing_to_create_a_bundle_one_wins_the_others_are_refused(tmp_path):
    target = tmp_path / "fresh"
    results = _writers(target, [21, 22, 23], rounds=1, overwrite=False)
    codes = sorted(result.returncode for result in results)
    assert codes == [0, 3, 3], [(result.returncode, result.stderr) for result in results]
    assert all("already exists" in result.stdout for result in results if result.returncode == 3)
    assert load_bundle(target).manifest["seed"] in (21, 22, 23)
    assert sorted(os.listdir(tmp_path)) == ["fresh"]


def test_a_writer_overtaken_between_its_two_renames_still_lands_whole(tmp_path, monkeypatch):
    """The race the process test may or may not hit, forced: writer B lands while A has the old bundle aside."""
    target = write_toy_bundle(tmp_path / "bundle", seed=1)
    real_rename, real_replace = os.rename, os.replace
    overtaken = []

    def overtake_once(rename):
        def wrapped(source, destination):
            result = rename(source, destination)
            if not overtaken and Path(destination).name == "old":  # A has just moved the old bundle aside
                overtaken.append(True)
                write_toy_bundle(target, seed=2, overwrite=True)  # B writes its whole bundle right then
            return result

        return wrapped

    monkeypatch.setattr(os, "rename", overtake_once(real_rename))
    monkeypatch.setattr(os, "replace", overtake_once(real_replace))
    write_toy_bundle(target, seed=3, overwrite=True)  # writer A
    monkeypatch.undo()
    assert overtaken
    assert load_bundle(target).manifest["seed"] == 3  # the last to finish wins, whole
    exercise_bundle(target)
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
