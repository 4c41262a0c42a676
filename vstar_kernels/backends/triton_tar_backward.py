"""Fused flash-style TAR backward in Triton: dQ over query blocks, dK and dV over key blocks, no atomics.

The forward of a training call (:func:`~.triton_tar.training_forward`) is the ordinary forward kernel (its own tiles)
that also saves, per query row, the unbiased row max m and the log-sum-exp of S' (log2 units) beside its output O.
P = exp2(S' − lse) is then reproduced from m and lse. The row max's tied keys are found with == on logits, so they
must come from bit-identical score tiles: the three backward kernels share one tile shape and
:func:`~vstar_kernels.backends.triton_common.scores_tile`, and the prep kernel takes its own row max (m_b) and tie count
from those tiles; the forward's tiles may differ (different MMA shapes may round differently in the last bit).

1. ``_tar_bwd_prep`` (grid: batch·heads x query blocks): D = rowsum(dO ∘ O), and in relative mode one sweep over K
   for the row max's gradient share strength · rowsum(dS' ∘ G) / #ties and for m_b (absolute mode reads no K). Five
   fp32 numbers per row (m, lse, D, share, m_b): O(batch·heads·Lq), never O(Lq·Lk).
2. ``_tar_bwd_dq`` (same grid): dS = P ∘ (dP − D) (+ the share at the keys with S = m_b), dQ = scale · dS·K.
3. ``_tar_bwd_dkdv`` (grid: batch·heads x key blocks): dV = Σ Pᵀ·dO and dK = Σ dSᵀ·(scale·Q) over query blocks.

Logits are in the exp2 domain like the forward (t = S·log2 e); the gradients are in natural units.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..contract import TARParams
from .triton_common import (
    MIN_BLOCK_D,
    NOT_SPECIALIZED,
    BlockConfig,
    channel_mask,
    check_launch_limits,
    frame_window,
    grid_slices,
    int32_slices,
    kept_row_max,
    key_lengths_arg,
    key_window,
    next_pow2,
    profile_args,
    profile_flags,
    profile_terms,
    relative_bias_slope,
    runs_framed,
    runs_relative,
    scores_tile,
    sequence_keys,
    slice_offset,
    slice_program,
    strided,
    tar_bias_tile,
    tl,
    token_frames,
    triton,
    vector_width,
    window_tile,
)

_STATS = 5  # forward's row max, log-sum-exp, D, tie share, the backward tiles' row max (ties)


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the three backward kernels (one shape for all, so their score tiles are identical)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int = 1


def backward_block_config(len_k: int, head_dim: int, dtype: torch.dtype = torch.float16,
                          profile: bool = False) -> BackwardConfig:
    """Square tiles of 16 or 32 (16 for head_dim > 128), warps chosen so no kernel spills on sm_80 or sm_90
    (``python -m vstar_kernels.checks.static_check`` compiles every fp16/bf16 config this returns). fp32 gets 16-wide
    tiles, for the interpreter: on a GPU, :func:`vstar_kernels.backends.triton_tar.backward` sends fp32 to the
    chunked torch backward, because IEEE fp32 dots keep both operand tiles in registers and spill here.

    ``profile`` (a call with a frame-distance profile, ``params.profile`` set: its tables, window and kept-key
    masks): 16 x 16 tiles with 4 warps, 8 from head_dim 65 (the plain tiles' 2 and 4 warps spilled 8-12 B at head_dim
    128 and 256; ``static_check --profiles``). At head_dim 129-256 they still spill (8 or 16 warps), so
    ``triton_tar.backward`` runs the torch backward for those calls on a GPU."""
    block_d = max(MIN_BLOCK_D, next_pow2(head_dim))
    if dtype == torch.float32:
        return BackwardConfig(16, 16, block_d, num_warps=4)
    if profile:
        return BackwardConfig(16, 16, block_d, num_warps=4 if block_d <= 64 else 8)
    block = max(16, min(32 if block_d <= 128 else 16, next_pow2(len_k)))
    num_warps = (2 if block_d <= 128 else 4) if block == 16 else (4 if block_d <= 64 else 8)
    return BackwardConfig(block, block, block_d, num_warps=num_warps)


def training_block_config(cfg: BlockConfig, framed: bool = False) -> BlockConfig:
    """The forward's config for a call that saves the row statistics: ``cfg`` with half the query rows (at least
    16) for tiles of 4096+ fp32 elements, where keeping the row max and lse live to the end spilled a few bytes on
    sm_80/sm_90; at least 4 warps (2 spilled on sm_90: ptxas kept 80 registers), and 8 for two-pass head_dim-128
    tiles (4 spilled at 128 registers). ``framed`` (a token layout): half the rows from 2048-element tiles, where the
    framed training forward spilled 4 B. Every config this returns is compiled by the static check."""
    halve = cfg.block_m > 16 and cfg.block_m * max(cfg.block_n, cfg.block_d) >= (2048 if framed else 4096)
    block_m = cfg.block_m // 2 if halve else cfg.block_m
    num_warps = 8 if cfg.two_pass and cfg.block_d == 128 else max(cfg.num_warps, 4)
    return dataclasses.replace(cfg, block_m=block_m, num_warps=num_warps)


Residuals = tuple[torch.Tensor, ...]
# triton_tar.training_forward, handed over by triton_tar when it is imported (use_training_forward): the forward
# kernel's module imports this one, so this one cannot import it back
_training_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TARParams],
                            tuple[torch.Tensor, Residuals]] | None = None


def use_training_forward(forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TARParams],
                                           tuple[torch.Tensor, Residuals]]) -> None:
    """Set the forward that recomputes the residuals of a :func:`backward` called without them."""
    global _training_forward
    _training_forward = forward


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, params: TARParams,
             *, residuals: tuple[torch.Tensor, ...] = (), config: BackwardConfig | None = None,
             k_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous (batch, frames, heads, head_dim) in the input dtype; any input strides.

    ``residuals`` are what the training forward (:func:`~.triton_tar.forward_with_residuals`) saved, (out,
    stats); without them that forward (:func:`use_training_forward`) runs here first. ``k_lengths`` (varlen keys,
    as the forward had them): every kernel runs its key loops up to the sequence's count, and the dK/dV kernel
    writes zeros for the keys past it."""
    batch, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    cfg = config or backward_block_config(len_k, head_dim, q.dtype, profile=params.shaped)
    dq = torch.empty((batch, len_q, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, len_k, heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, len_k, heads, head_dim), dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if not residuals:
        if _training_forward is None:
            raise RuntimeError("the Triton backward has no residuals and no forward to recompute them: import "
                               "vstar_kernels.backends.triton_tar")
        residuals = _training_forward(q, k, v, params, k_lengths=k_lengths)[1]
    out, fwd_stats = residuals
    check_launch_limits(len_q, len_k, batch * heads, cfg.block_m, params)  # grid_q
    check_launch_limits(len_k, len_q, batch * heads, cfg.block_n, params)  # grid_k
    q, k, v, grad_out = int32_slices(q, k, v, grad_out)
    stats = torch.empty((_STATS, batch * heads, len_q), dtype=torch.float32, device=q.device)
    relative = runs_relative(params)
    common = dict(
        strides=(*q.stride(), *k.stride(), *v.stride(), *grad_out.stride()),
        scalars=(heads, len_q, len_k, head_dim, params.offset_delta, params.qk_log2_scale,
                 params.gauss_log2_coeff, params.bias_log2_scale, params.strength,
                 *params.kernel_layout_args(len_q, len_k), key_lengths_arg(k_lengths, q.device),
                 *profile_args(params, q.device)),
        meta=dict(RELATIVE=relative, FRAMED=runs_framed(params), VARLEN=k_lengths is not None,
                  **profile_flags(params),
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  ALIGN=vector_width(head_dim, q, k, v, grad_out, out, dq, dk, dv), num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages),
    )
    # one axis, slice-major (see triton_tar): the blocks of one (batch, head) slice are consecutive programs
    grid_q = (batch * heads * triton.cdiv(len_q, cfg.block_m),)
    grid_k = (batch * heads * triton.cdiv(len_k, cfg.block_n),)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _tar_bwd_prep[grid_q](q, k, v, grad_out, out, fwd_stats, stats, *common["strides"], *out.stride(),
                              *common["scalars"], **common["meta"])
        _tar_bwd_dq[grid_q](q, k, v, grad_out, stats, dq, *common["strides"], *dq.stride(), *common["scalars"],
                            params.scale, **common["meta"])
        _tar_bwd_dkdv[grid_k](q, k, v, grad_out, stats, dk, dv, *common["strides"], *dk.stride(), *dv.stride(),
                              *common["scalars"], params.scale, **common["meta"])
    return dq, dk, dv


if triton is not None:

    @triton.jit
    def _load_tile(base, stride_m, stride_d, offs_m, offs_d, mask, ALIGN: tl.constexpr):
        """A (rows, BLOCK_D) tile of one (batch, head) slice, zero outside ``mask``."""
        return tl.load(base + strided(offs_m, stride_m, ALIGN)[:, None] + offs_d[None, :] * stride_d, mask=mask,
                       other=0.0)

    @triton.jit
    def _load_stats(STATS, pid_bh, len_q, offs_m, mask_m, plane):
        """The prep kernel's per-row numbers: the forward's row max and log-sum-exp (for P), D, the tie share, and
        the row max of the backward's tiles (for finding the tied keys)."""
        rows = STATS + pid_bh * len_q + offs_m
        return (tl.load(rows, mask=mask_m, other=0.0), tl.load(rows + plane, mask=mask_m, other=0.0),
                tl.load(rows + 2 * plane, mask=mask_m, other=0.0), tl.load(rows + 3 * plane, mask=mask_m, other=0.0),
                tl.load(rows + 4 * plane, mask=mask_m, other=0.0))

    @triton.jit
    def _tile_probs(q, do, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, mask_d, cols, len_k,
                    row_pos, row_max, lse, delta_row, qk_log2_scale, gauss_log2_coeff, bias_log2_scale,
                    tokens_per_frame, video_start_k, video_end_k, bias_row, scale_row, table_len, radius, sink_limit,
                    RELATIVE: tl.constexpr, FRAMED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                    MASKS: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
        """For one (query, key) tile: the unbiased log2 logits s, G, P = exp2(S' − lse), dS' = P ∘ (dP − D) (zero
        where a profile masks the pair: P is), and the profile's kept mask and scale (placeholders without the
        flags: :func:`~.triton_common.profile_terms`)."""
        s = scores_tile(q, k_base, stride_kn, stride_kd, offs_d, mask_d, cols, len_k, qk_log2_scale, DOT_PRECISION,
                        ALIGN)
        col_pos = token_frames(cols, 0, tokens_per_frame, video_start_k, video_end_k, FRAMED)
        kept, bias, scale = profile_terms(row_pos, col_pos, bias_row, scale_row, table_len, radius, sink_limit, FRAMED,
                                          HAS_BIAS, HAS_SCALE, MASKS)
        biased, gauss = tar_bias_tile(s, row_pos, col_pos, row_max, gauss_log2_coeff, bias_log2_scale, kept, bias,
                                      scale, RELATIVE, FRAMED, HAS_BIAS, HAS_SCALE, MASKS)
        p = tl.exp2(biased - lse[:, None])
        vt = tl.load(v_base + offs_d[:, None] * stride_vd + strided(cols, stride_vn, ALIGN)[None, :],
                     mask=mask_d[:, None] & (cols < len_k)[None, :], other=0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta_row[:, None])
        return s, gauss, p, ds, kept, scale

    @triton.jit
    def _score_grad(ds, s, kept, scale, tile_max, share, RELATIVE: tl.constexpr, HAS_SCALE: tl.constexpr,
                    MASKS: tl.constexpr):
        """dS from dS' on one tile (:func:`~vstar_kernels.reference.profile_bias_backward`): times the profile's
        scale where S > 0 (HAS_SCALE), plus (relative) the row max's share at the tied argmax keys among the kept
        ones (``tile_max``: this tile shape's row max over the kept keys)."""
        if HAS_SCALE:
            ds = ds * tl.where(s > 0, scale, 1.0)
        if RELATIVE:
            ties = s == tile_max[:, None]
            if MASKS:
                ties = ties & kept
            ds = ds + tl.where(ties, share[:, None], 0.0)
        return ds

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _tar_bwd_prep(
        Q, K, V, DO, O, FWD_STATS, STATS,  # noqa: E741 - named like the math
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_gb, stride_gm, stride_gh, stride_gd,
        stride_ob, stride_om, stride_oh, stride_od,
        num_heads, len_q, len_k, head_dim,
        offset_delta, qk_log2_scale, gauss_log2_coeff, bias_log2_scale, strength,
        tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k,
        K_LENGTHS,  # (batch,) int64 when VARLEN (sequence_keys), else a placeholder
        BIAS_TABLE, SCALE_TABLE,  # a profile's tables (triton_common.profile_args), placeholders without it
        table_len, bias_head_stride, scale_head_stride, radius, sink_limit, profile_reach, window_sinks,
        RELATIVE: tl.constexpr, FRAMED: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, MASKS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    ):
        pid_bh, pid_m = slice_program(len_q, BLOCK_M)
        plane = grid_slices(len_q, BLOCK_M) * len_q  # elements per statistic
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        len_k = sequence_keys(K_LENGTHS, b, len_k, VARLEN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < len_q
        mask_d = channel_mask(offs_d, head_dim, ALIGN)
        tile_mask = mask_m[:, None] & mask_d[None, :]
        do = _load_tile(DO + slice_offset(b, h, stride_gb, stride_gh, ALIGN), stride_gm,
                        stride_gd, offs_m, offs_d, tile_mask, ALIGN)
        out = _load_tile(O + slice_offset(b, h, stride_ob, stride_oh, ALIGN), stride_om,
                         stride_od, offs_m, offs_d, tile_mask, ALIGN)
        delta_row = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        saved = FWD_STATS + pid_bh * len_q + offs_m
        row_max = tl.load(saved, mask=mask_m, other=0.0)
        lse = tl.load(saved + plane, mask=mask_m, other=0.0)
        if MASKS:  # a row with no kept key (lse -inf): P = exp2(-inf - 0) = 0, not NaN
            lse = tl.where(lse == float("-inf"), 0.0, lse)

        share = tl.zeros([BLOCK_M], dtype=tl.float32)
        tile_max = row_max  # absolute mode: unused
        if RELATIVE:  # the row max's gradient: strength * rowsum(dS' * G), split over the tied argmax keys
            q = _load_tile(Q + slice_offset(b, h, stride_qb, stride_qh, ALIGN),
                           stride_qm, stride_qd, offs_m, offs_d, tile_mask, ALIGN)
            k_base = K + slice_offset(b, h, stride_kb, stride_kh, ALIGN)
            v_base = V + slice_offset(b, h, stride_vb, stride_vh, ALIGN)
            row_pos = token_frames(offs_m, offset_delta, tokens_per_frame, video_start_q, video_end_q, FRAMED)
            bias_row = BIAS_TABLE + h * bias_head_stride
            scale_row = SCALE_TABLE + h * scale_head_stride
            head, gap1, mid, gap2, total = key_window(row_pos, mask_m, len_k, tokens_per_frame, video_start_k,
                                                       video_end_k, profile_reach, window_sinks, FRAMED, MASKS,
                                                       BLOCK_N)
            coupling = tl.zeros([BLOCK_M], dtype=tl.float32)
            # the row max as this tile shape computes it, and how many keys reach it (online)
            tile_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            ties = tl.zeros([BLOCK_M], dtype=tl.float32)
            for tile in range(0, total, BLOCK_N):
                start_n = tile
                if MASKS:  # the key tiles of the profile's window only
                    start_n = window_tile(tile, head, gap1, mid, gap2)
                s, gauss, _p, ds, kept, _scale = _tile_probs(
                    q, do, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, mask_d,
                    start_n + offs_n, len_k, row_pos, row_max, lse, delta_row, qk_log2_scale, gauss_log2_coeff,
                    bias_log2_scale, tokens_per_frame, video_start_k, video_end_k, bias_row, scale_row, table_len,
                    radius, sink_limit, RELATIVE, FRAMED, HAS_BIAS, HAS_SCALE, MASKS, DOT_PRECISION, ALIGN)
                coupling += tl.sum(ds * gauss, 1)
                block_max = kept_row_max(s, kept, MASKS)  # over the kept keys
                at_max = s == block_max[:, None]
                if MASKS:
                    at_max = at_max & kept
                block_ties = tl.sum(at_max.to(tl.float32), 1)
                new_max = tl.maximum(tile_max, block_max)
                ties = (tl.where(tile_max == new_max, ties, 0.0)
                        + tl.where(block_max == new_max, block_ties, 0.0))
                tile_max = new_max
            share = relative_bias_slope(row_max, strength) * coupling / tl.maximum(ties, 1.0)
        rows = STATS + pid_bh * len_q + offs_m
        tl.store(rows, row_max, mask=mask_m)
        tl.store(rows + plane, lse, mask=mask_m)
        tl.store(rows + 2 * plane, delta_row, mask=mask_m)
        tl.store(rows + 3 * plane, share, mask=mask_m)
        tl.store(rows + 4 * plane, tile_max, mask=mask_m)

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _tar_bwd_dq(
        Q, K, V, DO, STATS, DQ,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_gb, stride_gm, stride_gh, stride_gd,
        stride_dqb, stride_dqm, stride_dqh, stride_dqd,
        num_heads, len_q, len_k, head_dim,
        offset_delta, qk_log2_scale, gauss_log2_coeff, bias_log2_scale, strength,
        tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k,
        K_LENGTHS,  # (batch,) int64 when VARLEN (sequence_keys), else a placeholder
        BIAS_TABLE, SCALE_TABLE,  # a profile's tables (triton_common.profile_args), placeholders without it
        table_len, bias_head_stride, scale_head_stride, radius, sink_limit, profile_reach, window_sinks,
        scale,
        RELATIVE: tl.constexpr, FRAMED: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, MASKS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    ):
        pid_bh, pid_m = slice_program(len_q, BLOCK_M)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        len_k = sequence_keys(K_LENGTHS, b, len_k, VARLEN)
        k_base = K + slice_offset(b, h, stride_kb, stride_kh, ALIGN)
        v_base = V + slice_offset(b, h, stride_vb, stride_vh, ALIGN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < len_q
        mask_d = channel_mask(offs_d, head_dim, ALIGN)
        tile_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_tile(Q + slice_offset(b, h, stride_qb, stride_qh, ALIGN), stride_qm,
                       stride_qd, offs_m, offs_d, tile_mask, ALIGN)
        do = _load_tile(DO + slice_offset(b, h, stride_gb, stride_gh, ALIGN), stride_gm,
                        stride_gd, offs_m, offs_d, tile_mask, ALIGN)
        row_pos = token_frames(offs_m, offset_delta, tokens_per_frame, video_start_q, video_end_q, FRAMED)
        row_max, lse, delta_row, share, tile_max = _load_stats(STATS, pid_bh, len_q, offs_m, mask_m,
                                                               grid_slices(len_q, BLOCK_M) * len_q)
        bias_row = BIAS_TABLE + h * bias_head_stride
        scale_row = SCALE_TABLE + h * scale_head_stride
        head, gap1, mid, gap2, total = key_window(row_pos, mask_m, len_k, tokens_per_frame, video_start_k,
                                                   video_end_k, profile_reach, window_sinks, FRAMED, MASKS, BLOCK_N)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for tile in range(0, total, BLOCK_N):
            start_n = tile
            if MASKS:  # the key tiles of the profile's window only
                start_n = window_tile(tile, head, gap1, mid, gap2)
            cols = start_n + offs_n
            s, _gauss, _p, ds, kept, scale_t = _tile_probs(
                q, do, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, mask_d, cols, len_k,
                row_pos, row_max, lse, delta_row, qk_log2_scale, gauss_log2_coeff, bias_log2_scale, tokens_per_frame,
                video_start_k, video_end_k, bias_row, scale_row, table_len, radius, sink_limit, RELATIVE, FRAMED,
                HAS_BIAS, HAS_SCALE, MASKS, DOT_PRECISION, ALIGN)
            ds = _score_grad(ds, s, kept, scale_t, tile_max, share, RELATIVE, HAS_SCALE, MASKS)
            kb = tl.load(k_base + strided(cols, stride_kn, ALIGN)[:, None] + offs_d[None, :] * stride_kd,
                         mask=(cols < len_k)[:, None] & mask_d[None, :], other=0.0)
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=DOT_PRECISION)
        tl.store(DQ + slice_offset(b, h, stride_dqb, stride_dqh, ALIGN)
                 + strided(offs_m, stride_dqm, ALIGN)[:, None] + offs_d[None, :] * stride_dqd,
                 (dq * scale).to(DQ.dtype.element_ty), mask=tile_mask)

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _tar_bwd_dkdv(
        Q, K, V, DO, STATS, DK, DV,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_gb, stride_gm, stride_gh, stride_gd,
        stride_dkb, stride_dkn, stride_dkh, stride_dkd,
        stride_dvb, stride_dvn, stride_dvh, stride_dvd,
        num_heads, len_q, len_k, head_dim,
        offset_delta, qk_log2_scale, gauss_log2_coeff, bias_log2_scale, strength,
        tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k,
        K_LENGTHS,  # (batch,) int64 when VARLEN (sequence_keys), else a placeholder
        BIAS_TABLE, SCALE_TABLE,  # a profile's tables (triton_common.profile_args), placeholders without it
        table_len, bias_head_stride, scale_head_stride, radius, sink_limit, profile_reach, window_sinks,
        scale,
        RELATIVE: tl.constexpr, FRAMED: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, MASKS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    ):
        pid_bh, pid_n = slice_program(len_k, BLOCK_N)
        plane = grid_slices(len_k, BLOCK_N) * len_q
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        q_base = Q + slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        k_base = K + slice_offset(b, h, stride_kb, stride_kh, ALIGN)
        v_base = V + slice_offset(b, h, stride_vb, stride_vh, ALIGN)
        do_base = DO + slice_offset(b, h, stride_gb, stride_gh, ALIGN)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = channel_mask(offs_d, head_dim, ALIGN)
        mask_n = cols < len_k  # every key's gradient is written: zeros past the sequence's own keys
        keys = sequence_keys(K_LENGTHS, b, len_k, VARLEN)
        bias_row = BIAS_TABLE + h * bias_head_stride
        scale_row = SCALE_TABLE + h * scale_head_stride
        # MASKS: the query blocks some kept pair of this key tile reaches (text keys and sinks: every block)
        head = 0
        gap1 = 0
        mid = 0
        gap2 = 0
        total = len_q
        if MASKS:
            col_pos = token_frames(cols, 0, tokens_per_frame, video_start_k, video_end_k, FRAMED)
            live = cols < keys
            framed_keys = live & (col_pos != -2147483648)  # NO_FRAME
            every_row = framed_keys & (col_pos < window_sinks)  # a sink the window keeps
            if FRAMED:
                every_row = every_row | (live & (col_pos == -2147483648))  # a text key
            full = tl.max(every_row.to(tl.int32), 0) > 0
            # the keys' frames in the queries' local frames: gi - gj = offset_delta + f_q - f_k
            head, gap1, mid, gap2, total = frame_window(col_pos.to(tl.int64) - offset_delta, framed_keys, full,
                                                        len_q, tokens_per_frame, video_start_q, video_end_q,
                                                        profile_reach, 0, BLOCK_M)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for tile in range(0, total, BLOCK_M):
            start_m = tile
            if MASKS:
                start_m = window_tile(tile, head, gap1, mid, gap2)
            offs_m = start_m + offs_m0
            mask_m = offs_m < len_q
            tile_mask = mask_m[:, None] & mask_d[None, :]
            q = _load_tile(q_base, stride_qm, stride_qd, offs_m, offs_d, tile_mask, ALIGN)
            do = _load_tile(do_base, stride_gm, stride_gd, offs_m, offs_d, tile_mask, ALIGN)
            row_max, lse, delta_row, share, tile_max = _load_stats(STATS, pid_bh, len_q, offs_m, mask_m, plane)
            row_pos = token_frames(offs_m, offset_delta, tokens_per_frame, video_start_q, video_end_q, FRAMED)
            s, _gauss, p, ds, kept, scale_t = _tile_probs(
                q, do, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, mask_d, cols, keys,
                row_pos, row_max, lse, delta_row, qk_log2_scale, gauss_log2_coeff, bias_log2_scale, tokens_per_frame,
                video_start_k, video_end_k, bias_row, scale_row, table_len, radius, sink_limit, RELATIVE, FRAMED,
                HAS_BIAS, HAS_SCALE, MASKS, DOT_PRECISION, ALIGN)
            ds = _score_grad(ds, s, kept, scale_t, tile_max, share, RELATIVE, HAS_SCALE, MASKS)
            p = tl.where(mask_m[:, None], p, 0.0)
            ds = tl.where(mask_m[:, None], ds, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        out_mask = mask_n[:, None] & mask_d[None, :]
        tl.store(DK + slice_offset(b, h, stride_dkb, stride_dkh, ALIGN)
                 + strided(cols, stride_dkn, ALIGN)[:, None] + offs_d[None, :] * stride_dkd,
                 (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + slice_offset(b, h, stride_dvb, stride_dvh, ALIGN)
                 + strided(cols, stride_dvn, ALIGN)[:, None] + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=out_mask)


__all__ = ["BackwardConfig", "backward", "backward_block_config", "training_block_config", "use_training_forward"]
