"""Structure of the backends (issue 22): an acyclic import graph, one statement of the Triton kernels' variant
rules, and a torch fallback that builds each query chunk's band once for the whole batch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import assert_matches_reference, make_qkv

import vstar_kernels.backends as backends
from vstar_kernels.backends import torch_tar
from vstar_kernels.contract import make_params
from vstar_kernels.reference import tar_attention_reference

BACKENDS_DIR = Path(backends.__file__).parent


def _imported_siblings(path: Path) -> set[str]:
    """The modules of vstar_kernels.backends that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in BACKENDS_DIR.glob("*.py")}


def test_the_backends_import_graph_has_no_cycle():
    graph = {p.stem: _imported_siblings(p) for p in BACKENDS_DIR.glob("*.py") if p.stem != "__init__"}
    assert "triton_tar" not in graph["triton_tar_backward"] and "triton_tar_backward" not in graph["triton_common"]
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_triton_variant_rules_are_written_once():
    """'framed and strength != 0' (FRAMED) and 'relative and strength != 0' (RELATIVE): triton_common only."""
    for name in ("triton_tar", "triton_tar_backward"):
        assert "strength != 0" not in (BACKENDS_DIR / f"{name}.py").read_text(), name
    assert (BACKENDS_DIR / "triton_common.py").read_text().count("strength != 0") == 2


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("budget", "chunks"), [(1 << 30, 1), (3 * 30 * 4 * 3 * 25, 1), (3 * 30 * 4 * 3 * 7, 4)])
def test_the_torch_fallback_builds_each_query_chunk_band_once(monkeypatch, mode, budget, chunks):
    """5 sequences; one query chunk (the whole batch at once, or one sequence at a time) or 4 query chunks of 7 rows:
    bias_rows (the band, and a profile's tables) runs once per query chunk, not once per (batch chunk, query chunk).
    fp16 takes the chunked path in both modes."""
    calls = []
    real = torch_tar.bias_rows
    monkeypatch.setattr(torch_tar, "bias_rows", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    q, k, v = make_qkv(5, 25, 3, 16, len_k=30, dtype=torch.float16, layout="heads_first")
    kw = dict(sigma=2.0, strength=1.5, mode=mode, q_offset=3)
    params = make_params(16, **kw)
    assert torch_tar.chunk_plan(5, 25, 3, 30, torch.float32, budget)[1] == (25 if chunks == 1 else 7)
    assert_matches_reference(torch_tar.forward(q, k, v, params, memory_budget=budget), q, k, v, **kw)
    assert len(calls) == chunks and sum(len(rows) for rows in calls) == 25
    calls.clear()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    grads = torch_tar.backward(q.float(), k.float(), v.float(), grad_out, params,
                               memory_budget=budget * 2)  # the backward keeps twice the copies
    assert len(calls) == chunks
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(tar_attention_reference(*leaves, **kw), leaves, grad_out.double())
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
