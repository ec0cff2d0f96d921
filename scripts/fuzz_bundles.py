"""Fuzz the bundle pipeline: damaged bundles must end in success or a PortableMoEError, nothing else.

Each case copies a valid toy bundle (or the bundle given with --bundle), damages it once (see
``portable_moe.testing.hostile.MUTATIONS``), then loads, compiles and runs it on the backends. The cases
run in a worker process that this script watches, so a crash (segfault, abort) or a hang is
caught, recorded with the case number, and the worker restarted after it::

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
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# A case is a model mutation loaded through the bundle or as a loose .onnx file, on a bundle with
# inline weights or with external data; these fractions pick among them.
EXTERNAL_SHARE = 0.3
LOOSE_SHARE = 0.3
# Marks the worker's report lines on its stdout.
PROTOCOL_PREFIX = "@@fuzz "


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


def worker(args: argparse.Namespace) -> int:
    """Run cases ``start`` .. ``stop - 1``, reporting a JSON line as each starts and ends.

    The reports go to the original stdout; everything else that writes to stdout (ONNX Runtime
    prints some errors there, from native code too) is sent to stderr.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with tempfile.TemporaryDirectory(prefix="fuzz-worker-") as scratch:
        pristine = pristine_bundles(Path(scratch), args.bundle)
        for index in range(args.start, args.stop):
            protocol.write(PROTOCOL_PREFIX + json.dumps({"started": index}) + "\n")
            record = run_case(pristine, Path(scratch), args.seed, index, args.backends)
            protocol.write(PROTOCOL_PREFIX + json.dumps(record) + "\n")
    return 0


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"worker killed by {signal.Signals(-code).name}"
    return f"worker exited with status {code} in the middle of the case"


def _reader(stream: Any, lines: list[str], ready: threading.Event) -> None:
    for line in stream:
        lines.append(line)
        ready.set()
    ready.set()


def supervise(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``count`` cases in worker processes; restart a worker after a crash or hang."""
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    next_index, stop = args.seed_start, args.seed_start + args.count
    started_at = time.monotonic()
    while next_index < stop:
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--seed",
            str(args.seed),
            "--start",
            str(next_index),
            "--stop",
            str(stop),
            "--backends",
            ",".join(args.backends),
            *(["--bundle", args.bundle] if args.bundle else []),
        ]
        # stderr goes to a file: a worker that logs a lot must not block on a full pipe (a false hang).
        errors = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines: list[str] = []
        ready = threading.Event()
        reader = threading.Thread(target=_reader, args=(process.stdout, lines, ready), daemon=True)
        reader.start()
        current: int | None = None
        hung = False
        last_progress = time.monotonic()
        while True:
            ready.wait(0.5)
            ready.clear()
            while lines:
                line = lines.pop(0)
                if not line.startswith(PROTOCOL_PREFIX):
                    continue
                message = json.loads(line[len(PROTOCOL_PREFIX) :])
                last_progress = time.monotonic()
                if "started" in message:
                    current = message["started"]
                else:
                    records.append(message)
                    if message["outcome"] == "unexpected":
                        failures.append(message)
                    next_index = message["index"] + 1
                    current = None
                    if not args.quiet and len(records) % 250 == 0:
                        print(f"  {len(records)} cases, {len(failures)} failures", file=sys.stderr)
            if process.poll() is not None and not reader.is_alive() and not lines:
                break
            if current is not None and time.monotonic() - last_progress > args.timeout:
                process.kill()
                process.wait()
                failures.append({"index": current, "outcome": "hang", "error": f"no result within {args.timeout} s"})
                records.append(failures[-1])
                next_index = current + 1
                current, hung = None, True
                break
        errors.seek(0)
        worker_errors = errors.read()[-2000:]
        errors.close()
        if current is not None:  # the worker died in the middle of a case
            failure = {"index": current, "outcome": "crash", "error": _describe_exit(process.returncode)}
            failures.append({**failure, "stderr": worker_errors})
            records.append(failure)
            next_index = current + 1
        elif process.returncode not in (0, None) and not hung and next_index < stop:
            raise SystemExit(f"worker failed outside any case (exit {process.returncode}): {worker_errors}")
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if args.worker:
        return worker(args)
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
