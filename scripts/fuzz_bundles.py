"""Fuzz the bundle pipeline: damaged bundles must end in success or a PortableMoEError, nothing else.

Each case copies a valid toy bundle (or the bundle given with --bundle), damages it once (see
``portable_moe.testing.hostile.MUTATIONS``), then loads, compiles and runs it on the backends. The cases
run in worker processes of portable-moe's worker pool (portable_moe.run.pool), so a crash
(segfault, abort) or a hang is caught, recorded with the case number, and the worker replaced::

    python scripts/fuzz_bundles.py --count 3000
    python scripts/fuzz_bundles.py --count 1000 --bundle build/tiny --backends cpu
    python scripts/fuzz_bundles.py --reproduce 1234        # rerun one case, with its traceback

Every case is reproducible from --seed and its number. Exit status 1 if any case crashed, hung
or raised an exception that is not a PortableMoEError. Not part of the test suite (the suite
runs a bounded version: tests/portable_moe/test_hardening_fuzz.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from portable_moe.run.pool import CRASHED, TIMED_OUT, LostTask, WorkerPool

# A case is a model mutation loaded through the bundle or as a loose .onnx file, on a bundle with
# inline weights or with external data; these fractions pick among them.
EXTERNAL_SHARE = 0.3
LOOSE_SHARE = 0.3


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def run_case(pristine: dict[bool, Path], scratch: Path, seed: int, index: int, backends: list[str]) -> dict[str, Any]:
    """One case; every outcome comes back as a record (a non-PortableMoEError is 'unexpected')."""
    from portable_moe.testing.hostile import fuzz_case

    rng = case_rng(seed, index)
    external = rng.random() < EXTERNAL_SHARE and True in pristine
    loose = rng.random() < LOOSE_SHARE
    workdir = scratch / f"case-{index}"
    record: dict[str, Any] = {"index": index, "external": external, "loose": loose}
    try:
        kind, outcome = fuzz_case(pristine[external], workdir, rng, loose=loose, backends=backends)
        record.update(kind=kind, outcome=outcome)
    except Exception as error:
        record.update(kind="?", outcome="unexpected", error=f"{type(error).__name__}: {error}"[:500])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def pristine_bundles(root: Path, bundle: str | None) -> dict[bool, Path]:
    from portable_moe.testing.hostile import write_toy_bundle

    if bundle:
        return {False: Path(bundle)}
    return {external: write_toy_bundle(root / f"toy-{external}", external_data=external) for external in (False, True)}


def worker_setup(settings: dict[str, Any]) -> dict[str, Any]:
    """Once per worker process: its own scratch directory and pristine bundles to damage copies of."""
    scratch = Path(tempfile.mkdtemp(prefix="worker-", dir=settings["scratch"]))
    return {**settings, "scratch": scratch, "pristine": pristine_bundles(scratch, settings["bundle"])}


def worker_case(index: int, state: dict[str, Any]) -> dict[str, Any]:
    """The pool's task function: one case, run in a worker process."""
    return run_case(state["pristine"], state["scratch"], state["seed"], index, state["backends"])


def lost_case(index: int, lost: LostTask) -> dict[str, Any]:
    """A case whose worker crashed or hung (the pool has replaced the worker)."""
    if lost.kind == TIMED_OUT:
        return {"index": index, "outcome": "hang", "error": f"no result within {lost.seconds:g} s"}
    if lost.kind == CRASHED:
        error = f"worker {lost.how} in the middle of the case" + (f" (at {lost.frame})" if lost.frame else "")
        return {"index": index, "outcome": "crash", "error": error}
    return {"index": index, "kind": "?", "outcome": "unexpected", "error": lost.how[:500]}


def supervise(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``count`` cases in worker processes of the pool; a crash or hang loses one case, not the run."""
    records: list[dict[str, Any]] = []
    started_at = time.monotonic()

    def progress(record: dict[str, Any]) -> None:
        records.append(record)
        if not args.quiet and len(records) % 250 == 0:
            failed = sum(r["outcome"] in ("unexpected", "crash", "hang") for r in records)
            print(f"  {len(records)} cases, {failed} failures", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        settings = {"scratch": scratch, "seed": args.seed, "backends": args.backends, "bundle": args.bundle}
        with WorkerPool(
            worker_case, lost_case, args.jobs, args.timeout, setup=worker_setup, argument=settings, name="fuzz"
        ) as pool:
            records = pool.run(range(args.seed_start, args.seed_start + args.count), on_result=progress)
    failures = [record for record in records if record["outcome"] in ("unexpected", "crash", "hang")]
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in records:
        by_kind[record.get("kind", "?")][record["outcome"]] += 1
    return {
        "seed": args.seed,
        "cases": len(records),
        "seconds": round(time.monotonic() - started_at, 1),
        "backends": args.backends,
        "bundle": args.bundle or "toy (inline and external-data weights)",
        "crashes": sum(f["outcome"] == "crash" for f in failures),
        "hangs": sum(f["outcome"] == "hang" for f in failures),
        "unexpected": sum(f["outcome"] == "unexpected" for f in failures),
        "by_kind": {kind: dict(counter) for kind, counter in sorted(by_kind.items())},
        "failures": failures,
    }


def reproduce(args: argparse.Namespace) -> int:
    """Rerun one case in this process and show the full outcome (with a traceback if unexpected)."""
    from portable_moe.errors import PortableMoEError
    from portable_moe.testing.hostile import fuzz_case

    with tempfile.TemporaryDirectory(prefix="fuzz-reproduce-") as scratch:
        pristine = pristine_bundles(Path(scratch), args.bundle)
        rng = case_rng(args.seed, args.reproduce)
        external = rng.random() < EXTERNAL_SHARE and True in pristine
        loose = rng.random() < LOOSE_SHARE
        workdir = Path(scratch) / "case"
        print(f"case {args.reproduce}: external data {external}, loose file {loose}; damaged copy in {workdir}")
        try:
            kind, outcome = fuzz_case(pristine[external], workdir, rng, loose=loose, backends=args.backends)
            print(f"mutation {kind}: {outcome}")
        except PortableMoEError:
            raise
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="cases to run (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    parser.add_argument("--first", dest="seed_start", type=int, default=0, help="number of the first case")
    parser.add_argument("--bundle", help="fuzz this bundle instead of the toy bundles")
    parser.add_argument("--backends", default="cpu,reference", help="backends to compile and run on")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one case may take before it is a hang")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--reproduce", type=int, metavar="CASE", help="rerun one case here, with its traceback")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if args.reproduce is not None:
        return reproduce(args)
    summary = supervise(args)
    print(f"inputs tried: {summary['cases']} in {summary['seconds']} s (seed {summary['seed']})")
    for kind, outcomes in summary["by_kind"].items():
        print(f"  {kind}: " + ", ".join(f"{outcome} {count}" for outcome, count in sorted(outcomes.items())))
    print(f"crashes: {summary['crashes']}, hangs: {summary['hangs']}, unexpected exceptions: {summary['unexpected']}")
    for failure in summary["failures"]:
        print(f"  case {failure['index']}: {failure['outcome']}: {failure.get('error', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
