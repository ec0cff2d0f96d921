"""Cluster runs on a real multi-node Ray cluster started on this machine (ray.cluster_utils.Cluster).

The nodes are Ray nodes with one CPU each and different backend resources; one test kills nodes
in the middle of a run. Tests that need Ray skip with the reason when it is not installed; the
lookups that need no cluster run everywhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from portable_moe.cluster.nodes import (
    Advertisement,
    ClusterNode,
    advertisement,
    backend_resource,
    label_value,
    nodes_from_ray,
    ray_start_command,
    resolve_cluster_backends,
    runtime_versions,
)
from portable_moe.cluster.report import describe_skew, version_skew
from portable_moe.errors import BackendError, BackendUnavailableError, InputError
from portable_moe.registry import BackendStatus

# A vendor backend for the fault tests: ONNX Runtime CPU that, when compiling, leaves a marker
# named after its node and pauses, so a test knows where it runs and can kill that node mid-task.
SLOW_VENDOR = """
import os, pathlib, time

import ray

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend


class PausingCpuBackend(OnnxRuntimeCpuBackend):
    description = "ONNX Runtime CPU that pauses while compiling (cluster fault tests)"

    def _compile(self, model, options):
        markers = pathlib.Path(os.environ["PORTABLE_MOE_TEST_MARKERS"])
        (markers / ray.get_runtime_context().get_node_id()).write_text("compiling")
        time.sleep(float(os.environ.get("PORTABLE_MOE_TEST_PAUSE", "3")))
        return super()._compile(model, options)
"""


def _node(name: str, backends: tuple[str, ...], alive: bool = True, **versions: str) -> ClusterNode:
    return ClusterNode(f"{name}-id-0123456789", "10.0.0.1", name, alive, backends, 1.0, dict(versions))


# ---------------------------------------------------------------------------------------------
# Without a cluster


def test_advertisement_offers_available_backends_and_versions():
    statuses = [
        BackendStatus("cpu", "x", "", False, True, "", ""),
        BackendStatus("cuda", "x", "", False, False, "no GPU", ""),
    ]
    offer = advertisement(statuses)
    assert offer.resources == {backend_resource("cpu"): 1000}
    assert offer.backends == ["cpu"] and offer.unavailable == [("cuda", "no GPU")]
    assert offer.labels["portable-moe/onnx"] == label_value(runtime_versions()["onnx"])
    assert label_value("2.13.0+cpu") == "2.13.0_cpu"


def test_ray_start_command_joins_or_starts_with_the_offer():
    offer = Advertisement({backend_resource("cpu"): 1000}, {"portable-moe/onnx": "1.23.2"})
    joining = ray_start_command(offer, "10.0.0.1:6379", num_cpus=2)
    assert joining[:5] == [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
    assert "--address=10.0.0.1:6379" in joining and "--num-cpus=2" in joining
    assert '--resources={"portable-moe/cpu": 1000}' in joining
    assert "--labels=portable-moe/onnx=1.23.2" in joining
    heading = ray_start_command(offer, None, port=6400)
    assert "--head" in heading and "--port=6400" in heading and not any(a.startswith("--address") for a in heading)


def test_nodes_from_ray_reads_resources_and_labels():
    raw = {
        "NodeID": "abcdef0123456789",
        "NodeManagerAddress": "10.0.0.2",
        "NodeManagerHostname": "npu-box",
        "Alive": True,
        "Resources": {"CPU": 4.0, backend_resource("npu-sim"): 1000, "memory": 1.0},
        "Labels": {"portable-moe/onnxruntime": "1.32.0", "ray.io/node-id": "abc"},
    }
    (node,) = nodes_from_ray([raw])
    assert node.backends == ("npu-sim",) and node.cpus == 4.0
    assert node.versions == {"onnxruntime": "1.32.0"}
    assert node.describe() == "npu-box (10.0.0.2, node abcdef01)"


def test_backend_no_node_offers_names_every_node_and_its_offer():
    nodes = [_node("gpu-box", ("cpu", "cuda")), _node("cpu-box", ("cpu",)), _node("gone", ("npu-sim",), alive=False)]
    assert resolve_cluster_backends("all", nodes) == ["cpu", "cuda"]
    assert resolve_cluster_backends("cuda,cpu,cuda", nodes) == ["cuda", "cpu"]
    with pytest.raises(
        BackendUnavailableError, match=r"'npu-sim' is offered by no node.*gpu-box .*: cpu, cuda; cpu-box"
    ):
        resolve_cluster_backends("cpu,npu-sim", nodes)
    with pytest.raises(BackendUnavailableError, match="no node of the cluster offers a backend"):
        resolve_cluster_backends("all", [_node("bare", ())])
    with pytest.raises(BackendError, match="bad backend list"):
        resolve_cluster_backends("cpu,,reference", nodes)


def test_version_skew_lists_only_what_differs():
    def stamp(host: str, onnxruntime: str) -> dict:
        return {
            "hostname": host,
            "address": "10.0.0.1",
            "node_id": host * 4,
            "versions": {"onnxruntime": onnxruntime, "onnx": "1.23.2"},
        }

    ran = [
        ("cpu", stamp("a", "1.32.0")),
        ("cpu", stamp("b", "1.31.0")),
        ("reference", stamp("a", "1.32.0")),
        ("cpu", None),
    ]
    skew = version_skew(ran)
    assert list(skew) == ["cpu"] and list(skew["cpu"]) == ["onnxruntime"]
    assert skew["cpu"]["onnxruntime"] == {"1.32.0": ["a (10.0.0.1, node aaaa)"], "1.31.0": ["b (10.0.0.1, node bbbb)"]}
    assert describe_skew(skew) == [
        "cpu: onnxruntime 1.32.0 on a (10.0.0.1, node aaaa); 1.31.0 on b (10.0.0.1, node bbbb)"
    ]


def test_cluster_flag_without_ray_says_how_to_install(monkeypatch):
    from portable_moe.cluster.gather import connected

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(InputError, match=r"--cluster needs Ray on this machine: pip install 'portable-moe\[cluster\]'"):
        with connected("auto"):
            pass


def test_worker_refuses_bad_usage(capsys):
    from portable_moe.cli import main

    assert main(["worker", "--join", "10.0.0.1:6379", "--port", "6400"]) == 2
    assert "--port goes with --head" in capsys.readouterr().err
    assert main(["worker", "--head", "--num-cpus", "0"]) == 2
    assert "--num-cpus must be at least 1" in capsys.readouterr().err


def test_worker_dry_run_prints_the_offer_and_command(capsys):
    from portable_moe.cli import main

    assert main(["worker", "--join", "10.0.0.1:6379", "--num-cpus", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "offering" in out and "cpu" in out and "--address=10.0.0.1:6379" in out and "portable-moe/cpu" in out


def test_ray_is_imported_only_when_a_cluster_is_used():
    import subprocess

    code = "import sys, portable_moe.cli, portable_moe.cluster; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_junit_and_html_carry_the_node_of_each_result(tmp_path):
    from portable_moe.cluster.report import write_junit_with_nodes
    from portable_moe.opsuite import CaseResult
    from portable_moe.report_html import render_html

    # Case-major, as a run orders them; JUnit groups them by backend.
    results = [CaseResult(f"test_{n}", "Add", backend, "passed") for n in range(3) for backend in ("cpu", "reference")]
    path = tmp_path / "ops.xml"
    write_junit_with_nodes(results, lambda r: f"{r.backend}-node-{r.case[-1]}", path, "portable-moe ops")
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        backend = case.get("classname").split(".")[0]
        assert case.find("properties/property").get("value") == f"{backend}-node-{case.get('name')[-1]}"
    skew = {"cpu": {"onnxruntime": {"1.32.0": ["a"], "1.31.0": ["b"]}}}
    page = render_html(
        {"results": [{"backend": "cpu", "status": "passed", "node": "a"}], "cluster": {"version_skew": skew}}
    )
    assert "<th>node</th>" in page and "Version skew between nodes" in page and "1.31.0 on b" in page


# ---------------------------------------------------------------------------------------------
# On a real cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, write_vendor_package):
    """A head without CPUs and two one-CPU nodes offering cpu and reference (and ghost); the fault tests add more."""
    pytest.importorskip("ray", reason="cluster runs need Ray (pip install 'portable-moe[cluster]')")
    import ray
    from ray.cluster_utils import Cluster

    vendor = tmp_path_factory.mktemp("vendor")
    markers = tmp_path_factory.mktemp("markers")

    saved = {
        key: os.environ.get(key) for key in ("PYTHONPATH", "PORTABLE_MOE_TEST_MARKERS", "PORTABLE_MOE_CLUSTER_CACHE")
    }
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(vendor), saved["PYTHONPATH"]]))
    os.environ["PORTABLE_MOE_TEST_MARKERS"] = str(markers)
    os.environ["PORTABLE_MOE_CLUSTER_CACHE"] = str(tmp_path_factory.mktemp("cluster-cache"))
    write_vendor_package(vendor, "pausing_vendor", SLOW_VENDOR, {"pausing-cpu": "pausing_vendor:PausingCpuBackend"})
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            # Notice a dead node within about a second (Ray's default waits much longer).
            "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3},
        },
    )
    offer = advertisement()
    nodes = [
        # "ghost" is advertised but registered nowhere: what a node with a broken install looks like.
        cluster.add_node(
            num_cpus=1,
            resources={backend_resource(n): 1000 for n in ("cpu", "ghost", "reference")},
            labels=offer.labels,
        )
        for _ in range(2)
    ]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes, markers
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def cluster_address(ray_cluster) -> str:
    return ray_cluster[0].address


def test_nodes_advertise_their_backends_and_versions(ray_cluster):
    from portable_moe.cluster.nodes import cluster_nodes

    offering = [node for node in cluster_nodes() if node.alive and node.backends]
    assert len(offering) == 2
    for node in offering:
        assert node.backends == ("cpu", "ghost", "reference")
        assert node.versions["onnx"] == label_value(runtime_versions()["onnx"])


def test_bundle_travels_in_chunks_and_is_verified_on_arrival(ray_cluster, tiny_bundle, tmp_path, monkeypatch):
    import ray

    from portable_moe.cluster.transfer import ShippedBundle, receive_bundle, ship_bundle
    from portable_moe.errors import BundleError

    monkeypatch.setenv("PORTABLE_MOE_CLUSTER_CACHE", str(tmp_path))
    shipped = ship_bundle(tiny_bundle, chunk_bytes=64 * 1024)
    assert max(len(chunks) for chunks in shipped.files.values()) > 1
    received = receive_bundle(shipped, "node-a")
    assert received.path != tiny_bundle.path and received.manifest == tiny_bundle.manifest
    model = tiny_bundle.manifest["model_file"]
    damaged = dict(shipped.files)
    damaged[model] = (ray.put(b"not the model"), *damaged[model][1:])
    tampered = ShippedBundle(shipped.name, shipped.manifest, "0" * 64, damaged, shipped.total_bytes)
    with pytest.raises(BundleError, match="sha256 does not match the manifest"):
        receive_bundle(tampered, "node-b")
    with pytest.raises(InputError, match="chunk size must be a positive number"):
        ship_bundle(tiny_bundle, chunk_bytes=0)


def test_check_on_the_cluster_gives_the_local_verdicts(ray_cluster, tiny_bundle):
    from portable_moe.cluster.jobs import check_on_cluster
    from portable_moe.conformance import check_bundle

    local = check_bundle(tiny_bundle, ["cpu", "reference"])
    run = check_on_cluster(tiny_bundle, ["cpu", "reference"], chunk_bytes=256 * 1024)
    assert [r.status for r in run.results] == [r.status for r in local] == ["passed", "passed"]
    for here, there in zip(local, run.results):
        assert there.worst("max_abs_error") == here.worst("max_abs_error")
        assert there.routing_agreement() == here.routing_agreement()
    assert all(stamp is not None for stamp in run.stamps) and not any(run.infrastructure)


def test_a_task_that_raises_on_its_node_is_an_error_not_an_infrastructure_error(ray_cluster, tiny_bundle):
    from portable_moe.cluster.jobs import check_on_cluster

    run = check_on_cluster(tiny_bundle, ["ghost"])
    assert run.results[0].status == "error" and not run.infrastructure[0]
    assert run.results[0].reason.startswith("BackendError: unknown backend 'ghost'")


def test_check_cli_on_the_cluster_reports_the_node_of_each_result(cluster_address, tiny_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    paths = {kind: tmp_path / f"report.{kind}" for kind in ("json", "xml", "html")}
    code = main(
        ["check", str(tiny_bundle.path), "--backend", "cpu,reference", "--cluster", cluster_address]
        + ["--json", str(paths["json"]), "--junit", str(paths["xml"]), "--html", str(paths["html"])]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(paths["json"].read_text())
    assert [(r["backend"], r["status"]) for r in report["results"]] == [("cpu", "passed"), ("reference", "passed")]
    node_names = {node["name"] for node in report["cluster"]["nodes"]}
    assert all(r["node"] in node_names and r["infrastructure_error"] is False for r in report["results"])
    assert report["cluster"]["version_skew"] == {}
    properties = ElementTree.parse(paths["xml"]).getroot().findall(".//testcase/properties/property")
    assert properties and all(p.get("name") == "node" and p.get("value") in node_names for p in properties)
    assert "<th>node</th>" in paths["html"].read_text()


def test_a_backend_no_node_offers_is_a_one_line_error(cluster_address, tiny_bundle, capsys):
    from portable_moe.cli import main

    assert main(["check", str(tiny_bundle.path), "--backend", "cpu,npu-sim", "--cluster", cluster_address]) == 2
    err = capsys.readouterr().err.strip()
    assert "'npu-sim' is offered by no node of the cluster" in err and "cpu, ghost, reference" in err
    assert len(err.splitlines()) == 1


def test_an_address_nothing_listens_on_is_a_one_line_error(tiny_bundle, capsys, monkeypatch):
    pytest.importorskip("ray", reason="cluster runs need Ray (pip install 'portable-moe[cluster]')")
    import ray

    from portable_moe.cli import main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, not yet connected
    assert main(["check", str(tiny_bundle.path), "--cluster", "127.0.0.1:1"]) == 2
    assert "cannot connect to the Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert main(["check", str(tiny_bundle.path), "--cluster", "head-without-port"]) == 2
    assert "give the head node's HOST:PORT" in capsys.readouterr().err


def test_op_suite_on_the_cluster_gives_the_local_verdicts_on_both_nodes(cluster_address, tmp_path, capsys):
    from portable_moe.cli import main
    from portable_moe.opsuite import collect_cases, op_tasks, run_tasks, select_cases

    include = r"^test_(relu|sigmoid|add|softmax_axis|gather_|topk|cast_FLOAT_to|sequence_insert)"
    cases = select_cases(collect_cases(), [include])
    local = run_tasks(op_tasks(cases, ["cpu", "reference"]), cases, jobs=0)
    report_path, junit_path = tmp_path / "ops.json", tmp_path / "ops.xml"
    args = ["conformance", "ops", "--backend", "cpu,reference", "--include", include, "--jobs", "0"]
    main([*args, "--cluster", cluster_address, "--json", str(report_path), "--junit", str(junit_path)])
    report = json.loads(report_path.read_text())
    there = {(r["case"], r["backend"]): r["status"] for r in report["results"]}
    assert there == {(r.case, r.backend): r.status for r in local}
    assert {"passed", "unsupported"} <= set(there.values())  # the selection covers more than one verdict
    assert len({r["node"] for r in report["results"]}) == 2  # shards spread over both nodes
    nodes = {p.get("value") for p in ElementTree.parse(junit_path).getroot().findall(".//testcase/properties/property")}
    assert nodes == {r["node"] for r in report["results"]}


def test_op_shards_run_crash_isolated_in_a_worker_process_on_the_node(ray_cluster):
    from portable_moe.cluster.jobs import ops_on_cluster
    from portable_moe.opsuite import collect_cases, op_tasks, run_tasks, select_cases

    cases = select_cases(collect_cases(), [r"^test_(relu|topk|sequence_insert)"])
    local = run_tasks(op_tasks(cases, ["cpu"]), cases, jobs=0)
    run = ops_on_cluster(cases, ["cpu"], jobs=1, shards_per_cpu=1)
    assert [(r.case, r.status) for r in run.results] == [(r.case, r.status) for r in local]
    with pytest.raises(InputError, match="jobs per shard must be 0"):
        ops_on_cluster(cases, ["cpu"], jobs=2)


def test_bench_on_the_cluster_times_each_backend_on_a_node(cluster_address, tiny_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    report_path = tmp_path / "bench.json"
    args = ["bench", str(tiny_bundle.path), "--backend", "cpu,reference", "--cluster", cluster_address]
    assert main([*args, "--warmup", "1", "--runs", "2", "--json", str(report_path)]) == 0
    results = json.loads(report_path.read_text())["results"]
    assert [r["backend"] for r in results] == ["cpu", "reference"]
    assert all(r["runs"] == 2 and r["p50_ms"] > 0 and r["node"] for r in results)
    assert main([*args, "--estimate"]) == 2
    assert "--estimate is computed on this machine" in capsys.readouterr().err


def test_ctrl_c_cancels_the_clusters_tasks(ray_cluster):
    import ray

    from portable_moe.cluster.gather import Submitted, gather
    from portable_moe.cluster.nodes import cluster_nodes

    sleeper = ray.remote(lambda seconds: time.sleep(seconds)).options(
        num_cpus=1, resources={backend_resource("cpu"): 1}
    )
    quick, slow = sleeper.remote(0), sleeper.remote(300)

    def interrupt(job, outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gather([Submitted(quick, "cpu", 0), Submitted(slow, "cpu", 1)], interrupt, cluster_nodes())
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(slow, timeout=60)


def _wait_for_marker(markers: Path, node_ids: set[str], seconds: float = 90) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [path.name for path in markers.iterdir() if path.name in node_ids]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no task started on nodes {sorted(node_ids)} within {seconds} s")


def test_a_dead_node_costs_a_retry_elsewhere_or_an_infrastructure_error(ray_cluster, tiny_bundle):
    """Kill the node running a check: it reruns on the other node offering the backend; kill that
    one too and the check ends as an infrastructure error naming it, not as a conformance failure."""
    from concurrent.futures import ThreadPoolExecutor

    from portable_moe.cluster.jobs import check_on_cluster

    cluster, _, markers = ray_cluster
    pausing = {backend_resource("pausing-cpu"): 1000}
    added = [cluster.add_node(num_cpus=1, resources=pausing) for _ in range(2)]
    by_id = {node.node_id: node for node in added}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(check_on_cluster, tiny_bundle, ["pausing-cpu"])
        first = _wait_for_marker(markers, set(by_id))
        cluster.remove_node(by_id.pop(first), allow_graceful=False)
        run = running.result(timeout=120)
    (survivor,) = by_id
    assert run.results[0].status == "passed" and not run.infrastructure[0]
    assert run.stamps[0]["node_id"] == survivor

    for marker in markers.iterdir():
        marker.unlink()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(check_on_cluster, tiny_bundle, ["pausing-cpu"])
        _wait_for_marker(markers, {survivor})
        cluster.remove_node(by_id.pop(survivor), allow_graceful=False)
        run = running.result(timeout=120)
    result = run.results[0]
    assert result.status == "error" and run.infrastructure[0] and run.stamps[0] is None
    assert result.reason.startswith("infrastructure error: node ")
    assert f"node {survivor[:8]}" in result.reason and "no other node offers backend 'pausing-cpu'" in result.reason


def test_worker_joins_with_its_backends_and_leaves_when_stopped(ray_cluster, tiny_bundle):
    """``portable-moe worker --join`` (a real ``ray start``): its node advertises this machine's
    backends and versions, takes the tasks of a backend only it offers, and leaves on SIGTERM."""
    import signal
    import subprocess

    from portable_moe.cluster.jobs import check_on_cluster
    from portable_moe.cluster.nodes import cluster_nodes

    cluster, _, _ = ray_cluster
    before = {node.node_id for node in cluster_nodes()}
    command = [sys.executable, "-m", "portable_moe.cli", "worker", "--join", cluster.address, "--num-cpus", "1"]
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        joined = []
        while not joined and time.monotonic() < deadline:
            joined = [node for node in cluster_nodes() if node.alive and node.node_id not in before]
            time.sleep(0.5)
        assert joined, "the worker did not join within 120 s"
        (node,) = joined
        assert set(advertisement().backends) <= set(node.backends) and "npu-sim" in node.backends
        assert node.versions["onnxruntime"] == label_value(runtime_versions()["onnxruntime"])
        run = check_on_cluster(tiny_bundle, ["npu-sim"])  # only the new node offers it
        assert run.stamps[0]["node_id"] == node.node_id and run.results[0].status != "error"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(90) != 0  # interrupted, after ray took the node down
    deadline = time.monotonic() + 30
    while any(n.alive for n in cluster_nodes() if n.node_id == node.node_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(n.alive for n in cluster_nodes() if n.node_id == node.node_id)
