"""Shared test helpers: input layouts as diffusers makes them, the precision-aware criterion, a torchrun launcher
for the multi-process workers (:func:`torchrun`, :func:`run_output`) and the workers' way to run a rank
(:func:`run_rank`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vstar_kernels import tar_attention, tar_attention_reference

# absolute tolerance per dtype, relative to max |v| (output rounding plus accumulation order)
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LAYOUTS = ("contiguous", "projection", "fused_qkv", "heads_first", "permuted")


def make_qkv(
    batch: int,
    len_q: int,
    heads: int,
    dim: int,
    *,
    len_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    magnitude: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (batch, len_q, heads, dim) and k, v (batch, len_k, heads, dim) in one of several memory layouts.

    projection: a (batch, F, heads*dim) projection viewed as (batch, F, heads, dim), as diffusers' processors do.
    fused_qkv:  q, k, v sliced out of one (batch, F, 3*heads*dim) tensor (fused QKV projection): non-contiguous.
    heads_first: a (batch, heads, F, dim) tensor transposed.  permuted: head_dim not the innermost axis.
    """
    len_k = len_q if len_k is None else len_k
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * magnitude).to(dtype)

    if layout in ("contiguous", "projection"):
        q = randn(batch, len_q, heads * dim).view(batch, len_q, heads, dim)
        k, v = (randn(batch, len_k, heads * dim).view(batch, len_k, heads, dim) for _ in range(2))
        if layout == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return q, k, v
    if layout == "fused_qkv":
        if len_k != len_q:
            raise ValueError("fused_qkv needs len_q == len_k")
        fused = randn(batch, len_q, 3 * heads * dim)
        q, k, v = (t.view(batch, len_q, heads, dim) for t in fused.split(heads * dim, dim=-1))
        return q, k, v
    if layout == "heads_first":
        q = randn(batch, heads, len_q, dim).transpose(1, 2)
        k, v = (randn(batch, heads, len_k, dim).transpose(1, 2) for _ in range(2))
        return q, k, v
    if layout == "permuted":
        q = randn(batch, heads, dim, len_q).permute(0, 3, 1, 2)
        k, v = (randn(batch, heads, dim, len_k).permute(0, 3, 1, 2) for _ in range(2))
        return q, k, v
    raise ValueError(f"unknown layout {layout!r}")


def reference_error(q, k, v, out, **kwargs) -> tuple[float, float, float]:
    """(error of out, error of torch in the input precision, atol), all against the float64 reference."""
    ref = tar_attention_reference(q.double(), k.double(), v.double(), **kwargs)
    err = (out.double() - ref).abs().max().item()
    if q.dtype == torch.float64:
        base = 0.0
    else:
        same = tar_attention_reference(q, k, v, upcast=False, **kwargs).double()
        if not torch.isfinite(same).all():  # the input-precision baseline overflowed: fall back to fp32 math
            same = tar_attention_reference(q.float(), k.float(), v.float(), **kwargs).double()
        base = (same - ref).abs().max().item()
    atol = ATOL[q.dtype] * max(1.0, v.abs().max().item())
    return err, base, atol


def assert_matches_reference(out: torch.Tensor, q, k, v, **kwargs) -> None:
    """|out - ref_fp64| <= 2 * |torch_same_precision - ref_fp64| + atol (FlagAttention-style criterion)."""
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    err, base, atol = reference_error(q, k, v, out, **kwargs)
    assert err <= 2 * base + atol, f"max error {err:.3e} > 2 * {base:.3e} + {atol:.3e} ({kwargs})"


def pickle_round_trip(obj):
    """``obj`` through ``torch.save`` / ``torch.load`` (full pickling, as a user saving a whole model does)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def on_one_and_two_threads(run):
    """``run()`` with one intra-op thread, then with two (the caller's count restored): the two results, for tests
    that the kernels' split over threads changes no bit (pytest-xdist workers run one thread, see conftest.py)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    return one, two


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


def assert_grads_match_reference(backend: str, q, k, v, seed: int = 0, **kw) -> None:
    """|g - g_ref64| <= 2 * |g_torch_same_precision - g_ref64| + atol for dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn((*q.shape[:3], v.shape[3]), generator=gen).to(q.dtype)
    out, grads = grads_of(lambda q, k, v: tar_attention(q, k, v, backend=backend, **kw), (q, k, v), grad_out)
    assert out.grad_fn is not None
    _, ref = grads_of(lambda q, k, v: tar_attention_reference(q, k, v, **kw),
                    (q.double(), k.double(), v.double()), grad_out.double())
    _, same = grads_of(lambda q, k, v: tar_attention_reference(q, k, v, upcast=False, **kw), (q, k, v), grad_out)
    for name, g, r, s, t in zip("qkv", grads, ref, same, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        base = (s.double() - r).abs().max().item() if q.dtype != torch.float64 else 0.0
        atol = ATOL[q.dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * base + atol, f"d{name}: {err:.3e} > 2 * {base:.3e} + {atol:.3e} ({backend}, {kw})"


def torchrun(worker: Path, nproc: int, *args: str, report_dir: Path, timeout_s: float = 300
             ) -> subprocess.CompletedProcess:
    """``worker`` on ``nproc`` local processes (``torch.distributed.run --standalone``, one thread each), writing
    its per-rank reports into ``report_dir``; the process group's timeout is 60 s, so a rank left waiting fails
    instead of hanging the suite. The ranks dump every thread's Python stack on a fatal signal (faulthandler); when
    torchrun fails, :func:`run_output` goes to stderr (pytest shows it with the failing test) so that a rank that
    aborted or hung says where."""
    from vstar_kernels.distributed.layout import TIMEOUT_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "60", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(worker), "--report-dir", str(report_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        print(run_output(proc), file=sys.stderr, flush=True)
    return proc


def run_output(proc: subprocess.CompletedProcess, limit: int = 6000) -> str:
    """What a torchrun run said, for an assertion message: its exit status, the command, and the tails of its
    stdout and of its stderr (the ranks' stderr, with torchrun's summary of which rank failed and how: an exit
    code, or a signal such as SIGABRT)."""
    command = " ".join(str(part) for part in proc.args) if isinstance(proc.args, list) else str(proc.args)
    return (f"torchrun exited with {proc.returncode}: {command}\n"
            f"--- stdout (last {limit} characters) ---\n{(proc.stdout or '')[-limit:]}\n"
            f"--- stderr (last {limit} characters) ---\n{(proc.stderr or '')[-limit:]}")


def run_rank(main: Callable[[], int]) -> int:
    """One rank of a torchrun worker: ``main()`` (which initialises the default process group, itself or through
    the library, and returns the exit status), then, once it has returned and its models and device meshes are
    gone, the group closed on every rank together by
    :func:`vstar_kernels.distributed.layout.close_process_group` (barrier, collection, destroy). A process group
    still referenced after that would outlive the peers' sockets and may abort the rank at exit: it is named on
    stderr and the status becomes 1. An exception from ``main`` propagates (the run fails; the library closes a
    group it opened itself at exit, without the barrier)."""
    from vstar_kernels.distributed.layout import close_process_group

    status = main()
    alive = close_process_group()
    if alive:
        print(f"rank {os.environ.get('RANK', '?')}: process groups still referenced after close_process_group: "
              f"{', '.join(alive)}", file=sys.stderr, flush=True)
        return status or 1
    return status


def rank_reports(report_dir: Path) -> list[dict]:
    """The ``rank<r>.json`` reports a worker wrote, in rank order."""
    return [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank*.json"))]


def profile_softmax(scores, frames, profile):
    """softmax of S' = (S>0 ? scale(d) S : S) + bias(d) + c G(d) over kept framed pairs (text pairs: S), from a
    (batch, heads, Lq, Lk) float64 S and each token's frame (None: text); written from the contract's formula."""
    heads = scores.shape[1]
    framed = torch.tensor([[a is not None and b is not None for b in frames] for a in frames])
    dist = torch.tensor([[abs(a - b) if a is not None and b is not None else 0 for b in frames] for a in frames])

    def at(table):  # (heads, L, L): each head's row at min(d, D)
        return table.expand(heads, -1)[:, dist.clamp(max=table.shape[1] - 1)]

    keep = torch.ones(heads, *dist.shape, dtype=torch.bool)
    if profile.radius is not None:
        sink = torch.tensor([b is not None and b < profile.sink_frames for b in frames])
        keep &= ~framed | (dist <= profile.radius) | sink[None, :]
    logits = scores
    if profile.positive_scale is not None:
        logits = torch.where(framed & (scores > 0), scores * at(profile.positive_scale), scores)
    if profile.bias is not None:
        bias = at(profile.bias)
        keep &= ~framed | torch.isfinite(bias)
        logits = logits + torch.where(framed & torch.isfinite(bias), bias, 0.0)
    if profile.sigma is not None:
        band = torch.exp(-dist.double() ** 2 / (2 * profile.sigma**2)) * framed
        peak = scores.masked_fill(~keep, -math.inf).amax(-1, keepdim=True)
        logits = logits + (profile.strength * peak if profile.mode == "relative" else profile.strength) * band
    return torch.softmax(logits.masked_fill(~keep, -math.inf), -1)
