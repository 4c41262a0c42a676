"""The PyTorch reference of TAR temporal attention: materialised, readable, float64-capable.

This is the definition every backend is tested against (see :mod:`vstar_kernels.contract` for the formula).
It materialises the (batch, heads, Lq, Lk) score tensor, so use it for tests and small inputs only; the
memory-bounded fallback (:mod:`vstar_kernels.backends.torch_tar`) reuses :func:`gaussian_delta`,
:func:`apply_tar_bias` and its gradient :func:`tar_bias_backward` chunk by chunk. The reference is differentiable by
autograd (the definition of the gradients too).
"""

from __future__ import annotations

import torch

from .contract import make_params, validate_tensors


def gaussian_delta(
    lq: int,
    lk: int | None = None,
    *,
    sigma: float,
    q_offset: int = 0,
    k_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The TAR band ΔA: an (lq, lk) matrix ``exp(-(gi - gj)^2 / (2 sigma^2))``.

    ``gi = q_offset + i`` and ``gj = k_offset + j`` are global frame indices, so the diagonal of the
    default square matrix is 1. Computed in float64 and cast to ``dtype``; any sigma > 0 is exact (a tiny sigma
    gives the identity band).
    """
    params = make_params(1, sigma=sigma, q_offset=q_offset, k_offset=k_offset)
    lk = lq if lk is None else lk
    if lq < 0 or lk < 0:
        raise ValueError(f"lq and lk must be >= 0, got {lq} and {lk}")
    i = torch.arange(lq, dtype=torch.float64, device=device)
    j = torch.arange(lk, dtype=torch.float64, device=device)
    dist = (i[:, None] - j[None, :]) + float(params.offset_delta)  # offsets subtracted as integers: exact
    # (dist / sigma)^2 rather than dist^2 / sigma^2: no 0/0 when sigma^2 underflows; the diagonal stays exactly 1
    return torch.exp(-0.5 * (dist / params.sigma) ** 2).to(dtype)


def apply_tar_bias(scores: torch.Tensor, delta: torch.Tensor, *, strength: float, mode: str) -> torch.Tensor:
    """Add the TAR bias to logits ``scores`` (..., Lq, Lk); ``delta`` broadcasts to them.

    relative: ``S + strength * rowmax(S) * ΔA`` (the row max of the logits as given, i.e. after any mask);
    absolute: ``S + strength * ΔA``. Returns a new tensor.
    """
    if mode == "relative":
        row_max = scores.amax(dim=-1, keepdim=True)
        return scores + strength * row_max * delta
    return scores + strength * delta


def tar_bias_backward(grad_biased: torch.Tensor, scores: torch.Tensor, delta: torch.Tensor, *, strength: float,
                      mode: str) -> torch.Tensor:
    """The gradient through :func:`apply_tar_bias`: dL/dS from ``grad_biased`` = dL/dS' and the unbiased logits S.

    absolute: dS = dS'. relative: S'_ij = S_ij + strength · m_i · ΔA_ij with m_i = max_j S_ij, so
    dS_ij = dS'_ij + strength · [S_ij = m_i] / |{j: S_ij = m_i}| · Σ_j' dS'_ij' ΔA_ij': the row max passes its
    gradient to the argmax, split evenly among tied keys as ``torch.amax`` does (identical frames make ties real).
    """
    if mode != "relative" or strength == 0.0:
        return grad_biased
    ties = (scores == scores.amax(dim=-1, keepdim=True)).to(grad_biased.dtype)
    coupling = (grad_biased * delta).sum(dim=-1, keepdim=True)
    return grad_biased + (strength * coupling / ties.sum(dim=-1, keepdim=True)) * ties


def tar_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sigma: float,
    strength: float = 1.0,
    mode: str = "relative",
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    attn_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The TAR attention probabilities softmax(S'), materialised: (batch, heads, Lq, Lk) from (batch, frames, heads,
    head_dim) q and k, in ``compute_dtype`` (default: q's dtype). The attention maps of the paper's analysis.

    ``attn_mask`` (broadcastable to (batch, heads, Lq, Lk); boolean True = attend, or additive float) is applied
    before the bias, so the relative row max runs over attended keys only.
    """
    p = make_params(q.shape[-1], sigma=sigma, strength=strength, mode=mode, scale=scale,
                    q_offset=q_offset, k_offset=k_offset)
    compute_dtype = compute_dtype or q.dtype
    qh, kh = (t.transpose(1, 2).to(compute_dtype) for t in (q, k))  # (batch, heads, frames, dim)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * p.scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute_dtype)
    delta = gaussian_delta(q.shape[1], k.shape[1], sigma=p.sigma, q_offset=p.q_offset,
                           k_offset=p.k_offset, dtype=compute_dtype, device=q.device)
    scores = apply_tar_bias(scores, delta, strength=p.strength, mode=p.mode)
    return torch.softmax(scores, dim=-1)


def tar_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sigma: float,
    strength: float = 1.0,
    mode: str = "relative",
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    attn_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """TAR attention, materialised. Inputs and output are (batch, frames, heads, head_dim).

    Args:
        upcast: compute in float32 when the inputs are float16/bfloat16 (float64 inputs compute in float64).
            ``upcast=False`` computes in the input precision, the baseline of the tests' precision criterion.
        attn_mask: optional mask broadcastable to (batch, heads, Lq, Lk): boolean (True = attend) or additive
            float. It is applied before the bias, so the relative row max runs over attended keys only.

    Returns a contiguous tensor in the input dtype.
    """
    validate_tensors(q, k, v)
    compute_dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    probs = tar_attention_probs(q, k, sigma=sigma, strength=strength, mode=mode, scale=scale, q_offset=q_offset,
                                k_offset=k_offset, attn_mask=attn_mask, compute_dtype=compute_dtype)
    out = torch.matmul(probs, v.transpose(1, 2).to(compute_dtype))
    return out.transpose(1, 2).contiguous().to(q.dtype)
