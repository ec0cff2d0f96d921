"""Fuzzing: mutated bundles and models end in success or a PortableMoEError, never anything else.

Each example copies a valid toy bundle (inline weights, or weights in external data), damages it
once (bytes of model.onnx or manifest.json, fields of the parsed model, values in the manifest;
the manifest is re-hashed after model mutations so the sha256 check does not mask the parser),
then loads, compiles and runs it on cpu and reference. Bounded and derandomized for CI; the
longer search is ``python scripts/fuzz_bundles.py --count 3000``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portable_moe import errors
from portable_moe.testing.hostile import MUTATIONS, fuzz_case, write_toy_bundle

OUTCOMES = {"ok"} | {
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.PortableMoEError)
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    return {external: write_toy_bundle(root / f"toy-{external}", external_data=external) for external in (False, True)}


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every CI run; the script explores further
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(sorted(MUTATIONS)),
    external=st.booleans(),
    loose=st.booleans(),
)
def test_mutated_bundles_end_in_success_or_our_own_error(pristine, seed, kind, external, loose):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        # fuzz_case raises (failing the test) whatever is not a PortableMoEError.
        mutation, outcome = fuzz_case(
            pristine[external], Path(scratch) / "case", random.Random(seed), kind=kind, loose=loose
        )
    assert mutation == kind and outcome in OUTCOMES


def test_the_pristine_bundles_pass_the_pipeline(pristine, tmp_path):
    # Guards the fuzz test against a broken seed: mutations must start from a bundle that works.
    from portable_moe.testing.hostile import exercise_bundle

    for bundle in pristine.values():
        exercise_bundle(bundle)


def test_every_mutation_kind_is_reachable(pristine, tmp_path):
    for index, kind in enumerate(sorted(MUTATIONS)):
        assert fuzz_case(pristine[False], tmp_path / str(index), random.Random(index), kind=kind)[0] == kind
