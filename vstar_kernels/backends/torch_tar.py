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
from ..reference import (
    apply_profile_bias,
    band_rows,
    bias_coefficient,
    bias_rows,
    key_prefix_mask,
    profile_bias_backward,
    softmax_with_lse,
)
from .base import InputSpec

NAME = "torch"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = None
DEFAULT_BUDGET_MB = 256
ROW_MAX_BUDGET_MB = 16  # the row-max pass's logits (row_max): one chunk of query rows at a time
BUDGET_ENV = "VSTAR_KERNELS_TORCH_BUDGET_MB"
# float32 scores, the biased copy and the softmax output are alive at once in the forward; the backward adds dP,
# dS' and dS
_LIVE_SCORE_COPIES = 3
_LIVE_SCORE_COPIES_BACKWARD = 6


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
    row_max: torch.Tensor | None = None,
    return_lse: bool = False,
    k_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TAR attention on (batch, frames, heads, head_dim) inputs; output contiguous (batch, Lq, heads, dim).
    ``row_max`` (float32 (batch, Lq, heads); float64 for float64 inputs, and so is the lse), ``return_lse`` and
    ``k_lengths`` (the keys past it masked out of the logits before the bias) as in
    :func:`vstar_kernels.ops.tar_attention`."""
    budget = memory_budget or memory_budget_bytes()
    if not return_lse and k_lengths is None and not params.shaped and (params.strength == 0.0 or (
            not params.relative and q.dtype in (torch.float32, torch.float64)
            and q.shape[1] * k.shape[1] * q.element_size() <= budget)):
        return _forward_sdpa(q, k, v, params)
    out, lse = _forward_chunked(q, k, v, params, budget, row_max, return_lse, k_lengths)
    return (out, lse) if return_lse else out


def _forward_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams) -> torch.Tensor:
    bias = None
    if params.strength != 0.0:
        delta = band_rows(params, range(q.shape[1]), k.shape[1], dtype=torch.float64, device=q.device)
        coeff = bias_coefficient(delta, strength=params.strength, mode="absolute")  # sat(strength)
        bias = (coeff * delta).to(q.dtype)[None, None]  # float32/float64 only: exact enough
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=params.scale
    )
    # SDPA's CPU and CUDA kernels already return the (batch, Lq, heads, dim) layout; this is a no-op then
    return out.transpose(1, 2).contiguous()


def chunk_plan(
    batch: int, len_q: int, heads: int, len_k: int, compute_dtype: torch.dtype, budget: int,
    copies: int = _LIVE_SCORE_COPIES,
) -> tuple[int, int]:
    """(batch chunk, query-frame chunk) whose ``copies`` live score tensors fit ``budget`` bytes (at least one
    row)."""
    row_bytes = heads * len_k * (torch.finfo(compute_dtype).bits // 8) * copies
    q_chunk = max(1, min(len_q, budget // row_bytes))
    b_chunk = max(1, min(batch, budget // (row_bytes * len_q))) if q_chunk == len_q else 1
    return b_chunk, q_chunk


def query_chunks(len_q: int, q_chunk: int) -> list[slice]:
    """The query-frame chunks of :func:`chunk_plan`, in order."""
    return [slice(i0, min(i0 + q_chunk, len_q)) for i0 in range(0, len_q, q_chunk)]


def _forward_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, budget: int,
    row_max: torch.Tensor | None = None, return_lse: bool = False, k_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    compute = _compute_dtype(q.dtype)
    b_chunk, q_chunk = chunk_plan(batch, len_q, heads, len_k, compute, budget)
    out = torch.empty((batch, len_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, len_q, heads), dtype=compute, device=q.device) if return_lse else None
    masked = params.shaped and params.profile.masks
    for qs in query_chunks(len_q, q_chunk):  # the bias of a query chunk is the same for every sequence: built once
        rows = bias_rows(params, range(qs.start, qs.stop), len_k, dtype=compute, device=q.device)
        for b0 in range(0, batch, b_chunk):
            bs = slice(b0, b0 + b_chunk)
            qh = q[bs, qs].transpose(1, 2).to(compute)  # (b, heads, rows, dim)
            kh = k[bs].transpose(1, 2).to(compute)  # (b, heads, Lk, dim)
            scores = _masked(torch.matmul(qh, kh.transpose(-1, -2)).mul_(params.scale), k_lengths, bs)
            peak = None if row_max is None else row_max[bs, qs].transpose(1, 2)[..., None]
            scores = apply_profile_bias(scores, rows, strength=params.strength, mode=params.mode, row_max=peak)
            if masked:
                probs, row_lse = softmax_with_lse(scores, True)
                if lse is not None:
                    lse[bs, qs] = row_lse.transpose(1, 2)
            else:
                if lse is not None:
                    lse[bs, qs] = scores.logsumexp(dim=-1).transpose(1, 2)
                probs = torch.softmax(scores, dim=-1)
            del scores
            out[bs, qs] = torch.matmul(probs, v[bs].transpose(1, 2).to(compute)).transpose(1, 2)
    return out, lse


def _masked(scores: torch.Tensor, k_lengths: torch.Tensor | None, batches: slice) -> torch.Tensor:
    """Logits (b, heads, rows, Lk) of the batch elements ``batches`` with the keys at or past their ``k_lengths``
    set to -inf (in place): no weight, no part in the row max, exactly zero gradients."""
    if k_lengths is None:
        return scores
    keep = key_prefix_mask(k_lengths[batches], scores.shape[-1])
    return scores.masked_fill_(~keep[:, None, None, :], float("-inf"))


def row_max(q: torch.Tensor, k: torch.Tensor, params: TARParams, *,
            memory_budget: int | None = None) -> torch.Tensor:
    """max_j scale * <q_i, k_j>: (batch, Lq, heads) float32 (float64 for float64 inputs), float32 logits a chunk
    of the batch and query rows at a time within the memory budget, at most ROW_MAX_BUDGET_MB
    (:func:`vstar_kernels.ops.tar_row_max`: a pass beside a fused kernel should not dwarf its memory). Built from
    differentiable ops, so it passes gradients like ``amax``."""
    batch, len_q, heads, _ = q.shape
    compute = _compute_dtype(q.dtype)
    if q.numel() == 0:
        return q.new_zeros((batch, len_q, heads), dtype=compute)
    budget = min(memory_budget or memory_budget_bytes(), ROW_MAX_BUDGET_MB << 20)
    b_chunk, q_chunk = chunk_plan(batch, len_q, heads, k.shape[1], compute, budget, copies=1)
    masked = params.shaped and params.profile.masks  # the max over the keys the profile keeps
    rows = []
    for qs in query_chunks(len_q, q_chunk):
        keep = bias_rows(params, range(qs.start, qs.stop), k.shape[1], device=q.device).keep if masked else None
        parts = []
        for b0 in range(0, batch, b_chunk):
            bs = slice(b0, b0 + b_chunk)
            # the query chunk scaled first, as the kernels do: the logits are the chunk's one large tensor
            scaled = q[bs, qs].transpose(1, 2).to(compute) * params.scale
            scores = torch.matmul(scaled, k[bs].transpose(1, 2).to(compute).mT)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            parts.append(scores.amax(dim=-1).transpose(1, 2))  # (b, rows, heads)
            del scores
        rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    params: TARParams,
    *,
    memory_budget: int | None = None,
    k_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of TAR attention for the output gradient ``grad_out``, each shaped and typed like its input
    (``k_lengths``: the masked keys' gradients are zero).

    Memory-bounded like the forward: per chunk of the query frames (its band built once) and of the batch it
    recomputes S, S' and P = softmax(S') in float32 (float64 for float64 inputs) and applies
    dS' = P ∘ (dP − rowsum(P ∘ dP)) with dP = dO·Vᵀ, the bias gradient
    (:func:`~vstar_kernels.reference.tar_bias_backward`: the row max's share goes to the tied argmax keys),
    dQ = scale·dS·K, dK += scale·dSᵀ·Q and dV += Pᵀ·dO. Nothing of size Lq×Lk outlives a chunk, and the forward
    saves only its inputs; when the query frames take several chunks, dK and dV sum over them in float32 (float64)
    accumulators shaped like k and v.
    """
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    compute = _compute_dtype(q.dtype)
    b_chunk, q_chunk = chunk_plan(batch, len_q, heads, len_k, compute, memory_budget or memory_budget_bytes(),
                                  copies=_LIVE_SCORE_COPIES_BACKWARD)
    dq = torch.empty((batch, len_q, heads, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, len_k, heads, dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, len_k, heads, v.shape[3]), dtype=v.dtype, device=v.device)
    chunks = query_chunks(len_q, q_chunk)
    # (b, heads, Lk, dim) sums over the query chunks; with one chunk each batch chunk writes dK and dV directly
    dk_acc = dv_acc = None
    if len(chunks) > 1:
        dk_acc = torch.zeros((batch, heads, len_k, dim), dtype=compute, device=q.device)
        dv_acc = torch.zeros((batch, heads, len_k, v.shape[3]), dtype=compute, device=q.device)
    masked = params.shaped and params.profile.masks
    for qs in chunks:  # the bias of a query chunk is the same for every sequence: built once
        rows = bias_rows(params, range(qs.start, qs.stop), len_k, dtype=compute, device=q.device)
        for b0 in range(0, batch, b_chunk):
            bs = slice(b0, b0 + b_chunk)
            kh = k[bs].transpose(1, 2).to(compute)  # (b, heads, Lk, dim)
            vh = v[bs].transpose(1, 2).to(compute)
            qh = q[bs, qs].transpose(1, 2).to(compute)
            doh = grad_out[bs, qs].transpose(1, 2).to(compute)
            scores = _masked(torch.matmul(qh, kh.transpose(-1, -2)).mul_(params.scale), k_lengths, bs)
            biased = apply_profile_bias(scores, rows, strength=params.strength, mode=params.mode)
            probs = softmax_with_lse(biased, True)[0] if masked else torch.softmax(biased, -1)
            del biased
            dprobs = torch.matmul(doh, vh.transpose(-1, -2))
            grad_biased = probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))
            del dprobs
            grad_scores = profile_bias_backward(grad_biased, scores, rows, strength=params.strength,
                                                mode=params.mode).mul_(params.scale)
            del grad_biased, scores
            dq[bs, qs] = torch.matmul(grad_scores, kh).transpose(1, 2)
            dk_part = torch.matmul(grad_scores.transpose(-1, -2), qh)
            dv_part = torch.matmul(probs.transpose(-1, -2), doh)
            if dk_acc is None:
                dk[bs], dv[bs] = dk_part.transpose(1, 2), dv_part.transpose(1, 2)
            else:
                dk_acc[bs] += dk_part
                dv_acc[bs] += dv_part
    if dk_acc is not None:
        dk.copy_(dk_acc.transpose(1, 2))
        dv.copy_(dv_acc.transpose(1, 2))
    return dq, dk, dv
