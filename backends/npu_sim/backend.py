"""``npu-sim``: a simulated vendor NPU, modelled on the public constraints of Huawei Ascend.

It is a simulation and says so: every node is finally computed by ONNX Runtime on this machine's
CPU. What it simulates faithfully is the porting work a real NPU asks for:

- an operator table with opset and dtype limits (``optable.json``); what the device cannot run
  falls back to the host CPU, partition by partition, with every host<->device transfer counted;
- static shapes: the model is compiled per gear (shape profile), inputs are padded to a gear;
- reduced precision: Ascend's precision modes really run the device nodes in float16;
- an offline compile with an on-disk cache, checked by sha256 and rebuilt when corrupt;
- a device memory budget, and injected faults for testing fallback lists.

Compiling builds every gear's artifact (like ATC, which builds every profile into one offline
model); each gear is loaded into an ONNX Runtime session lazily, on its first run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from backends.npu_sim import gears as gear_module
from backends.npu_sim.cache import ArtifactCache, CacheEntry, default_cache_dir
from backends.npu_sim.gears import Gear
from backends.npu_sim.optable import OpTable, load_optable
from backends.npu_sim.partition import (
    DEVICE,
    FOLDED,
    HOST,
    ai_onnx_opset,
    device_memory,
    plan_graph,
)
from backends.npu_sim.precision import (
    ACTIVATION_CHOICES,
    OP_TOLERANCE_OVERRIDES,
    PRECISION_MODES,
    TOLERANCES,
    apply_precision,
    float16_nodes,
    float16_tensors,
    quantize_activations,
    reported_precision,
)
from backends.npu_sim.static_cache import DEFAULT_CACHE_POSITIONS, StaticCacheDecoder, decoder_gears
from portable_moe.backend import Backend, Capabilities, CompiledModel, ModelInput, Option, ProbeResult
from portable_moe.errors import BackendError
from portable_moe.perf.costmodel import NodeWork, chip_keys, estimate_from_work, get_chip, node_work
from portable_moe.run.preallocated_cache import find_cache_pairs, static_cache_graph, verify_rewrite
from portable_moe.tensors import specs_from_onnx

GIB = 1 << 30
# Bump when the artifact or its analysis changes meaning, so old cache entries are not reused.
ARTIFACT_VERSION = 1
# Outputs through which the capacity lowering reports how many (token, slot) pairs it dropped.
_DROPPED_SLOTS_PREFIX = "dropped_slots"
# Options that change what an artifact contains (the others only change how it is used).
_ARTIFACT_OPTIONS = ("precision", "activations", "router_fp32", "fold_constants")


@dataclass
class GearReport:
    """One compiled gear."""

    gear: str
    cache: str  # "hit", "miss", or "rebuilt (corrupt: ...)"
    compile_seconds: float
    device_nodes: int
    host_nodes: int
    folded_nodes: int
    float16_nodes: int
    partitions: int
    transfers: int
    transfer_bytes: int
    weight_bytes: int
    activation_bytes: int
    estimate_seconds: float
    artifact: str


@dataclass
class NpuSimReport:
    """What compiling for npu-sim did. Partitions, fallbacks and transfers are of the largest gear.

    Attributes:
        simulated: always True; see ``note``.
        precision: the precision mode.
        gears: one row per compiled gear.
        partitions: the device partitions: index, node count, op types.
        fallbacks: op type -> {"count", "reasons", "nodes"} for nodes that run on the host CPU.
        folded: op type -> count of nodes evaluated at compile time (constants at static shapes).
        transfers: the host<->device copies of one run: tensor, direction, dtype, shape, bytes.
        memory: weights, activations, the budget, and the gear they were estimated at.
        cache: directory, hits, misses, rebuilt entries, seconds spent compiling.
        cost_estimate: the roofline estimate per gear on ``chip`` (an estimate, not a measurement).
        runs: runs per gear so far, and bytes transferred by them.
    """

    backend: str
    simulated: bool
    note: str
    precision: str
    gears: list[GearReport]
    partitions: list[dict[str, Any]]
    fallbacks: dict[str, dict[str, Any]]
    folded: dict[str, int]
    transfers: list[dict[str, Any]]
    memory: dict[str, Any]
    cache: dict[str, Any]
    cost_estimate: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    runs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The report as text for a terminal."""
        width = max([18, *(len(row.gear) for row in self.gears)])
        lines = [
            f"npu-sim compile report ({self.note})",
            f"precision mode: {self.precision}",
            f"cache: {self.cache['directory']}  hits {self.cache['hits']}, misses {self.cache['misses']}, "
            f"rebuilt {self.cache['rebuilt']}; compile {self.cache['seconds']:.3f} s",
            "",
            f"gears ({len(self.gears)}; estimate = {self.cost_estimate['label']} on {self.cost_estimate['chip_name']}):",
            f"  {'gear':<{width}} {'cache':<8} {'device':>6} {'host':>5} {'fp16':>5} {'parts':>5} {'xfers':>5} "
            f"{'xfer KiB':>9} {'act MiB':>8} {'estimate':>10}",
        ]
        for row in self.gears:
            lines.append(
                f"  {row.gear:<{width}} {row.cache.split(' ')[0]:<8} {row.device_nodes:>6} {row.host_nodes:>5} "
                f"{row.float16_nodes:>5} {row.partitions:>5} {row.transfers:>5} {row.transfer_bytes / 1024:>9.1f} "
                f"{row.activation_bytes / 2**20:>8.2f} {row.estimate_seconds * 1e6:>8.2f} us"
            )
        rebuilt = [row for row in self.gears if row.cache.startswith("rebuilt")]
        lines += [f"  rebuilt {row.gear}: {row.cache}" for row in rebuilt]
        memory = self.memory
        lines += [
            "",
            f"device memory (estimate at {memory['gear']}): weights {memory['weight_bytes'] / 2**20:.2f} MiB + "
            f"activations {memory['activation_bytes'] / 2**20:.2f} MiB of a {memory['budget_bytes'] / GIB:g} GiB budget",
            "",
            f"partitions at {memory['gear']} ({len(self.partitions)}):",
        ]
        for partition in self.partitions:
            ops = ", ".join(f"{op} {count}" for op, count in partition["op_types"].items())
            lines.append(f"  #{partition['index']}: {partition['nodes']} nodes ({ops})")
        lines.append(f"host CPU fallbacks ({sum(entry['count'] for entry in self.fallbacks.values())}):")
        for op_type, entry in self.fallbacks.items():
            lines.append(f"  {op_type} x{entry['count']}: {'; '.join(entry['reasons'])}")
        if not self.fallbacks:
            lines.append("  none")
        folded = ", ".join(f"{op} {count}" for op, count in self.folded.items()) or "none"
        lines.append(f"folded at compile time ({sum(self.folded.values())}): {folded}")
        total = sum(transfer["bytes"] or 0 for transfer in self.transfers)
        unknown = sum(transfer["bytes"] is None for transfer in self.transfers)
        lines.append(
            f"host<->device transfers per run at {memory['gear']}: {len(self.transfers)}, {total} bytes"
            + (f" ({unknown} of unknown size)" if unknown else "")
        )
        for transfer in self.transfers:
            size = "?" if transfer["bytes"] is None else transfer["bytes"]
            lines.append(
                f"  {transfer['direction']:<13} {transfer['tensor']} {transfer['dtype']} {transfer['shape']} {size} B"
            )
        lines += [f"note: {note}" for note in self.notes]
        if self.runs.get("total"):
            per_gear = ", ".join(f"{gear}: {count}" for gear, count in self.runs["per_gear"].items())
            lines.append(f"runs: {self.runs['total']} ({per_gear}), {self.runs['transferred_bytes']} bytes transferred")
            if self.runs.get("cache_gears"):
                chosen = ", ".join(f"{gear}: {count}" for gear, count in self.runs["cache_gears"].items())
                lines.append(f"  cache gears chosen per request: {chosen}")
            if self.runs["padded_runs_with_dropped_slots"]:
                lines.append(
                    f"  {self.runs['padded_runs_with_dropped_slots']} padded run(s) dropped expert slots: padding "
                    "tokens may have displaced real ones (see the capacity note)"
                )
        return "\n".join(lines)


def _summarise(analysis: Mapping[str, Any], budget: int) -> dict[str, Any]:
    fallbacks: dict[str, dict[str, Any]] = {}
    for node in analysis["host"]:
        entry = fallbacks.setdefault(node["op_type"], {"count": 0, "reasons": [], "nodes": []})
        entry["count"] += 1
        entry["nodes"].append(node["name"])
        if node["reason"] not in entry["reasons"]:
            entry["reasons"].append(node["reason"])
    return {
        "partitions": analysis["partitions"],
        "fallbacks": fallbacks,
        "folded": dict(Counter(node["op_type"] for node in analysis["folded"]).most_common()),
        "transfers": analysis["transfers"],
        "memory": {
            "gear": analysis["gear"],
            "weight_bytes": analysis["weight_bytes"],
            "activation_bytes": analysis["activation_bytes"],
            "budget_bytes": budget,
        },
    }


class NpuSimCompiledModel(CompiledModel):
    """A model compiled for npu-sim: one artifact per gear, loaded lazily, run on ONNX Runtime (CPU)."""

    def __init__(
        self,
        backend: Backend,
        model: ModelInput,
        gears: list[Gear],
        entries: dict[Gear, CacheEntry],
        report: NpuSimReport,
        options: Mapping[str, Any],
    ) -> None:
        super().__init__(backend, model)
        self.precision = reported_precision(str(options["precision"]), str(options["activations"]))
        self.gears = gears
        self._entries = entries
        self._report = report
        self._threads = options["threads"]
        self._fail_on_run = options["fail_on_run"]
        self._sessions: dict[Gear, Any] = {}
        self._runs: Counter[str] = Counter()
        self._transferred = 0
        self._padded_drops = 0
        self._lock = threading.Lock()

    def report(self) -> NpuSimReport:
        """The compile report, with the runs so far."""
        with self._lock:
            self._report.runs = {
                "total": sum(self._runs.values()),
                "per_gear": dict(self._runs),
                "transferred_bytes": self._transferred,
                "padded_runs_with_dropped_slots": self._padded_drops,
            }
        return self._report

    def placement(self) -> dict[str, int]:
        """Nodes of the largest gear on the device, on the host, and folded at compile time."""
        largest = self._entries[self.gears[-1]].meta["analysis"]
        counts = {DEVICE: largest["device_nodes"], HOST: len(largest["host"])}
        if largest["folded"]:
            counts[FOLDED] = len(largest["folded"])
        return counts

    def _session(self, gear: Gear) -> Any:
        import onnxruntime

        from backends.onnxruntime_cpu import session_options

        with self._lock:
            if gear not in self._sessions:
                self._sessions[gear] = onnxruntime.InferenceSession(
                    str(self._entries[gear].artifact),
                    sess_options=session_options(self._threads, "all"),
                    providers=["CPUExecutionProvider"],
                )
            return self._sessions[gear]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes = gear_module.feed_sizes(self.inputs, feeds)
        gear = gear_module.select_gear(self.gears, sizes)
        padded = gear_module.pad_feeds(self.inputs, feeds, gear)
        return gear_module.unpad_outputs(self.outputs, self.run_gear(gear, padded, gear.as_dict != sizes), sizes)

    def run_gear(self, gear: Gear, feeds: Mapping[str, np.ndarray], padded: bool) -> dict[str, np.ndarray]:
        """Run one gear on feeds already at its sizes; every output at the gear's sizes.

        Args:
            gear: one of ``self.gears``.
            feeds: every input, shaped to the gear.
            padded: whether the feeds were padded (the capacity lowering's dropped slots are counted then).

        Raises:
            BackendError: for an injected fault (``fail_on_run``).
        """
        with self._lock:
            self._runs[gear.describe()] += 1
            run_number = sum(self._runs.values())
            self._transferred += sum(t["bytes"] or 0 for t in self._entries[gear].meta["analysis"]["transfers"])
        if self._fail_on_run and run_number == self._fail_on_run:
            raise BackendError(
                f"simulated device error on run {run_number} (fault injected by fail_on_run={self._fail_on_run})"
            )
        session = self._session(gear)
        names = [output.name for output in session.get_outputs()]
        results = dict(zip(names, session.run(names, dict(feeds))))
        if padded and any(np.any(value) for name, value in results.items() if name.startswith(_DROPPED_SLOTS_PREFIX)):
            # A capacity-lowered MoE dropped (token, slot) pairs on a padded input: padding tokens may
            # have taken slots that real tokens needed, so this run may differ from an unpadded one.
            with self._lock:
                self._padded_drops += 1
        return results


def _directory_path(value: Any) -> str | os.PathLike[str]:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"not a path: {value!r}")
    return value


def _known_chip(key: str) -> str:
    if key not in chip_keys():
        raise BackendError(f"npu-sim option chip must be one of {', '.join(chip_keys())}, got {key!r}")
    return key


class NpuSimBackend(Backend):
    """The simulated NPU. See the module docstring and docs/writing-a-backend.md."""

    name = "npu-sim"
    vendor = "simulated (modelled on Huawei Ascend public constraints)"
    description = "simulated NPU (runs on ONNX Runtime CPU): Ascend-like op table, gears, fp16 modes, compile cache"
    simulated = True
    declared_options = {
        "precision": Option("force_fp16", str, "Ascend precision mode", choices=PRECISION_MODES),
        "batch_sizes": Option(
            gear_module.DEFAULT_BATCH_SIZES,
            None,
            "batch sizes to compile gears for, e.g. '1,2,4,8'",
            parse=lambda value: gear_module.int_list(value, "batch_sizes"),
        ),
        "seq_lengths": Option(
            gear_module.DEFAULT_SEQ_LENGTHS,
            None,
            "sequence lengths to compile gears for, e.g. '16,64,256'",
            parse=lambda value: gear_module.int_list(value, "seq_lengths"),
        ),
        "cache_positions": Option(
            DEFAULT_CACHE_POSITIONS,
            None,
            "a decoder graph's cache sizes (positions) to compile gears for, e.g. '128,512,2048'",
            parse=lambda value: gear_module.int_list(value, "cache_positions"),
        ),
        "gears": Option(None, None, "explicit gears, e.g. ['2x128', '4x64'] (replace batch_sizes x seq_lengths)"),
        "strict": Option(False, bool, "refuse a model that needs host (CPU) fallback"),
        "cache_dir": Option(
            None,
            None,
            "a directory for the offline-compile cache (default: ~/.cache/portable-moe/npu-sim)",
            parse=_directory_path,
        ),
        "memory_gib": Option(64.0, float, "simulated device memory budget in GiB", minimum=0),
        "activations": Option(
            "float",
            str,
            "int8: Ascend W8A8 (int8 activations per token into int8-weight matrix products; int8/channel bundles)",
            choices=ACTIVATION_CHOICES,
        ),
        "router_fp32": Option(True, bool, "keep the MoE router in float32 under float16 modes"),
        "fold_constants": Option(True, bool, "fold constant subgraphs at compile time"),
        "chip": Option("ascend-910b", str, "chip whose roofline prices the compile report", parse=_known_chip),
        "threads": Option(0, int, "host threads (0: ONNX Runtime decides)", minimum=0),
        "fail_on_run": Option(0, int, "fault injection: fail the Nth run (0: never)", minimum=0),
        "fail_on_compile": Option(False, bool, "fault injection: fail while compiling"),
    }

    def probe(self) -> ProbeResult:
        try:
            import onnxruntime
        except ImportError as error:
            return ProbeResult(False, f"npu-sim computes on onnxruntime, which is not installed ({error})")
        return ProbeResult(
            True,
            f"simulated device (computed by onnxruntime {onnxruntime.__version__} on the CPU)",
            {"simulated": True, "onnxruntime": onnxruntime.__version__},
        )

    @property
    def capabilities(self) -> Capabilities:
        table = load_optable()
        return Capabilities(
            min_opset=table.domain_opsets[0],
            max_opset=table.domain_opsets[1],
            dtypes=frozenset({"float32", "float16", "int64", "int32", "bool"}),
            moe_lowerings=("capacity", "dense"),
            # Other domains are accepted only to run them on the host CPU (ONNX Runtime's contrib ops).
            domains=frozenset({"com.microsoft"}),
            # Ascend-style weight-only int8 (W8A16 under the float16 precision modes): int8 codes with one
            # scale per output channel. No int4 and no FP8 matrix kernels.
            weight_formats=frozenset({"float16", "bfloat16", "int8/channel"}),
            weight_format_refusals={
                "int4/block": "the simulated Ascend matrix unit takes int8 weights (W8A16), not int4, and its op "
                "table stops at opset 20, before ONNX's int4 type",
                "int8/block": "Ascend-style W8A16 takes one int8 scale per output channel, not per block (and "
                "block-wise DequantizeLinear needs opset 21, past this op table); re-export with --block-size 0",
            },
            precision_modes=TOLERANCES,
            op_tolerance_overrides=OP_TOLERANCE_OVERRIDES,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        if options["fail_on_compile"]:
            raise BackendError("simulated device error while compiling (fault injected by fail_on_compile=True)")
        _check_activations(model, options)
        budget = int(options["memory_gib"] * GIB)
        chip = get_chip(str(options["chip"]))
        cache_pairs = find_cache_pairs(model.proto)
        # A decoder graph's cache stays in device memory between steps: no transfer per run.
        resident = frozenset(name for pair in cache_pairs for name in (pair.past, pair.present))
        if cache_pairs:  # a decoder graph: its growing cache becomes a preallocated one, in gears
            proto = static_cache_graph(model.proto, cache_pairs)
            _verify_static_cache(model.proto, proto, cache_pairs)
            inputs, outputs = specs_from_onnx(proto, "the static-cache decoder graph")
            device_model = ModelInput(proto, model.path, inputs, outputs, model.moe_lowering, model.bundle)
            gears = decoder_gears(inputs, options)
        else:
            device_model = model
            gears = gear_module.build_gears(model.inputs, options)
        gear_module.check_unpaddable(device_model.outputs, gear_module.dynamic_dims(device_model.inputs))
        table = load_optable()
        cache = ArtifactCache(options["cache_dir"] or default_cache_dir())
        model_digest = hashlib.sha256(device_model.proto.SerializeToString(deterministic=True)).hexdigest()
        options_digest = hashlib.sha256(
            json.dumps(
                {
                    **{name: options[name] for name in _ARTIFACT_OPTIONS},
                    "optable": table.digest,
                    "artifact_version": ARTIFACT_VERSION,
                    "onnx": onnx.__version__,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()

        started = time.perf_counter()
        entries: dict[Gear, CacheEntry] = {}
        rows: dict[Gear, GearReport] = {}
        # Largest gear first: the memory budget and strict mode are decided there, before the rest is built.
        for gear in reversed(gears):
            gear_started = time.perf_counter()
            key = f"{gear.key()}-{options_digest[:16]}"
            status, entry = cache.load(model_digest, key)
            if entry is None:
                analysis, data = _build_gear(device_model.proto, gear, options, table, resident)
                entry = cache.store(model_digest, key, data, {"gear": gear.as_dict, "analysis": analysis})
                status = "miss" if status == "miss" else f"rebuilt ({status})"
            entries[gear] = entry
            analysis = entry.meta["analysis"]
            # The artifact keeps the chip-independent work; pricing it on the chosen chip is cheap.
            work = [NodeWork(*item) for item in analysis["work"]]
            estimate = estimate_from_work(work, chip, analysis["unsized_nodes"])
            rows[gear] = GearReport(
                gear=gear.describe(),
                cache=status,
                compile_seconds=time.perf_counter() - gear_started,
                device_nodes=analysis["device_nodes"],
                host_nodes=len(analysis["host"]),
                folded_nodes=len(analysis["folded"]),
                float16_nodes=analysis["float16_nodes"],
                partitions=len(analysis["partitions"]),
                transfers=len(analysis["transfers"]),
                transfer_bytes=sum(t["bytes"] or 0 for t in analysis["transfers"]),
                weight_bytes=analysis["weight_bytes"],
                activation_bytes=analysis["activation_bytes"],
                estimate_seconds=estimate.seconds,
                artifact=str(entry.artifact),
            )
            if gear == gears[-1]:
                _check_budget(analysis, budget)
                if options["strict"]:
                    _check_strict(analysis)
        largest = entries[gears[-1]].meta["analysis"]
        statuses = [row.cache for row in rows.values()]
        report = NpuSimReport(
            backend=self.name,
            simulated=True,
            note="simulated device: every node is computed by ONNX Runtime on this machine's CPU; "
            "placement, transfers, memory and latency are modelled",
            precision=reported_precision(str(options["precision"]), str(options["activations"])),
            gears=[rows[gear] for gear in gears],
            **_summarise(largest, budget),
            cache={
                "directory": str(cache.directory),
                "hits": statuses.count("hit"),
                "misses": statuses.count("miss"),
                "rebuilt": sum(status.startswith("rebuilt") for status in statuses),
                "seconds": time.perf_counter() - started,
            },
            notes=_notes(model, options) + (_STATIC_CACHE_NOTE if cache_pairs else []),
            cost_estimate={
                "label": "roofline estimate (not a measurement)",
                "chip": chip.key,
                "chip_name": chip.name,
                "seconds_per_gear": {rows[gear].gear: rows[gear].estimate_seconds for gear in gears},
            },
        )
        compiled = NpuSimCompiledModel(self, device_model, gears, entries, report, options)
        return StaticCacheDecoder(self, model, compiled, cache_pairs) if cache_pairs else compiled


def _build_gear(
    proto: onnx.ModelProto, gear: Gear, options: Mapping[str, Any], table: OpTable, resident: frozenset[str]
) -> tuple[dict[str, Any], bytes]:
    """Compile one gear: static shapes, folding, placement, precision; return its analysis and artifact.

    ``resident`` names graph inputs and outputs that stay in device memory between runs (a
    decoder's cache): they are not counted as transfers.
    """
    opset = ai_onnx_opset(proto)
    static = gear_module.infer_shapes(gear_module.static_model(proto, gear))
    if options["activations"] == "int8":
        static, _ = quantize_activations(static)
        static = gear_module.infer_shapes(static)
    folded: list[onnx.NodeProto] = []
    if options["fold_constants"]:
        static, folded = gear_module.fold_constants(static, opset)
        static = gear_module.infer_shapes(static)
    types = gear_module.value_types(static)
    plan = plan_graph(static, types, table)
    decided = float16_nodes(static, plan.placements, types, table, str(options["precision"]), options["router_fp32"])
    weights, activations = device_memory(static, plan.placements, types, float16_tensors(static, decided, types))
    artifact = apply_precision(static, decided, types)
    work, unsized = node_work(static)
    analysis = {
        "gear": gear.describe(),
        "device_nodes": plan.device_nodes,
        "float16_nodes": sum(decided),
        "host": [{"name": p.name, "op_type": p.op_type, "reason": p.reason} for p in plan.host_nodes],
        "folded": [{"name": node.name, "op_type": node.op_type} for node in folded],
        "partitions": [
            {"index": p.index, "nodes": len(p.nodes), "op_types": p.op_types, "first": p.nodes[0], "last": p.nodes[-1]}
            for p in plan.partitions
        ],
        "transfers": [transfer.to_dict() for transfer in plan.transfers if transfer.tensor not in resident],
        "weight_bytes": weights,
        "activation_bytes": activations,
        "work": [[item.name, item.op_type, item.flops, item.float_elements, item.other_bytes] for item in work],
        "unsized_nodes": unsized,
    }
    try:
        data = artifact.SerializeToString(deterministic=True)
    except ValueError as error:  # protobuf refuses messages over 2 GiB
        raise BackendError(f"npu-sim cannot serialise the {gear.describe()} artifact: {error}") from None
    return analysis, data


def _verify_static_cache(decoder: onnx.ModelProto, rewritten: onnx.ModelProto, pairs: list[Any]) -> None:
    """Refuse a decoder graph whose rewrite for a preallocated cache disagrees with it (float32, on the host).

    Raises:
        BackendError: naming what went wrong; the decoder cannot be kept in static gears then.
    """
    import onnxruntime

    from backends.onnxruntime_cpu import session_options

    def runner(proto: onnx.ModelProto) -> Any:
        session = onnxruntime.InferenceSession(
            proto.SerializeToString(), session_options(0, "all"), providers=["CPUExecutionProvider"]
        )
        names = [output.name for output in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(names, feeds)))

    try:
        verify_rewrite(decoder, pairs, runner(decoder), runner(rewritten))
    except BackendError as error:
        raise BackendError(f"npu-sim cannot keep this decoder's cache in static gears: {error}") from None


_STATIC_CACHE_NOTE = [
    "decoder graph: the key/value cache is preallocated at a gear size (positions), written in place at the "
    "current position (ScatterElements) and masked beyond it; each request's cache gear is listed under runs"
]


def _notes(model: ModelInput, options: Mapping[str, Any]) -> list[str]:
    """What a reader of the report should keep in mind for this model and these options."""
    notes = []
    if options["activations"] == "int8":
        notes.append(
            "activations=int8 (W8A8): every int8-weight matrix product quantizes its input per token (scale = "
            "max|x| / 127, round half to even), multiplies int8 by int8 into int32 and dequantizes the result; the "
            "other nodes follow the precision mode"
        )
    if options["precision"] != "must_keep_origin_dtype":
        notes.append(
            "float16 nodes read and write float16-rounded values and accumulate in float32 inside the op "
            "(ONNX Runtime's CPU kernels, explicit float16 rounding where it has no float16 kernel); a real "
            "NPU's kernels may round differently"
        )
    if model.moe_lowering == "capacity":
        notes.append(
            "capacity MoE lowering: tokens added by padding to a gear take expert capacity slots (all padding "
            "tokens route alike, so they crowd the same experts), so results equal an unpadded run only while no "
            "(token, slot) is dropped; dropped-slot counts include padded tokens, and runs counts padded runs "
            "that dropped any"
        )
    return notes


def _check_activations(model: ModelInput, options: Mapping[str, Any]) -> None:
    """Refuse int8 activations (W8A8) for a model without per-channel int8 weights."""
    if options["activations"] != "int8":
        return
    weights = model.bundle.weight_format if model.bundle is not None else "float32"
    if weights != "int8/channel":
        raise BackendError(
            f"npu-sim activations=int8 (Ascend W8A8) needs int8 weights with one scale per output channel, and this "
            f"model's weights are {weights}; convert a float32 bundle with `portable-moe convert ... --weights int8` "
            "(block size 0), or leave activations=float"
        )


def _check_budget(analysis: Mapping[str, Any], budget: int) -> None:
    needed = analysis["weight_bytes"] + analysis["activation_bytes"]
    if needed > budget:
        raise BackendError(
            f"the model does not fit npu-sim's device memory: weights {analysis['weight_bytes'] / GIB:.3g} GiB + "
            f"activations {analysis['activation_bytes'] / GIB:.3g} GiB at the largest gear ({analysis['gear']}) = "
            f"{needed / GIB:.3g} GiB, over the {budget / GIB:.3g} GiB budget (option memory_gib); "
            "use smaller gears, float16 precision, or a larger budget"
        )


def _check_strict(analysis: Mapping[str, Any]) -> None:
    host = analysis["host"]
    if host:
        shown = "; ".join(f"{node['op_type']} {node['name']!r} ({node['reason']})" for node in host[:5])
        more = f"; and {len(host) - 5} more" if len(host) > 5 else ""
        raise BackendError(
            f"strict=True: {len(host)} node(s) would fall back to the host CPU: {shown}{more}. "
            "Re-export with a lowering the device runs, or compile without strict"
        )
