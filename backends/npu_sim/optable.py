"""The simulated device's operator table (``optable.json``): which ONNX nodes it runs, and why not.

The table is data, shipped inside this package. This module loads it once, checks its shape, and
answers one question per node: can the device run it, and if not, for what reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import onnx

from portable_moe.errors import BackendError

OPTABLE_NAME = "optable.json"
ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpEntry:
    """One operator of the table.

    Attributes:
        op_type: the ONNX op type.
        supported: False for operators listed only to say why they run on the host.
        opsets: the model ai.onnx opsets (inclusive) the device takes the operator at.
        dtypes: dtypes accepted on inputs without an override.
        input_dtypes: per input index, the dtypes accepted there.
        dtype_reason: why other dtypes run on the host.
        category: "cube" (matrix unit), "vector", "data" (moves bytes) or "shape".
        mix: the allow_mix_precision list: "allow", "deny" or "gray".
        fp16: whether a precision mode may run it in float16.
        limits: further conditions, each with a reason.
        reason: for an unsupported operator, why.
    """

    op_type: str
    supported: bool
    opsets: tuple[int, int]
    dtypes: frozenset[str]
    input_dtypes: Mapping[int, frozenset[str]]
    dtype_reason: str
    category: str
    mix: str
    fp16: bool
    limits: tuple[Mapping[str, Any], ...]
    reason: str


class OpTable:
    """The parsed operator table. Use :func:`load_optable` rather than building one."""

    def __init__(self, data: Mapping[str, Any], digest: str) -> None:
        self.data = data
        self.digest = digest
        self.domain_opsets: tuple[int, int] = tuple(data["opsets"])  # type: ignore[assignment]
        self.rules: dict[str, Mapping[str, Any]] = {rule["name"]: rule for rule in data["rules"]}
        dtype_sets = data["dtype_sets"]
        self.entries: dict[str, OpEntry] = {}
        for op_type, raw in data["ops"].items():
            dtype_set = dtype_sets.get(raw.get("dtypes", ""), {"dtypes": [], "reason": ""})
            self.entries[op_type] = OpEntry(
                op_type=op_type,
                supported=bool(raw.get("supported", True)),
                opsets=(int(raw["opsets"][0]), int(raw["opsets"][1])),
                dtypes=frozenset(dtype_set["dtypes"]),
                input_dtypes={
                    int(index): frozenset(dtype_sets[name]["dtypes"]) for index, name in raw.get("inputs", {}).items()
                },
                dtype_reason=raw.get("dtype_reason", dtype_set["reason"]),
                category=raw.get("category", "vector"),
                mix=raw.get("mix", "gray"),
                fp16=bool(raw.get("fp16", True)) and "float16" in dtype_set["dtypes"],
                limits=tuple(raw.get("limits", ())),
                reason=raw.get("reason", ""),
            )

    def rule_reason(self, name: str) -> str:
        return str(self.rules[name]["reason"])

    def supported_op_types(self) -> list[str]:
        return sorted(op for op, entry in self.entries.items() if entry.supported)

    def entry(self, op_type: str) -> OpEntry | None:
        return self.entries.get(op_type)

    def check_node(self, node: onnx.NodeProto, opset: int, input_dtypes: Sequence[str | None]) -> str | None:
        """Why ``node`` cannot run on the device, or None if it can.

        Args:
            node: the node.
            opset: the model's ai.onnx opset.
            input_dtypes: the numpy dtype name of each input ("" inputs and unknown types as None).

        Covers the per-operator rules (domain, opset, allowlist, dtypes, attribute limits). The
        graph-level rules (all-constant inputs, static shapes) are applied by the partitioner.
        """
        if node.domain not in ONNX_DOMAINS:
            return f"domain {node.domain!r} is not ai.onnx: {self.rule_reason('domain')}"
        low, high = self.domain_opsets
        if not low <= opset <= high:
            return f"the model's ai.onnx opset {opset} is outside {low}-{high}: {self.rule_reason('opset')}"
        entry = self.entries.get(node.op_type)
        if entry is None:
            return f"{node.op_type} is not in the device's operator table"
        if not entry.supported:
            return entry.reason
        if not entry.opsets[0] <= opset <= entry.opsets[1]:
            return f"{node.op_type} runs on the device at opsets {entry.opsets[0]}-{entry.opsets[1]}, the model uses {opset}"
        for index, dtype in enumerate(input_dtypes):
            if dtype is None or index >= len(node.input) or not node.input[index]:
                continue
            allowed = entry.input_dtypes.get(index, entry.dtypes)
            if dtype not in allowed:
                return (
                    f"{node.op_type} input {index} is {dtype}; the device takes {', '.join(sorted(allowed))} "
                    f"({entry.dtype_reason})"
                )
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        for limit in entry.limits:
            if limit["kind"] == "attribute":
                value = attributes.get(limit["attribute"])
                value = value.decode() if isinstance(value, bytes) else value
                if value is not None and value not in limit["allowed"]:
                    return f"{node.op_type} with {limit['attribute']}={value!r}: {limit['reason']}"
        return None


def _validate(data: Any) -> None:
    """Refuse a table with a missing field or a limitation without a reason (it is data anyone may edit)."""
    if not isinstance(data, dict):
        raise BackendError(f"npu-sim {OPTABLE_NAME} is not a JSON object")
    for key in ("sources", "opsets", "rules", "dtype_sets", "ops"):
        if key not in data:
            raise BackendError(f"npu-sim {OPTABLE_NAME} has no {key!r}")
    sources = data["sources"]

    def need_reason(what: str, item: Mapping[str, Any]) -> None:
        if not str(item.get("reason", "")).strip():
            raise BackendError(f"npu-sim {OPTABLE_NAME}: {what} has no reason")
        if item.get("basis") not in sources:
            raise BackendError(
                f"npu-sim {OPTABLE_NAME}: {what} has basis {item.get('basis')!r}, not a key of 'sources'"
            )

    for rule in data["rules"]:
        need_reason(f"rule {rule.get('name')!r}", rule)
    for name, dtype_set in data["dtype_sets"].items():
        need_reason(f"dtype set {name!r}", dtype_set)
    for op_type, entry in data["ops"].items():
        if not entry.get("supported", True):
            need_reason(f"unsupported operator {op_type}", entry)
            continue
        for name in [entry.get("dtypes"), *entry.get("inputs", {}).values()]:
            if name not in data["dtype_sets"]:
                raise BackendError(f"npu-sim {OPTABLE_NAME}: operator {op_type} names unknown dtype set {name!r}")
        for limit in entry.get("limits", ()):
            need_reason(f"limit {limit.get('kind')!r} of {op_type}", limit)


@functools.lru_cache(maxsize=1)
def load_optable() -> OpTable:
    """Load and check the operator table shipped in this package (once per process).

    Raises:
        BackendError: if the file is missing, not JSON, or a limitation lacks its reason.
    """
    try:
        raw = resources.files(__package__).joinpath(OPTABLE_NAME).read_bytes()
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError) as error:
        raise BackendError(f"npu-sim cannot read its operator table {OPTABLE_NAME}: {error}") from None
    _validate(data)
    return OpTable(data, hashlib.sha256(raw).hexdigest())
