"""The import graph keeps the layout's promises (docs/architecture.md): imports run one way, no cycles.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` anywhere in
a module (inside functions too, where lazy imports hide), and every string literal that names one
of the project's modules (what ``importlib.import_module`` is given). Nothing is imported to build it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("portable_moe", "exporters", "backends")

# Highest first. A module may import its own layer and the layers below it, never one above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command line", ("portable_moe.cli",)),
    ("public API and tooling", ("portable_moe", "portable_moe.testing", "portable_moe.cluster")),
    ("exporters and backends", ("exporters", "backends")),
    ("conformance, run, perf", ("portable_moe.conformance", "portable_moe.run", "portable_moe.perf")),
    ("contract", ("portable_moe.*",)),
)


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a source file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the three import packages, by dotted name."""
    return {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest project module that ``name`` is or lies inside (``a.b.func`` -> ``a.b``)."""
    known = set(modules)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(source: str, this_module: str, is_package: bool, modules: Iterable[str]) -> set[str]:
    """The project modules that ``source`` imports (anywhere in it) or names in a string literal."""
    known = list(modules)
    found: set[str] = set()
    package = this_module if is_package else this_module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports a.b when b is a module, else a.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            if node.value in known:
                targets = [node.value]
        for target in targets:
            resolved = _resolve(target, known)
            if resolved and resolved != this_module:
                found.add(resolved)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root)
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", modules) for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    """Index in LAYERS of the first layer whose prefixes match ``module`` (0 is the highest)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith(".*"):
                if module.startswith(prefix[:-1]):
                    return index
            elif module == prefix or module.startswith(prefix + "."):
                if prefix == "portable_moe" and module != "portable_moe":
                    continue  # the package itself is the public API; its modules are placed by the rules below
                return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import from a lower layer into a higher one, in words."""
    return sorted(
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) < layer_of(module)
    )


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in on_stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_imports_run_one_way() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_cycles() -> None:
    assert import_cycles(import_graph()) == []


def test_the_contract_imports_no_command_line_exporter_or_backend() -> None:
    graph = import_graph()
    contract = [module for module in graph if layer_of(module) == len(LAYERS) - 1]
    assert "portable_moe.backend" in contract and "portable_moe.bundle" in contract
    offending = {
        module: sorted(target for target in graph[module] if target.startswith(("portable_moe.cli", *PACKAGES[1:])))
        for module in contract
    }
    assert {module: targets for module, targets in offending.items() if targets} == {}


def test_no_module_of_portable_moe_imports_torch() -> None:
    # Running and checking bundles needs no torch: only exporters/ (and its reference model) import it, and
    # the pytest plugin (portable_moe.testing), which exports presets through exporters/ and asks first
    # whether torch imports, so that it can skip those tests with the reason.
    modules = project_modules()
    offending = {}
    for name, path in modules.items():
        if not name.startswith("portable_moe") or name.startswith("portable_moe.testing"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        if imported & {"torch", "transformers", "onnxscript"}:
            offending[name] = sorted(imported & {"torch", "transformers", "onnxscript"})
    assert offending == {}


def test_no_module_is_named_after_the_standard_library() -> None:
    import sys

    clashes = sorted(name for name in project_modules() if name.rpartition(".")[2] in sys.stdlib_module_names)
    assert clashes == []


# The checks above must be able to fail: the same functions on a small tree that breaks each rule.


def _write_tree(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_graph_sees_lazy_imports_importlib_strings_and_relative_imports(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "portable_moe/__init__.py": "",
            "portable_moe/bundle.py": "def f():\n    from portable_moe.cli import app\n",
            "portable_moe/cli/__init__.py": "",
            "portable_moe/cli/app.py": "import importlib\nimportlib.import_module('portable_moe.run.pool')\n",
            "portable_moe/run/__init__.py": "",
            "portable_moe/run/pool.py": "from ..cli import app\nfrom . import other\n",
            "portable_moe/run/other.py": "",
            "exporters/__init__.py": "",
            "backends/__init__.py": "",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["portable_moe.bundle"] == {"portable_moe.cli.app"}
    assert graph["portable_moe.cli.app"] == {"portable_moe.run.pool"}
    assert graph["portable_moe.run.pool"] == {"portable_moe.cli.app", "portable_moe.run.other"}
    assert upward_imports(graph) == [
        "portable_moe.bundle (contract) imports portable_moe.cli.app (command line)",
        "portable_moe.run.pool (conformance, run, perf) imports portable_moe.cli.app (command line)",
    ]
    assert import_cycles(graph) == [["portable_moe.cli.app", "portable_moe.run.pool"]]


def test_a_module_outside_every_layer_is_reported() -> None:
    with pytest.raises(AssertionError, match="elsewhere is in no layer"):
        layer_of("elsewhere")
