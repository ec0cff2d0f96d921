"""Tests for the sparse routed-experts lowering (exporters/lowering_sparse.py).

Eager results are compared with a naive per-(token, slot) loop, and one ONNX
export with a dynamic token dimension is run on ONNX Runtime (CPU) for several
token counts and routing patterns.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# pytest may run with --import-mode=importlib and from any directory, so the
# repository root is not necessarily on sys.path; this file relies on no
# conftest.py or tests/__init__.py to put it there.
_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from exporters.lowering_sparse import after_export, routed_experts_sparse  # noqa: E402

HIDDEN = 32
INTER = 16
NUM_EXPERTS = 8
TOP_K = 2
ATOL = 1e-5


class _RoutedExperts(torch.nn.Module):
    """Holds expert weights as parameters so they export as initializers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # Scale 0.2 keeps activations and outputs O(1) at these tiny sizes, so
        # an absolute 1e-5 tolerance is meaningful (not trivially loose) yet above
        # float32 rounding differences between summation orders.
        self.w1 = torch.nn.Parameter(torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen) * 0.2)
        self.w3 = torch.nn.Parameter(torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen) * 0.2)
        self.w2 = torch.nn.Parameter(torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=gen) * 0.2)

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return routed_experts_sparse(hidden, expert_ids, expert_weights, self.w1, self.w3, self.w2)


def _naive(
    module: _RoutedExperts,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference: evaluates every (token, slot) separately."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        x = hidden[t]
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            act = F.silu(module.w1[e] @ x) * (module.w3[e] @ x)
            out[t] += expert_weights[t, j] * (module.w2[e] @ act)
    return out


def _random_routing(
    num_tokens: int, seed: int, experts: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns hidden, expert_ids (k distinct per token) and expert_weights.

    Args:
        num_tokens: Number of tokens T.
        seed: Seed for the generator.
        experts: Experts to route to (default: all of them).
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else list(range(NUM_EXPERTS)))
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    picks = torch.rand(num_tokens, len(pool), generator=gen).argsort(dim=-1)[:, :TOP_K]
    expert_ids = pool[picks]
    expert_weights = torch.rand(num_tokens, TOP_K, generator=gen) + 0.1
    return hidden, expert_ids, expert_weights


def _export_onnx(module: torch.nn.Module, directory: Path) -> dict[str, Path]:
    """Exports `module` once with a dynamic token dimension.

    Returns:
        Paths of the graph as torch.onnx.export wrote it ("plain") and after the
        lowering's `after_export` rewrite ("after_export").
    """
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    dynamic_shapes = ({0: tokens}, {0: tokens}, {0: tokens})
    # Export with T=3 so that the traced size is neither 1 nor any tested size.
    example = _random_routing(3, seed=123)
    with torch.no_grad():
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=20)
    paths = {"plain": directory / "plain.onnx", "after_export": directory / "after_export.onnx"}
    program.save(str(paths["plain"]))
    after_export(program)  # checked by test_after_export_feeds_counts_to_split
    program.save(str(paths["after_export"]))
    return paths


def _run_ort(session, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor):
    """Runs the exported graph and returns its single output as a tensor."""
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (hidden.numpy(), expert_ids.numpy(), expert_weights.numpy())))
    return torch.from_numpy(session.run(None, feeds)[0])


@pytest.fixture(scope="module")
def module() -> _RoutedExperts:
    """Seeded expert weights shared by all tests."""
    return _RoutedExperts().eval()


@pytest.fixture(scope="module")
def onnx_paths(module: _RoutedExperts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export shared by all ONNX tests (export is the slow part)."""
    pytest.importorskip("onnxscript")
    return _export_onnx(module, tmp_path_factory.mktemp("sparse"))


@pytest.fixture(scope="module", params=["plain", "after_export"])
def onnx_path(request: pytest.FixtureRequest, onnx_paths: dict[str, Path]) -> Path:
    """The exported graph, without and with the after_export rewrite."""
    return onnx_paths[request.param]


@pytest.fixture(scope="module")
def ort_session(onnx_path: Path):
    """ONNX Runtime CPU session on the shared export, with 2 intra-op threads."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    # Two threads, as in deployment: parallel kernels are where races would show.
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_eager_matches_naive(module: _RoutedExperts, num_tokens: int) -> None:
    """Eager torch equals the per-(token, slot) reference loop."""
    hidden, ids, weights = _random_routing(num_tokens, seed=num_tokens)
    with torch.no_grad():
        got = module(hidden, ids, weights)
        want = _naive(module, hidden, ids, weights)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_eager_int32_ids(module: _RoutedExperts) -> None:
    """int32 expert ids are accepted (cast to int64 inside)."""
    hidden, ids, weights = _random_routing(4, seed=7)
    with torch.no_grad():
        got = module(hidden, ids.to(torch.int32), weights)
        want = _naive(module, hidden, ids, weights)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_onnx_dynamic_tokens(module: _RoutedExperts, ort_session, num_tokens: int) -> None:
    """One export with a dynamic T runs on ORT for several T and matches eager."""
    hidden, ids, weights = _random_routing(num_tokens, seed=100 + num_tokens)
    with torch.no_grad():
        want = module(hidden, ids, weights)
    got = _run_ort(ort_session, hidden, ids, weights)
    assert got.shape == (num_tokens, HIDDEN)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_onnx_some_experts_unused(module: _RoutedExperts, ort_session) -> None:
    """Experts that receive no tokens (empty Split blocks) are handled."""
    # Only experts 1, 4 and 6 receive tokens; every other block is empty.
    hidden, ids, weights = _random_routing(16, seed=5, experts=[1, 4, 6])
    assert set(ids.unique().tolist()) <= {1, 4, 6}
    with torch.no_grad():
        want = _naive(module, hidden, ids, weights)
    got = _run_ort(ort_session, hidden, ids, weights)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_onnx_all_tokens_same_experts(module: _RoutedExperts, ort_session) -> None:
    """All tokens routed to the same experts: two full blocks, the rest empty."""
    # Every token picks experts (7, 2): two full blocks, six empty ones, and
    # every output row sums slots that come from both blocks.
    hidden, _, weights = _random_routing(32, seed=9)
    ids = torch.tensor([[7, 2]]).expand(32, TOP_K).contiguous()
    with torch.no_grad():
        want = _naive(module, hidden, ids, weights)
    got = _run_ort(ort_session, hidden, ids, weights)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_onnx_graph_is_sparse_and_race_free(onnx_path: Path) -> None:
    """The graph splits rows per expert and uses no scatter reductions.

    A scatter with reduction="add" over repeated token indices is what index_add
    would give; ONNX Runtime's CPU ScatterND applies such updates from several
    threads without atomics and loses some at realistic sizes (too rarely to
    catch with these tiny shapes), so the structure is checked instead.
    """
    onnx = pytest.importorskip("onnx")
    nodes = onnx.load(str(onnx_path)).graph.node
    op_types = {node.op_type for node in nodes}
    assert "Split" in op_types
    assert not op_types & {"NonZero", "Einsum"}
    for node in nodes:
        for attr in node.attribute:
            if attr.name == "reduction":
                assert onnx.helper.get_attribute_value(attr) in (b"none", "none"), node.op_type


def test_after_export_feeds_counts_to_split(onnx_paths: dict[str, Path]) -> None:
    """after_export drops the per-expert scalar chains and passes the checker."""
    onnx = pytest.importorskip("onnx")
    plain_model = onnx.load(str(onnx_paths["plain"]))
    rewired_model = onnx.load(str(onnx_paths["after_export"]))
    onnx.checker.check_model(rewired_model, full_check=True)

    def split_sizes_producers(model) -> set[str]:
        """Op types producing the `split` input of every data-dependent Split."""
        initializers = {tensor.name for tensor in model.graph.initializer}
        producers = {output: node.op_type for node in model.graph.node for output in node.output}
        return {
            producers[node.input[1]]
            for node in model.graph.node
            if node.op_type == "Split" and len(node.input) == 2 and node.input[1] not in initializers
        }

    assert split_sizes_producers(plain_model) == {"Concat"}
    assert split_sizes_producers(rewired_model) == {"ReduceSum"}
    # At least four scalar nodes per expert are gone.
    assert len(rewired_model.graph.node) <= len(plain_model.graph.node) - 4 * NUM_EXPERTS
