"""The PyTorch reference of TAR temporal attention: materialised, readable, float64-capable.

This is the definition every backend is tested against (see :mod:`vstar_kernels.contract` for the formula).
It materialises the (batch, heads, Lq, Lk) score tensor, so use it for tests and small inputs only; the
memory-bounded fallback (:mod:`vstar_kernels.backends.torch_tar`) reuses :func:`band_rows`,
:func:`apply_tar_bias` and its gradient :func:`tar_bias_backward` chunk by chunk. The reference is differentiable by
autograd (the definition of the gradients too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .contract import BIAS_COEFF_MAX, TARParams, make_params, validate_layout, validate_profile, validate_tensors

if TYPE_CHECKING:
    from .profiles import FrameProfile


def gaussian_delta(
    lq: int,
    lk: int | None = None,
    *,
    sigma: float,
    q_offset: int = 0,
    k_offset: int = 0,
    tokens_per_frame: int = 1,
    video_start: int = 0,
    video_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The TAR band ΔA: an (lq, lk) matrix ``exp(-(gi - gj)^2 / (2 sigma^2))`` between tokens that have a frame, 0
    where the query or the key token has none.

    ``gi`` and ``gj`` are global frame indices (:class:`~vstar_kernels.contract.TokenFrames`: by default token i is
    frame ``q_offset + i``), so the diagonal of the default square matrix is 1. Computed in float64 and cast to
    ``dtype``; any sigma > 0 is exact (a tiny sigma gives the identity band).
    """
    params = make_params(1, sigma=sigma, q_offset=q_offset, k_offset=k_offset, tokens_per_frame=tokens_per_frame,
                         video_start=video_start, video_tokens=video_tokens)
    lk = lq if lk is None else lk
    if lq < 0 or lk < 0:
        raise ValueError(f"lq and lk must be >= 0, got {lq} and {lk}")
    return band_rows(params, range(lq), lk, dtype=dtype, device=device)


def band_rows(params: TARParams, rows: range, lk: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Rows ``rows`` (a range of query tokens) of the band ΔA of ``params`` against ``lk`` keys: what
    :func:`gaussian_delta` returns, a block of query rows at a time (the torch backend's chunks)."""
    layout = params.layout
    lq = rows.stop
    q_tokens, k_tokens = params.q_token_offset, params.k_token_offset  # the tokens' indices in the whole sequence
    q_frames = layout.frames(lq, device=device, token_offset=q_tokens)[rows.start:].to(torch.float64)
    k_frames = layout.frames(lk, device=device, token_offset=k_tokens).to(torch.float64)
    # global frames on both sides: the frame offsets enter as given (params.offset_delta is the kernels' folded one)
    dist = (q_frames[:, None] - k_frames[None, :]) + float(params.q_offset - params.k_offset)  # exact integers
    # (dist / sigma)^2 rather than dist^2 / sigma^2: no 0/0 when sigma^2 underflows; the diagonal stays exactly 1
    band = torch.exp(-0.5 * (dist / params.sigma) ** 2)
    if not layout.is_temporal:  # tokens without a frame (text) get no bias in their rows and columns
        framed = (layout.framed_mask(lq, device=device, token_offset=q_tokens)[rows.start:, None]
                  & layout.framed_mask(lk, device=device, token_offset=k_tokens))
        band = band * framed
    return band.to(dtype)


@dataclass(frozen=True)
class BiasRows:
    """The bias of a block of query rows against every key, materialised: what the op contract adds to a block of
    logits (:func:`apply_profile_bias`). TAR alone has only ``gauss``; a frame-distance profile
    (:class:`~vstar_kernels.profiles.FrameProfile`) adds the rest, each (profile heads, rows, Lk) (profile heads: 1
    or the call's heads), in the compute dtype.

    Attributes:
        gauss: (rows, Lk) the band ΔA, 0 where the query or the key has no frame.
        bias: the profile's bias(d), finite: 0 where a token has no frame and where the pair is masked; or None.
        slope: the profile's positive scale(d), 1 where a token has no frame; or None.
        keep: bool, False where the profile masks the pair (a ``-inf`` bias, or outside the window and not a sink);
            None when nothing is masked.
    """

    gauss: torch.Tensor
    bias: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def bias_rows(params: TARParams, rows: range, lk: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> BiasRows:
    """The :class:`BiasRows` of query rows ``rows`` against ``lk`` keys: the band of :func:`band_rows` and, for a
    call with a frame-distance profile, its tables at ``min(d, D)`` and its masks (the definition of the profile
    terms of the op contract)."""
    gauss = band_rows(params, rows, lk, dtype=dtype, device=device)
    profile = params.profile
    if profile is None:
        return BiasRows(gauss)
    layout = params.layout
    q_frames = layout.frames(rows.stop, device=device, token_offset=params.q_token_offset)[rows.start:]
    k_frames = layout.frames(lk, device=device, token_offset=params.k_token_offset) + params.k_offset
    dist = (q_frames[:, None] + params.q_offset - k_frames[None, :]).abs()  # (rows, Lk) int64, exact
    framed = (layout.framed_mask(rows.stop, device=device, token_offset=params.q_token_offset)[rows.start:, None]
              & layout.framed_mask(lk, device=device, token_offset=params.k_token_offset)[None, :])
    bias = slope = keep = None
    if profile.radius is not None:
        keep = ~framed | (dist <= profile.radius) | (k_frames < profile.sink_frames)[None, :]
        keep = keep[None]
    if profile.bias is not None:
        table = profile.bias.to(device=device, dtype=torch.float64)
        full = table[:, dist.clamp(max=table.shape[1] - 1)]  # (heads, rows, Lk)
        finite = torch.isfinite(full) | ~framed
        bias = torch.where(framed & finite, full, 0.0).to(dtype)
        if profile.table_masks:
            keep = finite if keep is None else keep & finite
    if profile.positive_scale is not None:
        table = profile.positive_scale.to(device=device, dtype=torch.float64)
        slope = torch.where(framed, table[:, dist.clamp(max=table.shape[1] - 1)], 1.0).to(dtype)
    return BiasRows(gauss, bias, slope, keep)


def bias_coefficient(scores: torch.Tensor, *, strength: float, mode: str,
                     row_max: torch.Tensor | None = None) -> torch.Tensor:
    """c_i, the multiplier of ΔA in each row of logits ``scores`` (..., Lq, Lk), shaped (..., Lq, 1) (a 0-d tensor
    in absolute mode, which reads only the dtype and device of ``scores``), in the dtype of ``scores``:
    ``sat(strength * rowmax(S))`` (relative; the row max of the logits as given, i.e. after any mask, or
    ``row_max`` (..., Lq, 1) when given: a chunk's rows biased by the max over every chunk) or ``sat(strength)``
    (absolute), sat clamping to ±BIAS_COEFF_MAX (:mod:`vstar_kernels.contract`, "Extreme values": finite where
    ``strength * rowmax`` leaves the float32 range)."""
    if mode == "relative":
        peak = scores.amax(dim=-1, keepdim=True) if row_max is None else row_max.to(scores.dtype)
        coeff = strength * peak
    else:
        coeff = torch.tensor(strength, dtype=scores.dtype, device=scores.device)
    bound = min(BIAS_COEFF_MAX, torch.finfo(coeff.dtype).max)  # float16 (the input-precision baseline) ends sooner
    return coeff.clamp(-bound, bound)


def apply_tar_bias(scores: torch.Tensor, delta: torch.Tensor, *, strength: float, mode: str,
                   row_max: torch.Tensor | None = None) -> torch.Tensor:
    """Add the TAR bias to logits ``scores`` (..., Lq, Lk); ``delta`` broadcasts to them.

    ``S + c * ΔA`` with the row coefficient c of :func:`bias_coefficient`: ``sat(strength * rowmax(S))``
    (relative; ``row_max`` (..., Lq, 1) replaces rowmax(S) when given) or ``sat(strength)`` (absolute). Returns a
    new tensor.
    """
    return apply_profile_bias(scores, BiasRows(delta), strength=strength, mode=mode, row_max=row_max)


def apply_profile_bias(scores: torch.Tensor, rows: BiasRows, *, strength: float, mode: str,
                       row_max: torch.Tensor | None = None) -> torch.Tensor:
    """The op contract's biased logits S' of logits ``scores`` (..., heads, rows, Lk) for the bias ``rows``
    (:func:`bias_rows`): ``(S > 0 ? scale(d) * S : S) + bias(d) + c_i * G``, -inf where the profile masks the pair.
    c_i is :func:`bias_coefficient`'s, its relative row max taken over the kept keys (or ``row_max`` (..., rows, 1)
    when given). Returns a new tensor. (The one Python statement of the formula.)"""
    kept = scores if rows.keep is None else scores.masked_fill(~rows.keep, float("-inf"))
    peak = kept.amax(dim=-1, keepdim=True) if mode == "relative" and row_max is None else row_max
    out = scores
    if rows.slope is not None:
        out = torch.where(scores > 0, scores * rows.slope, scores)
    if rows.bias is not None:
        out = out + rows.bias
    if rows.keep is None or strength != 0.0:  # (a masked row's -inf max times strength 0 would be NaN)
        out = out + bias_coefficient(scores, strength=strength, mode=mode, row_max=peak) * rows.gauss
    return out if rows.keep is None else out.masked_fill(~rows.keep, float("-inf"))


def softmax_with_lse(logits: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, logsumexp) over the last axis of biased logits; with ``masked`` (a profile that masks pairs) a row
    whose every key is masked (possible in a chunk of keys, or with offset frames) gets zero weights and lse -inf,
    and passes no gradient, instead of NaN."""
    if not masked:
        return logits.softmax(dim=-1), logits.logsumexp(dim=-1)
    dead = torch.isneginf(logits.amax(dim=-1, keepdim=True))
    safe = logits.masked_fill(dead, 0.0)
    return safe.softmax(dim=-1).masked_fill(dead, 0.0), safe.logsumexp(dim=-1).masked_fill(dead[..., 0],
                                                                                            float("-inf"))


def tar_bias_backward(grad_biased: torch.Tensor, scores: torch.Tensor, delta: torch.Tensor, *, strength: float,
                      mode: str) -> torch.Tensor:
    """The gradient through :func:`apply_tar_bias`: dL/dS from ``grad_biased`` = dL/dS' and the unbiased logits S.

    absolute: dS = dS'. relative: S'_ij = S_ij + sat(strength · m_i) · ΔA_ij with m_i = max_j S_ij, so
    dS_ij = dS'_ij + strength · [S_ij = m_i] / |{j: S_ij = m_i}| · Σ_j' dS'_ij' ΔA_ij': the row max passes its
    gradient to the argmax, split evenly among tied keys as ``torch.amax`` does (identical frames make ties real),
    except in a row whose coefficient saturates (|strength · m_i| > BIAS_COEFF_MAX), where sat' = 0 passes none.
    """
    return profile_bias_backward(grad_biased, scores, BiasRows(delta), strength=strength, mode=mode)


def profile_bias_backward(grad_biased: torch.Tensor, scores: torch.Tensor, rows: BiasRows, *, strength: float,
                          mode: str) -> torch.Tensor:
    """The gradient through :func:`apply_profile_bias`: dL/dS from ``grad_biased`` = dL/dS' and the unbiased
    logits S. A masked pair passes none; a positive logit passes it times scale(d); the relative row max (over the
    kept keys) passes ``strength · Σ_j' dS'_ij' G_ij'`` to its tied argmax keys as :func:`tar_bias_backward`
    describes."""
    grad = grad_biased if rows.keep is None else grad_biased.masked_fill(~rows.keep, 0.0)
    grad_scores = grad if rows.slope is None else torch.where(scores > 0, grad * rows.slope, grad)
    if mode != "relative" or strength == 0.0:
        return grad_scores
    kept = scores if rows.keep is None else scores.masked_fill(~rows.keep, float("-inf"))
    row_max = kept.amax(dim=-1, keepdim=True)
    ties = kept == row_max if rows.keep is None else (kept == row_max) & rows.keep
    ties = ties.to(grad.dtype)
    coupling = (grad * rows.gauss).sum(dim=-1, keepdim=True)
    unsaturated = ((strength * row_max).abs() <= BIAS_COEFF_MAX).to(grad.dtype)
    return grad_scores + (strength * unsaturated * coupling / ties.sum(dim=-1, keepdim=True).clamp_min(1)) * ties


def tar_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sigma: float | None = None,
    strength: float | None = None,
    mode: str | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    tokens_per_frame: int = 1,
    video_start: int = 0,
    video_tokens: int | None = None,
    attn_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    q_token_offset: int | None = None,
    k_token_offset: int | None = None,
    row_max: torch.Tensor | None = None,
    profile: FrameProfile | None = None,
) -> torch.Tensor:
    """The TAR attention probabilities softmax(S'), materialised: (batch, heads, Lq, Lk) from (batch, frames, heads,
    head_dim) q and k, in ``compute_dtype`` (default: q's dtype). The attention maps of the paper's analysis.

    ``attn_mask`` (broadcastable to (batch, heads, Lq, Lk); boolean True = attend, or additive float) is applied
    before the bias, so the relative row max runs over attended keys only. ``q_token_offset``, ``k_token_offset``,
    ``row_max`` ((batch, Lq, heads)) and ``profile`` are those of :func:`~vstar_kernels.ops.tar_attention` (a
    chunk of a longer sequence; a frame-distance profile). A row whose every key is masked gets zero weights.
    """
    logits, params = _biased_logits(q, k, sigma=sigma, strength=strength, mode=mode, scale=scale,
                                    q_offset=q_offset, k_offset=k_offset, tokens_per_frame=tokens_per_frame,
                                    video_start=video_start, video_tokens=video_tokens, attn_mask=attn_mask,
                                    compute_dtype=compute_dtype, q_token_offset=q_token_offset,
                                    k_token_offset=k_token_offset, row_max=row_max, profile=profile)
    return softmax_with_lse(logits, params.shaped)[0]


def _biased_logits(q, k, *, sigma, strength, mode, scale, q_offset, k_offset, tokens_per_frame, video_start,
                   video_tokens, attn_mask, compute_dtype, q_token_offset, k_token_offset, row_max,
                   profile) -> tuple[torch.Tensor, TARParams]:
    """S' of :func:`tar_attention_probs`, (batch, heads, Lq, Lk) in ``compute_dtype``, and the call's params."""
    p = make_params(q.shape[-1], sigma=sigma, strength=strength, mode=mode, scale=scale, q_offset=q_offset,
                    k_offset=k_offset, tokens_per_frame=tokens_per_frame, video_start=video_start,
                    video_tokens=video_tokens, q_token_offset=q_token_offset, k_token_offset=k_token_offset,
                    profile=profile)
    validate_layout(p, q.shape[1], k.shape[1])
    validate_profile(p, q)
    compute_dtype = compute_dtype or q.dtype
    qh, kh = (t.transpose(1, 2).to(compute_dtype) for t in (q, k))  # (batch, heads, frames, dim)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * p.scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute_dtype)
    rows = bias_rows(p, range(q.shape[1]), k.shape[1], dtype=compute_dtype, device=q.device)
    peak = None if row_max is None else row_max.transpose(1, 2)[..., None]  # (batch, heads, Lq, 1)
    return apply_profile_bias(scores, rows, strength=p.strength, mode=p.mode, row_max=peak), p


def tar_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sigma: float | None = None,
    strength: float | None = None,
    mode: str | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    tokens_per_frame: int = 1,
    video_start: int = 0,
    video_tokens: int | None = None,
    attn_mask: torch.Tensor | None = None,
    upcast: bool = True,
    q_token_offset: int | None = None,
    k_token_offset: int | None = None,
    row_max: torch.Tensor | None = None,
    profile: FrameProfile | None = None,
    return_lse: bool = False,
    k_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TAR attention, materialised. Inputs and output are (batch, tokens, heads, head_dim); the token layout
    arguments, ``row_max``, ``return_lse``, ``k_lengths`` and ``profile`` are those of
    :func:`~vstar_kernels.ops.tar_attention`
    (with ``return_lse=True``: ``(out, lse)``, lse (batch, Lq, heads) in the compute dtype; ``k_lengths`` is the
    boolean key mask ``j < k_lengths[b]``, joined to ``attn_mask``).

    Args:
        upcast: compute in float32 when the inputs are float16/bfloat16 (float64 inputs compute in float64).
            ``upcast=False`` computes in the input precision, the baseline of the tests' precision criterion.
        attn_mask: optional mask broadcastable to (batch, heads, Lq, Lk): boolean (True = attend) or additive
            float. It is applied before the bias, so the relative row max runs over attended keys only.

    Returns a contiguous tensor in the input dtype.
    """
    validate_tensors(q, k, v)
    compute_dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    if k_lengths is not None:
        keep = key_prefix_mask(k_lengths, k.shape[1])[:, None, None, :]  # (batch, 1, 1, Lk)
        if attn_mask is None:
            attn_mask = keep
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
    logits, params = _biased_logits(q, k, sigma=sigma, strength=strength, mode=mode, scale=scale,
                                    q_offset=q_offset, k_offset=k_offset, tokens_per_frame=tokens_per_frame,
                                    video_start=video_start, video_tokens=video_tokens, attn_mask=attn_mask,
                                    compute_dtype=compute_dtype, q_token_offset=q_token_offset,
                                    k_token_offset=k_token_offset, row_max=row_max, profile=profile)
    probs, lse = softmax_with_lse(logits, params.shaped)
    out = torch.matmul(probs, v.transpose(1, 2).to(compute_dtype))
    out = out.transpose(1, 2).contiguous().to(q.dtype)
    if return_lse:
        return out, lse.transpose(1, 2)
    return out


def key_prefix_mask(k_lengths: torch.Tensor, len_k: int) -> torch.Tensor:
    """(batch, Lk) bool: key j of batch element b attends when ``j < k_lengths[b]`` (varlen keys)."""
    return torch.arange(len_k, device=k_lengths.device) < k_lengths.to(torch.int64)[:, None]


def row_max_reference(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """max_j S_ij of the unbiased logits, (batch, Lq, heads), in float32 (float64 for float64 inputs): what
    :func:`~vstar_kernels.ops.tar_row_max` computes, materialised."""
    validate_tensors(q, k, k)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = make_params(q.shape[-1], sigma=1.0, scale=scale).scale
    scores = torch.matmul(q.transpose(1, 2).to(compute), k.transpose(1, 2).to(compute).transpose(-1, -2)) * scale
    return scores.amax(dim=-1).transpose(1, 2)
