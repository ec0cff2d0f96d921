"""Statuses are one enum, whose members print and serialise as the words reports have always used."""

from __future__ import annotations

import json

from portable_moe.conformance import model_check
from portable_moe.run import fallback, isolated, pool
from portable_moe.statuses import Status


def test_every_module_takes_its_statuses_from_the_one_enum():
    used = [
        model_check.PASSED,
        model_check.FAILED,
        model_check.ERROR,
        model_check.UNAVAILABLE,
        model_check.SKIPPED,
        fallback.RAN,
        fallback.COMPILED,
        fallback.COMPILE_FAILED,
        fallback.RUN_FAILED,
        fallback.CRASHED,
        fallback.TIMED_OUT,
        isolated.RAN,
        isolated.FAILED,
        pool.CRASHED,
        pool.TIMED_OUT,
        pool.RAISED,
    ]
    assert all(type(status) is Status for status in used)
    assert fallback.UNAVAILABLE is model_check.UNAVAILABLE and isolated.FAILED is model_check.FAILED


def test_a_status_prints_and_serialises_as_its_word():
    assert Status.TIMED_OUT == "timed-out"
    assert f"{Status.PASSED}" == "passed"
    assert json.dumps({"status": Status.COMPILE_FAILED}) == '{"status": "compile-failed"}'
    assert Status("unsupported") is Status.UNSUPPORTED
