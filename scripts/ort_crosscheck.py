"""Cross-check the op suite's counts for ``cpu`` against a plain loop over raw ONNX Runtime.

    python scripts/ort_crosscheck.py                      # every case of the default selection
    python scripts/ort_crosscheck.py --include '^test_add' --show 20
    python scripts/ort_crosscheck.py --strict             # the cases' own tolerances in the op suite too

The raw loop shares nothing with portable-moe's running or comparing code: it opens one
``onnxruntime.InferenceSession`` per case, feeds each data set by graph-input order and compares
the way onnx's own backend-test runner does (dtypes equal, then ``numpy.testing.assert_allclose``
with the case's rtol/atol for floats, exact equality otherwise). It prints how many cases pass in
each, the difference as a share of the cases, and the cases on which the two disagree. Exit 1
when they differ by more than ``--limit`` (1% of the cases by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from portable_moe import opsuite


def _same(expected: Any, actual: Any, rtol: float, atol: float) -> bool:
    """Whether one output matches, as onnx's backend-test runner judges it."""
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_same(e, a, rtol, atol) for e, a in zip(expected, actual))
        )
    actual = np.asarray(actual)
    if expected.dtype.kind in "OUS":
        return actual.shape == expected.shape and bool(np.all(actual.astype(object) == expected.astype(object)))
    if actual.dtype != expected.dtype:
        return False
    try:
        if expected.dtype.kind == "f" or expected.dtype.name.startswith(("float", "bfloat")):
            np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(actual, expected)
    except AssertionError:
        return False
    return True


def raw_onnxruntime_passes(cases: Sequence[opsuite.OpCase]) -> set[str]:
    """Names of the cases that plain ONNX Runtime (CPU provider) runs to the expected outputs."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    passed = set()
    for case in cases:
        model = onnx.load_model_from_string(case.model)
        initializers = {tensor.name for tensor in model.graph.initializer}
        names = [value.name for value in model.graph.input if value.name not in initializers]
        try:
            session = onnxruntime.InferenceSession(case.model, options, providers=["CPUExecutionProvider"])
            ok = True
            for inputs, outputs in case.data_sets:
                results = session.run(None, dict(zip(names, inputs)))
                ok = ok and all(_same(e, a, case.rtol, case.atol) for e, a in zip(outputs, results))
        except Exception:  # any refusal or failure of the runtime: not passed
            ok = False
        if ok:
            passed.add(case.name)
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--include", action="append", default=[], metavar="REGEX", help="only matching cases")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="op-suite worker processes (0: in this process)"
    )
    parser.add_argument("--strict", action="store_true", help="the op suite uses the cases' own tolerances only")
    parser.add_argument("--limit", type=float, default=0.01, help="largest allowed difference, as a share of cases")
    parser.add_argument("--show", type=int, default=50, help="how many disagreeing cases to list")
    args = parser.parse_args(argv)

    cases = opsuite.select_cases(opsuite.collect_cases(), args.include)
    started = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        raw = raw_onnxruntime_passes(cases)
    raw_seconds = time.perf_counter() - started
    started = time.perf_counter()
    results = opsuite.run_tasks(opsuite.op_tasks(cases, ["cpu"], args.strict), cases, args.jobs)
    suite_seconds = time.perf_counter() - started
    # What passed in the op suite, whatever the expected-failures list says about it.
    suite = {r.case for r in results if (r.listed_outcome or r.status) == opsuite.PASSED}
    difference = len(raw ^ suite)
    share = difference / len(cases) if cases else 0.0
    print(f"cases: {len(cases)}")
    print(f"raw onnxruntime loop: {len(raw)} passed ({raw_seconds:.1f} s)")
    strict = " --strict" if args.strict else ""
    print(f"portable-moe conformance ops --backend cpu{strict}: {len(suite)} passed ({suite_seconds:.1f} s)")
    print(f"cases on which they disagree: {difference} ({share:.2%} of the cases; limit {args.limit:.0%})")
    by_case = {r.case: r for r in results}
    for name in sorted(raw ^ suite)[: args.show]:
        outcome = by_case[name]
        side = "raw only" if name in raw else "op suite only"
        print(f"  {side:<13} {name}: {outcome.status} {outcome.code} {outcome.reason[:160]}")
    return 1 if share > args.limit else 0


if __name__ == "__main__":  # worker processes are spawned: the guard keeps them from running this again
    sys.exit(main())
