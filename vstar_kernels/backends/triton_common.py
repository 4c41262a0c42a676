"""The Triton pieces the forward (:mod:`.triton_tar`) and the backward (:mod:`.triton_tar_backward`) share: the
kernels' integer limits and host-side helpers (launch limits, the band's reach, which variant a call runs) and the
JIT helpers both kernel families call, among them the one Triton statement of the TAR bias (:func:`tar_bias_tile`).

Imports nothing from either kernel module, so the import graph has no cycle: triton_common <- triton_tar_backward
<- triton_tar.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..contract import BIAS_COEFF_MAX, LOG2E, TARParams
from .profile_tables import NO_RADIUS, kernel_profile

try:  # triton is optional: a Linux dependency, absent on other platforms
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    IMPORT_ERROR = f"triton is not installed ({exc})"

MAX_HEAD_DIM = 256
# Frame distances offset_delta + i - j are int32 in the kernels (Triton and CUDA alike): |offset_delta| <= 2**30 and
# at most 2**30 tokens, so every distance lies in (-2**31, 2**31).
MAX_OFFSET_DELTA = 2**30
MAX_FRAMES = 2**30
MAX_PROGRAMS = 2**31 - 1  # grid axis 0
INT32_LIMIT = 2**31  # offsets inside one (batch, head) slice are int32
NO_FRAME = -(2**31)  # the int32 position of a token without a frame (positions lie in [-2**30, 2**31))
# exp2(-x) is exactly 0 in fp32 for x >= 150 (2^-150 rounds to zero); a tile whose smallest exponent reaches this
# bound (with margin for the fp32 rounding of d^2 * coeff) adds an exactly zero bias, so it is skipped
BAND_ZERO_EXPONENT = 152.0
# runtime integers that must not multiply the compiled variants (Triton specialises ints equal to 1 or divisible by 16):
# the token layout (TARParams.kernel_layout_args; the starts may be negative), the band's reach, and the strides of a
# given row max (a (batch, Lq, heads) tensor of any strides, read once per query row)
NOT_SPECIALIZED = ["offset_delta", "tokens_per_frame", "video_start_q", "video_start_k", "video_end_q", "video_end_k",
                   "band_reach", "stride_rb", "stride_rm", "stride_rh"]
# the integers of a frame-distance profile (profile_args), likewise never specialised: a table of one entry, a
# window of radius 16 or a sink limit of 1 must not compile kernels of their own
PROFILE_INTS = ["table_len", "bias_head_stride", "scale_head_stride", "radius", "sink_limit", "profile_reach",
                "window_sinks"]
NOT_SPECIALIZED += PROFILE_INTS
INT32_MAX = 2**31 - 1  # the kernels' "no window" radius and "no limit" reach: beyond every int32 frame distance
# frames: the largest int32 frame distance (see MAX_OFFSET_DELTA), so a reach this long means "the band reaches every
# key"; an int32 kernel argument like the other layout integers
MAX_BAND_REACH = 2**31 - 1
# head_dim is padded to a power of two of at least 32 (16-wide tiles spill on sm_80 for no gain)
MIN_BLOCK_D = 32
if tl is not None:
    # |c_i| of the exp2-domain kernels: BIAS_COEFF_MAX in log2 units (2^125 * log2(e) < 2^126, finite in fp32)
    BIAS_LOG2_MAX = tl.constexpr(BIAS_COEFF_MAX * LOG2E)
    PROFILE_LOG2E = tl.constexpr(LOG2E)  # a bias table entry (natural units) in the kernels' log2 units


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel specialisation."""

    block_m: int
    block_n: int
    block_d: int
    two_pass: bool
    num_warps: int
    num_stages: int = 1


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ------------------------------------------------------------------------------------------ kernel variants
def runs_framed(params: TARParams) -> bool:
    """Whether a call runs the framed kernels (FRAMED: a token layout, and a bias to apply: a band, or a
    frame-distance profile)."""
    return params.framed and (params.strength != 0.0 or params.shaped)


def profile_flags(params: TARParams) -> dict[str, bool]:
    """The constexpr flags of a call's frame-distance profile: HAS_BIAS (a bias table), HAS_SCALE (a positive-logit
    scale table), MASKS (a window or ``-inf`` bias entries: pairs are masked, and the key tiles, or query blocks,
    that no kept pair reaches are skipped). All False for plain TAR, whose kernels are then the code of before
    profiles existed."""
    profile = params.profile
    if profile is None:
        return {"HAS_BIAS": False, "HAS_SCALE": False, "MASKS": False}
    return {"HAS_BIAS": profile.bias is not None, "HAS_SCALE": profile.positive_scale is not None,
            "MASKS": profile.masks}


@functools.cache
def _no_table(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def profile_args(params: TARParams, device: torch.device) -> tuple[object, ...]:
    """The kernels' profile arguments ``(BIAS_TABLE, SCALE_TABLE, table_len, bias_head_stride, scale_head_stride,
    radius, sink_limit, profile_reach, window_sinks)`` from :func:`~.profile_tables.kernel_profile`: the float32
    tables (natural units; the kernels multiply the bias by log2 e), or one fp32 placeholder per device (never read
    without the flag); each table's elements between two heads' rows (table_len, or 0 for a table of one row: the
    two tables of a composed profile may differ, one per head and one for all, so each has its own); the
    radius (INT32_MAX: no window, beyond every int32 distance), the sink limit (a key of local frame below it is a
    sink), the reach (frames beyond which only sinks stay kept; INT32_MAX: no limit) and the sinks the tile window
    keeps (the sink limit when sinks stay kept beyond the reach, else 0), all int32."""
    if params.profile is None:
        none = _no_table(device)
        return none, none, 1, 0, 0, INT32_MAX, 0, INT32_MAX, 0
    kp = kernel_profile(params, device)
    none = _no_table(device)
    radius = INT32_MAX if kp.radius == NO_RADIUS else min(kp.radius, INT32_MAX)
    reach = INT32_MAX if kp.reach is None else min(kp.reach, INT32_MAX)
    sinks = max(kp.sink_limit, 0) if kp.sinks_reach else 0
    strides = [0 if t is None or t.shape[0] == 1 else kp.table_len for t in (kp.bias, kp.scale)]
    return (none if kp.bias is None else kp.bias, none if kp.scale is None else kp.scale, kp.table_len, *strides,
            radius, kp.sink_limit, reach, sinks)


def runs_relative(params: TARParams) -> bool:
    """Whether a call runs the relative-mode kernels (RELATIVE): strength 0 runs the absolute ones with a zero
    bias (s + 0 * G == s exactly, one fewer specialisation)."""
    return params.relative and params.strength != 0.0


def band_reach(params: TARParams) -> int:
    """Frames beyond which the band is exactly zero in fp32: every frame distance d > reach has
    d^2 * gauss_log2_coeff >= BAND_ZERO_EXPONENT, so exp2 underflows to 0 (one frame of margin over the bound).
    MAX_BAND_REACH (every key) when the coefficient is 0 (a sigma so large that it underflows: the constant band)
    or the reach passes every int32 distance."""
    coeff = params.gauss_log2_coeff
    if coeff * MAX_BAND_REACH * MAX_BAND_REACH <= BAND_ZERO_EXPONENT:  # also coeff == 0: no division
        return MAX_BAND_REACH
    return min(MAX_BAND_REACH, math.floor(math.sqrt(BAND_ZERO_EXPONENT / coeff)) + 1)


# ------------------------------------------------------------------------------------------- launch limits
def vector_width(head_dim: int, *tensors: torch.Tensor) -> int:
    """Elements per 16-byte vector when every (batch, frame, head) row of every tensor starts 16-byte aligned and is
    contiguous (data pointer 16-byte aligned, unit channel stride, every other stride and head_dim a multiple of 16
    bytes), else 1. The kernels declare their strides multiples of it (``ALIGN``), which lets the compiler emit
    128-bit loads and stores for head dims like 40 that are not a power of two."""
    width = 16 // tensors[0].element_size()
    aligned = head_dim % width == 0 and all(
        t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s % width == 0 for s in t.stride()[:3]) for t in tensors)
    return width if aligned else 1


def in_slice_offsets_fit(t: torch.Tensor) -> bool:
    """Whether every element offset inside one (batch, head) slice of ``t`` fits int32 (the kernels' in-slice
    arithmetic); the base offset of a slice is int64."""
    _, frames, _, dim = t.shape
    return (frames - 1) * abs(t.stride(1)) + (dim - 1) * abs(t.stride(3)) < INT32_LIMIT


def int32_slices(*tensors: torch.Tensor, fits=in_slice_offsets_fit) -> tuple[torch.Tensor, ...]:
    """``tensors``, each as is when ``fits`` (:func:`in_slice_offsets_fit`), else a contiguous copy (a layout whose
    frame stride is huge, e.g. frames outermost); ValueError when a contiguous slice still spans 2**31 elements.
    The forward launcher passes the predicate by its own module's name (``triton_tar.in_slice_offsets_fit``), so a
    test can force the copies there."""
    out = tuple(t if fits(t) else t.contiguous() for t in tensors)
    if not all(fits(t) for t in out):
        raise ValueError("one (batch, head) slice spans 2**31 elements or more even when contiguous: the kernels' "
                         "in-slice offsets are int32; split the frames")
    return out


@functools.cache
def _no_key_lengths(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


def key_lengths_arg(k_lengths: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The kernels' ``K_LENGTHS`` pointer: the call's int64 lengths, or one int64 placeholder per device (never read
    without ``VARLEN``), so that every call passes the same argument types."""
    return _no_key_lengths(device) if k_lengths is None else k_lengths


def check_launch_limits(len_q: int, len_k: int, slices: int, rows_per_program: int, params: TARParams) -> None:
    """ValueError, before any launch, for a call beyond the kernels' integer limits: frame counts and the offset
    difference (int32 frame distances) and the program count of the one-axis grid."""
    if max(len_q, len_k) > MAX_FRAMES or abs(params.offset_delta) > MAX_OFFSET_DELTA:
        raise ValueError(f"token counts ({len_q}, {len_k}) and the frame offset |q_offset - k_offset| (with the frames "
                         f"before each chunk's first token: {abs(params.offset_delta)}) must be <= 2**30: frame "
                         "distances are int32")
    programs = slices * -(-len_q // rows_per_program)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"batch·heads·ceil(Lq / {rows_per_program}) = {programs} programs exceed the grid limit "
                         f"2**31 - 1; split the batch")


# ---------------------------------------------------------------------------------------------- JIT helpers
if triton is not None:

    @triton.jit
    def scores_tile(q, k_base, stride_kn, stride_kd, offs_d, mask_d, cols, len_k, qk_log2_scale,
                     DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
        """Logits of one key tile in log2 units, -inf past Lk: ``<q, k_j> * scale * log2(e)``."""
        mask_n = cols < len_k
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + strided(cols, stride_kn, ALIGN)[None, :],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_log2_scale
        return tl.where(mask_n[None, :], s, float("-inf"))

    @triton.jit
    def sequence_keys(K_LENGTHS, b, len_k, VARLEN: tl.constexpr):
        """The keys sequence ``b`` attends to: its ``K_LENGTHS[b]`` (VARLEN: varlen keys, an int64 (batch,) tensor
        checked to lie in [1, Lk] by the op) or every one of the ``len_k`` (without VARLEN the kernel is the same
        code as before varlen keys existed: the pointer is a placeholder, never read)."""
        if VARLEN:
            len_k = tl.minimum(tl.load(K_LENGTHS + b).to(tl.int32), len_k)
        return len_k

    @triton.jit
    def slice_program(len_rows, BLOCK: tl.constexpr):
        """(slice, block) of this program on the one-axis, slice-major grid: the blocks of one (batch, head) slice
        are consecutive programs, so they run together and share that slice's K and V in L2. The slice index is
        int64 (it multiplies the batch and head strides)."""
        pid = tl.program_id(0)
        blocks = tl.cdiv(len_rows, BLOCK)
        return (pid // blocks).to(tl.int64), pid % blocks

    @triton.jit
    def grid_slices(len_rows, BLOCK: tl.constexpr):
        """batch·heads (int64), from the size of the one-axis grid of blocks of BLOCK rows (:func:`slice_program`)."""
        return (tl.num_programs(0) // tl.cdiv(len_rows, BLOCK)).to(tl.int64)

    @triton.jit
    def strided(index, stride, ALIGN: tl.constexpr):
        """index * stride (a scalar, or a 1-D tensor of row offsets), declared a multiple of ALIGN: the launcher
        checked the strides (:func:`vector_width`). The product is computed here because a hint on a value passed
        in (a function argument) is dropped by the compiler."""
        offset = index * stride
        if ALIGN > 1:
            offset = tl.multiple_of(offset, ALIGN)
        return offset

    @triton.jit
    def slice_offset(b, h, stride_b, stride_h, ALIGN: tl.constexpr):
        """Element offset (int64) of the (batch b, head h) slice, a multiple of ALIGN."""
        offset = b * stride_b + h * stride_h
        if ALIGN > 1:
            offset = tl.multiple_of(offset, ALIGN)
        return offset

    @triton.jit
    def channel_mask(offs_d, head_dim, ALIGN: tl.constexpr):
        """offs_d < head_dim, constant over runs of ALIGN channels (head_dim is a multiple of ALIGN)."""
        mask = offs_d < head_dim
        if ALIGN > 1:
            mask = tl.max_constancy(mask, ALIGN)
        return mask

    @triton.jit
    def token_frames(tokens, offset, tokens_per_frame, video_start, video_end, FRAMED: tl.constexpr):
        """offset + frame index of each local token (int32): the token itself in the temporal layout; in a framed
        one (tokens_per_frame, the video span [video_start, video_end) of this side: the query side's start and end
        for rows, the key side's for columns, :meth:`~vstar_kernels.contract.TARParams.kernel_layout_args`) its
        frame ``(t - video_start) // tokens_per_frame``, NO_FRAME for tokens outside the span (text). A chunk that
        begins inside a frame has a negative start; t - video_start >= 0 inside the span, so the truncating division
        is the floor. One division per row or column vector, not per element."""
        if FRAMED:
            framed = (tokens >= video_start) & (tokens < video_end)
            pos = tl.where(framed, (tokens - video_start) // tokens_per_frame + offset, -2147483648)  # NO_FRAME
        else:
            pos = tokens + offset
        return pos

    @triton.jit
    def relative_bias_coeff(row_max, strength):
        """c_i of relative mode in log2 units, sat(strength·m): the product clamped to ±BIAS_LOG2_MAX (finite even
        where strength·m overflows fp32; the contract's "Extreme values")."""
        return tl.minimum(tl.maximum(strength * row_max, -BIAS_LOG2_MAX), BIAS_LOG2_MAX)

    @triton.jit
    def relative_bias_slope(row_max, strength):
        """d c_i / d m of relative mode: strength, or 0 in a row whose coefficient saturates."""
        return tl.where(tl.abs(strength * row_max) <= BIAS_LOG2_MAX, strength, 0.0)

    @triton.jit
    def profile_terms(row_pos, col_pos, bias_row, scale_row, table_len, radius, sink_limit, FRAMED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, MASKS: tl.constexpr):
        """A frame-distance profile's terms on one tile, (kept, bias, scale): at d = |gi - gj| (exact int32) and
        idx = min(d, table_len - 1), ``bias_row[idx]`` in log2 units (HAS_BIAS), ``scale_row[idx]`` (HAS_SCALE;
        ``bias_row`` and ``scale_row`` point at this head's table row) and, with MASKS, whether the pair is kept:
        ``(d <= radius or f_k(j) < sink_limit) and bias > -inf`` (``col_pos`` holds the keys' local frames f_k).
        Pairs with a text token (FRAMED, NO_FRAME) are kept, with bias 0 and scale 1. A term whose flag is off is a
        placeholder that is never read (no code: every flag off returns the arguments)."""
        kept = row_pos
        bias = row_pos
        scale = row_pos
        if HAS_BIAS or HAS_SCALE or MASKS:
            dist = tl.abs(row_pos[:, None] - col_pos[None, :])
            # in [0, table_len): a text pair's (or a padding row's) distance may be anything, never its load
            idx = tl.maximum(tl.minimum(dist, table_len - 1), 0)
            framed = row_pos  # FRAMED only
            if FRAMED:
                framed = (row_pos != -2147483648)[:, None] & (col_pos != -2147483648)[None, :]  # NO_FRAME
            if HAS_BIAS:
                bias = tl.load(bias_row + idx) * PROFILE_LOG2E
                if FRAMED:
                    bias = tl.where(framed, bias, 0.0)
            if HAS_SCALE:
                scale = tl.load(scale_row + idx)
                if FRAMED:
                    scale = tl.where(framed, scale, 1.0)
            if MASKS:
                kept = (dist <= radius) | (col_pos < sink_limit)[None, :]
                if HAS_BIAS:
                    kept = kept & (bias != float("-inf"))
                if FRAMED:
                    kept = kept | ~framed
        return kept, bias, scale

    @triton.jit
    def kept_row_max(s, kept, MASKS: tl.constexpr):
        """max_j over this tile's kept keys (MASKS: a profile's mask; else every key) of the logits ``s``."""
        if MASKS:
            s = tl.where(kept, s, float("-inf"))
        return tl.max(s, 1)

    @triton.jit
    def tar_bias_tile(s, row_pos, col_pos, row_max, gauss_log2_coeff, bias_log2_scale, kept, bias, scale,
                      RELATIVE: tl.constexpr, FRAMED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                      MASKS: tl.constexpr):
        """ΔA inline on one tile of log2 logits: (S', G) with G_ij = exp(-(gi - gj)^2 / (2 sigma^2)) =
        exp2(-(gi - gj)^2 * gauss_log2_coeff) and S' = S + c·G, c = sat(strength·m) (relative, m the unbiased row
        max in log2 units over the kept keys, the kernel's own or the caller's: :func:`relative_bias_coeff`) or the
        host's sat(strength)·log2(e) (absolute).
        With a frame-distance profile (its terms from :func:`profile_terms`): S' = (S > 0 ? scale·S : S) + bias +
        c·G over the kept pairs (HAS_SCALE, HAS_BIAS), -inf where MASKS masks the pair.
        ``row_pos`` and ``col_pos`` are int32 frame positions (:func:`token_frames`), so gi - gj is exact integer
        arithmetic rounded once to fp32; G is 0 where either token has no frame (FRAMED). The one Triton statement
        of the TAR bias (every flag off: the code of plain TAR)."""
        dist = (row_pos[:, None] - col_pos[None, :]).to(tl.float32)
        gauss = tl.exp2(-(dist * dist) * gauss_log2_coeff)
        if FRAMED:
            gauss = tl.where((row_pos != -2147483648)[:, None] & (col_pos != -2147483648)[None, :], gauss, 0.0)
        biased = s
        if HAS_SCALE:
            biased = tl.where(s > 0, s * scale, s)
        if HAS_BIAS:
            biased = biased + bias
        if RELATIVE:
            biased = biased + relative_bias_coeff(row_max, bias_log2_scale)[:, None] * gauss
        else:
            biased = biased + bias_log2_scale * gauss
        if MASKS:
            biased = tl.where(kept, biased, float("-inf"))
        return biased, gauss

    @triton.jit
    def frame_window(pos, valid, full, length, tokens_per_frame, video_start, video_end, reach, head_frames,
                     BLOCK: tl.constexpr):
        """The tiles of BLOCK tokens on the other side of a profile's window (keys for a query block, query rows
        for a key block) that some kept pair reaches, as (head, gap1, mid, gap2, total) for :func:`window_tile`: the
        union of [0, head) (that side's text before its video, and its first ``head_frames`` frames: the sinks),
        the frames within ``reach`` of ``pos`` (frames of this side's tokens in the other side's local frames,
        where ``valid``) and [video_end, length) (text after the video), tile-aligned, in order, each tile once;
        every tile when ``full`` (a text token on this side, or a sink key: it pairs with every token). Frame f
        of the other side starts at token ``video_start + f * tokens_per_frame``. int64 arithmetic (frames x
        tokens may pass 2^31); the results lie in [0, length rounded up to BLOCK]."""
        lo = tl.min(tl.where(valid, pos, 2147483647), 0).to(tl.int64)
        hi = tl.max(tl.where(valid, pos, -2147483648), 0).to(tl.int64)
        per_frame = tokens_per_frame.to(tl.int64)
        start = video_start.to(tl.int64)
        end = tl.maximum(video_end, 0).to(tl.int64)
        stop = tl.cdiv(length, BLOCK) * BLOCK  # (length may be a constexpr 1: no .to; it promotes below)
        head_end = tl.maximum(tl.minimum(start + head_frames * per_frame, end), 0)
        head = tl.minimum(tl.cdiv(head_end, BLOCK) * BLOCK, stop)
        head = tl.where(full, stop, head)
        first = tl.maximum(start + (lo - reach) * per_frame, tl.maximum(start, 0))
        last = tl.minimum(start + (hi + reach + 1) * per_frame, end)
        mid_start = tl.maximum((first // BLOCK) * BLOCK, head)
        mid_stop = tl.maximum(tl.minimum(tl.cdiv(last, BLOCK) * BLOCK, stop), mid_start)
        empty = (lo > hi) | (first >= last)  # no frame within reach: nothing between head and tail
        mid_start = tl.where(empty, head, mid_start)
        mid_stop = tl.where(empty, head, mid_stop)
        tail = tl.maximum((end // BLOCK) * BLOCK, mid_stop)
        tail_len = tl.maximum(stop - tail, 0)
        total = head + (mid_stop - mid_start) + tail_len
        return (head.to(tl.int32), (mid_start - head).to(tl.int32), (mid_stop - mid_start).to(tl.int32),
                (tail - mid_stop).to(tl.int32), total.to(tl.int32))

    @triton.jit
    def window_tile(tile, head, gap1, mid, gap2):
        """The first token of the window's tile number ``tile // BLOCK`` (:func:`frame_window`): the tiles of
        [0, head), then of the mid part (gap1 tokens later), then of the tail (gap2 more)."""
        return tile + tl.where(tile >= head, gap1, 0) + tl.where(tile >= head + mid, gap2, 0)

    @triton.jit
    def key_window(row_pos, mask_m, len_k, tokens_per_frame, video_start_k, video_end_k, profile_reach,
                    window_sinks, FRAMED: tl.constexpr, MASKS: tl.constexpr, BLOCK_N: tl.constexpr):
        """(head, gap1, mid, gap2, total) of the key tiles a query block's kept pairs reach
        (:func:`~.triton_common.frame_window`; the forward's window), or every tile without MASKS."""
        head = 0
        gap1 = 0
        mid = 0
        gap2 = 0
        total = len_k
        if MASKS:
            framed_rows = mask_m
            text_rows = False
            if FRAMED:  # a text row keeps every key
                framed_rows = mask_m & (row_pos != -2147483648)  # NO_FRAME
                text_rows = tl.max((mask_m & (row_pos == -2147483648)).to(tl.int32), 0) > 0
            head, gap1, mid, gap2, total = frame_window(row_pos, framed_rows, text_rows, len_k, tokens_per_frame,
                                                        video_start_k, video_end_k, profile_reach, window_sinks,
                                                        BLOCK_N)
        return head, gap1, mid, gap2, total
