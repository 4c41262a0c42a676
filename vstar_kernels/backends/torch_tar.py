"""Memory-bounded PyTorch fallback: runs anywhere torch runs, same contract as the fused kernels.

relative mode: the row max needs the whole score row, so the scores are materialised, but only for a chunk of
the batch (and, for a huge single sequence, of the query frames) at a time: the float32 scores of a chunk never
exceed the memory budget (default 256 MiB, ``VSTAR_KERNELS_TORCH_BUDGET_MB`` or the ``memory_budget``
argument). Query chunking is exact because the row max is per query frame.
absolute mode: the bias is the same for every sequence, so for float32/float64 inputs one (1, 1, Lq, Lk) tensor is
handed to ``scaled_dot_product_attention``, which never materialises scores per sequence on its fused paths. SDPA
needs a bias of the query's dtype, so float16/bfloat16 inputs take the chunked path instead: the bias stays float32
(a half-precision bias overflows at strength 1e5 and loses accuracy long before).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..contract import TARParams
from ..reference import apply_tar_bias, gaussian_delta
from .base import InputSpec

NAME = "torch"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = None
DEFAULT_BUDGET_MB = 256
BUDGET_ENV = "VSTAR_KERNELS_TORCH_BUDGET_MB"
# float32 scores, the biased copy and the softmax output are alive at once
_LIVE_SCORE_COPIES = 3


def unavailable_reason(device: torch.device) -> str | None:
    """Always available."""
    return None


def unsupported_reason(spec: InputSpec, params: TARParams) -> str | None:
    """Every input the contract admits is supported."""
    return None


def note_fallback(reason: str) -> None:
    """Never passed over: the last resort of every device."""


def memory_budget_bytes() -> int:
    """The score budget in bytes, from ``VSTAR_KERNELS_TORCH_BUDGET_MB`` (default 256 MiB)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV} must be a number of MiB, got {raw!r}") from None
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{BUDGET_ENV} must be a finite number of MiB > 0, got {raw!r}")
    return max(1, int(mb * (1 << 20)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: TARParams,
    *,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """TAR attention on (batch, frames, heads, head_dim) inputs; output contiguous (batch, Lq, heads, dim)."""
    if params.strength == 0.0 or (not params.relative and q.dtype in (torch.float32, torch.float64)):
        return _forward_sdpa(q, k, v, params)
    return _forward_chunked(q, k, v, params, memory_budget or memory_budget_bytes())


def _forward_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams) -> torch.Tensor:
    bias = None
    if params.strength != 0.0:
        delta = gaussian_delta(q.shape[1], k.shape[1], sigma=params.sigma, q_offset=params.q_offset,
                               k_offset=params.k_offset, dtype=torch.float64, device=q.device)
        bias = (params.strength * delta).to(q.dtype)[None, None]  # float32/float64 only: exact enough
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=params.scale
    )
    # SDPA's CPU and CUDA kernels already return the (batch, Lq, heads, dim) layout; this is a no-op then
    return out.transpose(1, 2).contiguous()


def chunk_plan(
    batch: int, len_q: int, heads: int, len_k: int, compute_dtype: torch.dtype, budget: int
) -> tuple[int, int]:
    """(batch chunk, query-frame chunk) whose live score tensors fit ``budget`` bytes (at least one row)."""
    row_bytes = heads * len_k * (torch.finfo(compute_dtype).bits // 8) * _LIVE_SCORE_COPIES
    q_chunk = max(1, min(len_q, budget // row_bytes))
    b_chunk = max(1, min(batch, budget // (row_bytes * len_q))) if q_chunk == len_q else 1
    return b_chunk, q_chunk


def _forward_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, budget: int
) -> torch.Tensor:
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    compute = _compute_dtype(q.dtype)
    b_chunk, q_chunk = chunk_plan(batch, len_q, heads, len_k, compute, budget)
    delta = gaussian_delta(len_q, len_k, sigma=params.sigma, q_offset=params.q_offset,
                           k_offset=params.k_offset, dtype=compute, device=q.device)
    out = torch.empty((batch, len_q, heads, dim), dtype=q.dtype, device=q.device)
    for b0 in range(0, batch, b_chunk):
        bs = slice(b0, b0 + b_chunk)
        kh = k[bs].transpose(1, 2).to(compute)  # (b, heads, Lk, dim)
        vh = v[bs].transpose(1, 2).to(compute)
        for i0 in range(0, len_q, q_chunk):
            qs = slice(i0, i0 + q_chunk)
            qh = q[bs, qs].transpose(1, 2).to(compute)
            scores = torch.matmul(qh, kh.transpose(-1, -2)).mul_(params.scale)
            scores = apply_tar_bias(scores, delta[qs], strength=params.strength, mode=params.mode)
            probs = torch.softmax(scores, dim=-1)
            del scores
            out[bs, qs] = torch.matmul(probs, vh).transpose(1, 2)
    return out
