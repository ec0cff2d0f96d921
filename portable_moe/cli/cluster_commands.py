"""The command line of cluster runs: ``portable-moe worker`` and ``--cluster`` on check, conformance ops and bench.

``check``, ``bench`` and ``conformance ops`` hand their parsed arguments here when ``--cluster`` is
given; reports have the local layout plus the node of each result (:mod:`portable_moe.cluster.report`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from importlib import util
from pathlib import Path
from typing import Any

from portable_moe.cluster.gather import connected
from portable_moe.cluster.jobs import ClusterRun
from portable_moe.cluster.nodes import advertisement, cluster_nodes, ray_start_command, resolve_cluster_backends
from portable_moe.cluster.report import annotate_report, describe_skew, stamp_name, version_skew
from portable_moe.errors import BackendUnavailableError, InputError


def add_cluster_flag(command: argparse.ArgumentParser) -> None:
    """Add ``--cluster ADDRESS|auto`` to a subcommand."""
    command.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on the Ray cluster whose head is at ADDRESS (HOST:PORT), or 'auto' for the one running "
        "locally; each backend runs on the nodes that advertise it (docs/cluster.md)",
    )


def add_command(commands: Any) -> None:
    """Add ``worker`` to the CLI."""
    worker = commands.add_parser(
        "worker",
        help="join a Ray cluster (or start one) advertising this machine's available backends",
        description="Probe this machine's backends and run 'ray start' in the foreground with one custom "
        "resource per available backend (portable-moe/NAME) and the runtime versions as node labels. "
        "Stop it (Ctrl-C) to take the machine out of the cluster.",
    )
    where = worker.add_mutually_exclusive_group(required=True)
    where.add_argument("--join", metavar="ADDRESS", help="the head node's address, HOST:PORT (e.g. 10.0.0.1:6379)")
    where.add_argument("--head", action="store_true", help="start a new cluster with this machine as its head")
    worker.add_argument("--port", type=int, help="with --head: the port to listen on (default: Ray's, 6379)")
    worker.add_argument("--num-cpus", type=int, help="CPUs this machine gives the cluster (default: all)")
    worker.add_argument("--dry-run", action="store_true", help="print what would be advertised and the command")
    worker.set_defaults(handler=command_worker)


def command_worker(args: argparse.Namespace) -> int:
    """``portable-moe worker``: advertise this machine's backends to a Ray cluster, in the foreground."""
    from rich.markup import escape

    from portable_moe.cli.console import EXIT_OK, stderr, stdout

    if args.num_cpus is not None and args.num_cpus < 1:
        raise InputError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    if args.port is not None and not args.head:
        raise InputError("--port goes with --head; a joining worker takes the head's address from --join")
    offer = advertisement()
    for name, reason in offer.unavailable:
        stderr.print(f"[yellow]not offered: {escape(name)}[/yellow]: {escape(reason)}")
    if not offer.backends:
        raise BackendUnavailableError(
            "no backend is available on this machine, so it has nothing to offer the cluster; "
            "'portable-moe backends' shows why each is unavailable"
        )
    versions = ", ".join(f"{key.split('/')[-1]} {value}" for key, value in sorted(offer.labels.items()))
    stdout.print(f"offering {', '.join(offer.backends)} ({escape(versions)})")
    command = ray_start_command(offer, args.join, args.num_cpus, args.port)
    if args.dry_run:
        stdout.print(escape(shlex.join(command)), soft_wrap=True)
        return EXIT_OK
    if util.find_spec("ray") is None:
        raise InputError("'portable-moe worker' needs Ray: pip install 'portable-moe[cluster]'")
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: let ray take the node's processes down with it
        process.terminate()
        process.wait(timeout=60)
        raise
    if code != 0:
        raise InputError(f"'ray start' exited with code {code}; its output above says why")
    return EXIT_OK


def _print_where(results_backends: Sequence[str], run: ClusterRun) -> None:
    """Where the results ran (backend -> node and count), infrastructure errors, and version skew."""
    from rich.markup import escape
    from rich.table import Table

    from portable_moe.cli.console import stderr, stdout

    counts: dict[str, Counter[str]] = {}
    for backend, stamp in zip(results_backends, run.stamps):
        counts.setdefault(backend, Counter())[stamp_name(stamp) or "(did not finish)"] += 1
    table = Table(title="Where each backend ran")
    for column in ("backend", "node", "results"):
        table.add_column(column)
    for backend, per_node in counts.items():
        for node, count in per_node.items():
            table.add_row(backend, escape(node), str(count))
    stdout.print(table)
    infrastructure = sum(run.infrastructure)
    if infrastructure:
        stderr.print(
            f"[yellow]{infrastructure} result(s) are infrastructure errors[/yellow] (a node died or a worker "
            "crashed; not a verdict on the backend): see their reasons"
        )
    for line in describe_skew(version_skew(zip(results_backends, run.stamps))):
        stderr.print(f"[yellow]version skew[/yellow] {escape(line)}")


def command_check_on_cluster(args: argparse.Namespace) -> int:
    """``portable-moe check --cluster``: one task per backend; the local report plus nodes."""
    from portable_moe.bundle import load_bundle
    from portable_moe.cli.check_report import finish_check
    from portable_moe.cli.console import parse_options, show_step, stderr
    from portable_moe.cluster.jobs import check_on_cluster
    from portable_moe.conformance.model_check import GOLDEN, input_sets_for, junit_cases, report_dict
    from portable_moe.run.fallback import spread_options

    bundle = load_bundle(args.bundle)
    expected_from, input_sets = input_sets_for(bundle, args.inputs)
    with connected(args.cluster):
        names = resolve_cluster_backends(args.backend, cluster_nodes())
        options = spread_options(names, parse_options(args.option)) if args.option else None
        run = check_on_cluster(
            bundle,
            names,
            options,
            input_sets=None if expected_from == GOLDEN else input_sets,
            bisect=args.bisect,
            progress=show_step,
        )
    _print_where(names, run)
    if args.json or args.html:
        report = annotate_report(report_dict(bundle, run.results, expected_from), run, names, args.cluster)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))
            stderr.print(f"report written to {args.json}")
        if args.html:
            from portable_moe.conformance.report_html import write_html

            write_html(report, args.html)
            stderr.print(f"HTML report written to {args.html}")
    if args.junit:
        from portable_moe.cluster.report import write_junit_with_nodes

        node_by_backend = {name: stamp_name(stamp) for name, stamp in zip(names, run.stamps)}
        write_junit_with_nodes(
            junit_cases(run.results),
            lambda case: node_by_backend.get(case.backend, ""),
            args.junit,
            f"portable-moe check {bundle.name}",
        )
        stderr.print(f"JUnit XML written to {args.junit}")
    return finish_check(bundle, run.results, None, require_all=args.backend != "all", expected_from=expected_from)


def command_ops_on_cluster(args: argparse.Namespace) -> int:
    """``portable-moe conformance ops --cluster``: the suite sharded over the nodes offering each backend."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from portable_moe.cli.console import EXIT_FAILED, EXIT_OK, stderr, stdout
    from portable_moe.cli.ops_report import print_report
    from portable_moe.cluster.jobs import ops_on_cluster
    from portable_moe.conformance.model_check import ERROR, FAILED
    from portable_moe.conformance.ops import collect_cases, report_dict, select_cases

    if args.jobs < 0:
        raise InputError(f"--jobs must be 0 (run in the Ray worker) or more, got {args.jobs}")
    cases = select_cases(
        collect_cases(), args.include or (), args.exclude or (), default_excludes=args.default_excludes
    )
    with connected(args.cluster):
        names = resolve_cluster_backends(args.backend, cluster_nodes())
        started = time.perf_counter()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=stderr) as progress:
            bars = {name: progress.add_task(f"{name:<12}", total=len(cases)) for name in names}
            run = ops_on_cluster(
                cases,
                names,
                jobs=min(args.jobs, 1),
                timeout=args.timeout,
                on_shard=lambda backend, count: progress.advance(bars[backend], count),
            )
        elapsed = time.perf_counter() - started
    print_report(stdout, run.results, names, args.matrix)
    backends = [result.backend for result in run.results]
    _print_where(backends, run)
    stdout.print(f"{len(cases)} cases x {len(names)} backends in {elapsed:.1f} s on the cluster")
    if args.json:
        command = " ".join(["portable-moe", *sys.argv[1:]])
        report = annotate_report(report_dict(run.results, names, command), run, backends, args.cluster)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        stderr.print(f"JSON report written to {args.json}")
    if args.junit:
        from portable_moe.cluster.report import write_junit_with_nodes

        node_of = {id(result): stamp_name(stamp) for result, stamp in zip(run.results, run.stamps)}
        write_junit_with_nodes(run.results, lambda result: node_of[id(result)], args.junit, "portable-moe ops")
        stderr.print(f"JUnit XML written to {args.junit}")
    return EXIT_FAILED if any(r.status in (FAILED, ERROR) for r in run.results) else EXIT_OK


def command_bench_on_cluster(args: argparse.Namespace) -> int:
    """``portable-moe bench --cluster``: each backend timed on a node offering it, one after another."""
    from rich.markup import escape
    from rich.table import Table

    from portable_moe.bundle import load_bundle
    from portable_moe.cli.console import EXIT_FAILED, EXIT_OK, parse_options, show_step, stderr, stdout
    from portable_moe.cluster.jobs import bench_on_cluster
    from portable_moe.cluster.report import cluster_section
    from portable_moe.run.fallback import spread_options

    if (args.batch is None) != (args.seq is None):
        raise InputError("give both --batch and --seq, or neither (to use the golden inputs)")
    if args.estimate:
        raise InputError("--estimate is computed on this machine: run it without --cluster")
    bundle = load_bundle(args.bundle)
    shape = None if args.batch is None else (args.batch, args.seq)
    with connected(args.cluster):
        names = resolve_cluster_backends(args.backend, cluster_nodes())
        options = spread_options(names, parse_options(args.option)) if args.option else None
        run = bench_on_cluster(bundle, names, options, shape, args.warmup, args.runs, progress=show_step)
    table = Table(title=f"{bundle.name} on the cluster ({args.runs} runs after {args.warmup} warm-up each)")
    for column in ("backend", "node", "input", "p50 ms", "p90 ms", "min ms", "tokens/s", "peak RSS MiB"):
        table.add_column(column, justify="left" if column in ("backend", "node") else "right")
    for result, stamp in zip(run.results, run.stamps):
        if "error" in result:
            table.add_row(result["backend"], escape(stamp_name(stamp)), "[red]error[/red]", escape(result["error"]))
            continue
        table.add_row(
            result["backend"],
            escape(stamp_name(stamp)),
            escape(str(result["input_shape"])),
            f"{result['p50_ms']:.3f}",
            f"{result['p90_ms']:.3f}",
            f"{result['min_ms']:.3f}",
            f"{result['tokens_per_second']:,.0f}",
            f"{result['peak_rss_mib']:,.0f}",
        )
    stdout.print(table)
    _print_where(names, run)
    if args.json:
        entries = [
            {**result, "node": stamp_name(stamp) or None, "infrastructure_error": infrastructure}
            for result, stamp, infrastructure in zip(run.results, run.stamps, run.infrastructure)
        ]
        report = {"bundle": str(bundle.path), "results": entries, "cluster": cluster_section(run, names, args.cluster)}
        Path(args.json).write_text(json.dumps(report, indent=2))
        stderr.print(f"report written to {args.json}")
    failed = [result["backend"] for result in run.results if "error" in result]
    if failed:
        stderr.print(f"[red]not timed:[/red] {', '.join(failed)}")
        return EXIT_FAILED
    return EXIT_OK
