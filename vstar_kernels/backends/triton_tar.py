"""Fused flash-style TAR temporal attention in Triton (forward; the backward is in triton_tar_backward.py, the pieces
both share, the TAR bias among them, in triton_common.py). This module is also the backend's interface.

Reads top-down: availability, the launcher, the block configuration (a plain function you can override), then
the kernel. The kernel computes the Gaussian band inline in the exp2 domain; it never materialises a score
tensor beyond one (BLOCK_M, BLOCK_N) tile in registers.

- grid = (batch·heads·cdiv(Lq, BLOCK_M),), one axis, slice-major: program p runs query block p % m_blocks of
  (batch, head) p // m_blocks, so the query blocks of one (batch, head) launch back to back and read its K and V
  from L2 after the first (axis 0 holds 2**31 - 1 programs; the base offsets of a (batch, head) are int64, the
  offsets inside one are int32, checked by the launcher).
- 16-byte vectors: when every row of q, k, v and the output starts 16-byte aligned (unit channel stride, the other
  strides and head_dim multiples of 16 bytes; :func:`vector_width`), the launcher passes ``ALIGN`` = elements per
  16 bytes and the kernel declares its strides multiples of it, so head_dim 40 loads 128-bit vectors, not 16-bit
  scalars.
- the frame distance gi - gj = offset_delta + frame(i) - frame(j) is exact int32 arithmetic, rounded once to fp32
  (|offset_delta| <= 2**30 and tokens <= 2**30, checked), the same rule as the CUDA fallback. A framed token layout
  (``FRAMED``: a video transformer's patches, text tokens without a frame) maps tokens to frames per row and per
  column vector (:func:`token_frames`), never per element, with each side's own video start and end
  (:meth:`~vstar_kernels.contract.TARParams.kernel_layout_args`: a chunk of a longer sequence, context
  parallelism's Ring, has its own, negative where it begins inside a frame; the frames before it are folded into
  offset_delta). Key tiles beyond the band's reach from every row of the query block (frame distances so far
  beyond sigma that the Gaussian is exactly zero in fp32, or text) run in separate branch-free loops without the
  bias and its exp2 (:func:`band_window`).
- relative mode needs max_j S_ij of the unbiased logits before the bias. When the whole key row fits one tile
  (Lk <= BLOCK_N) it is taken from that tile in registers; otherwise a first pass over K computes it and a
  second pass runs the online softmax ("two-pass"). A row max given by the caller (``row_max=``, ROW_MAX_GIVEN:
  the max over every key chunk of a Ring) replaces both: no first pass, and the single tile's max is not used.
  :func:`row_max` is the first pass alone (``_tar_row_max``).
- ``return_lse=True`` (WRITE_LSE) also stores each row's natural-log log-sum-exp of S' (the online softmax's
  m + log2(l), times ln 2), so partial results over key chunks merge exactly.
- head_dim 1..256: the tile is padded to the next power of two (at least 32; ``tl.dot`` needs 16) and masked;
  frame tails are masked. fp16/bf16/fp32 inputs, fp32 accumulation; fp32 dots use IEEE precision (not TF32),
  so an fp32 call is as accurate as torch's fp32 attention.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on CPU tensors; that is how
tests exercise it on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

from ..contract import LOG2E, TARParams
from . import torch_tar, triton_tar_backward
from .base import InputSpec
from .triton_common import (
    BAND_ZERO_EXPONENT,
    IMPORT_ERROR,
    MAX_BAND_REACH,
    MAX_FRAMES,
    MAX_HEAD_DIM,
    MAX_OFFSET_DELTA,
    MAX_PROGRAMS,
    MIN_BLOCK_D,
    NO_FRAME,
    NOT_SPECIALIZED,
    BlockConfig,
    band_reach,
    channel_mask,
    check_launch_limits,
    grid_slices,
    in_slice_offsets_fit,
    int32_slices,
    kept_row_max,
    key_lengths_arg,
    key_window,
    next_pow2,
    profile_args,
    profile_flags,
    profile_terms,
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
from .triton_tar_backward import training_block_config

NAME = "triton"
_IMPORT_ERROR = IMPORT_ERROR  # why Triton cannot run at all (None when it is installed)
# The interpreter is chosen when the kernel is decorated, so it is read once, at import, like Triton does.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)  # the architectures the static check compiles for: sm_80 and later


# ----------------------------------------------------------------------------------------------- availability
def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernel can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        if INTERPRETER:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        major, minor = _capability(device.index)
        if (major, minor) < MIN_CAPABILITY:
            return f"needs compute capability >= 8.0 (sm_80/sm_90 are checked), device is sm_{major}{minor}"
        return None
    if device.type == "cpu":
        if INTERPRETER:
            return None
        return "CPU tensors run Triton only under TRITON_INTERPRET=1 (set before importing vstar_kernels)"
    return f"no Triton backend for device type {device.type!r}"


def unsupported_reason(spec: InputSpec, params: TARParams) -> str | None:
    """None when the kernel supports these inputs, else why not."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not supported (float16, bfloat16, float32)"
    if (params.shaped and spec.device.type == "cuda" and spec.dtype == torch.float32
            and max(MIN_BLOCK_D, next_pow2(spec.head_dim)) in PROFILE_FP32_SPILLING_BUCKETS):
        return (f"float32 with a frame-distance profile beyond a Gaussian band (tables, windows) at head_dim "
                f"{spec.head_dim} is not launched on GPUs: its kernels spill registers on sm_80/sm_90 for head_dim "
                f"buckets {PROFILE_FP32_SPILLING_BUCKETS} (python -m vstar_kernels.checks.static_check --profiles); "
                "float16/bfloat16 run, as does float32 at head_dim 65-128, and the torch backend")
    if INTERPRETER and spec.dtype == torch.bfloat16:
        return ("bfloat16 under TRITON_INTERPRET=1 is refused: the interpreter computes bf16 tl.dot wrongly "
                "(values near 1e9); run bf16 on a GPU, or use the extension or torch backend")
    if spec.head_dim > MAX_HEAD_DIM:
        return f"head_dim {spec.head_dim} exceeds the Triton kernel's maximum of {MAX_HEAD_DIM}"
    if spec.batch_heads >= 2**31:
        return f"batch*heads = {spec.batch_heads} exceeds the grid limit 2**31 - 1"
    if abs(params.offset_delta) > MAX_OFFSET_DELTA:
        return (f"the frame offset |q_offset - k_offset| (with the frames before each chunk's first token) = "
                f"{abs(params.offset_delta)} exceeds 2**30: the kernel's frame distances are int32")
    return None


def note_fallback(reason: str) -> None:
    """Nothing to report: why Triton cannot run is shown by ``vstar-kernels info``."""


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# ---------------------------------------------------------------------------------------- block configuration
# Largest key tile kept whole (single pass) per head_dim bucket. fp32 dots run in IEEE precision on the FMA
# units with both operand tiles in registers, so fp32 tiles are smaller (checked spill-free by static_check).
# head_dim 128: 64, not 128 keys: a 128-key tile took 170-210 registers and 40-80 KB of shared memory, 4-8 resident
# warps per SM (``static_check --realistic`` requires 12).
_SINGLE_TILE_LIMIT = {32: 256, 64: 256, 128: 64, 256: 64}
_SINGLE_TILE_LIMIT_FP32 = {32: 128, 64: 32, 128: 16, 256: 16}
# Framed two-pass tiles (fp32?, BLOCK_M, BLOCK_N, BLOCK_D) that run 8 warps, not 4: with per-side video starts (the
# chunks of a Ring) 4 warps spilled 8 B on sm_90 (fp16/bf16 at 128 registers; fp32 with the lse at 72)
_FRAMED_TWO_PASS_8_WARPS = {(False, 32, 64, 64), (True, 16, 64, 32)}
# The partial results of a Ring chunk (a given row max, the lse) on the inference tiles spilled 4-12 B in these
# variants (ptxas traded a spill for one more resident block; static check, sm_80/sm_90); they run other tiles:
# (RELATIVE, TWO_PASS, FRAMED, ROW_MAX_GIVEN, WRITE_LSE, fp32, BLOCK_M, BLOCK_N, BLOCK_D, warps) -> (BLOCK_M, warps)
_PARTIAL_TILES = {
    (True, True, False, False, True, False, 32, 64, 128, 4): (16, 4),
    (False, False, False, False, True, False, 16, 16, 256, 8): (16, 16),
    (True, False, False, True, True, False, 16, 16, 256, 8): (16, 16),
    (True, True, True, True, False, True, 16, 64, 32, 8): (16, 4),
    (True, False, False, False, True, False, 16, 256, 32, 8): (16, 4),
    (True, True, True, True, True, False, 16, 64, 128, 4): (16, 8),
    (True, False, False, False, True, True, 16, 16, 256, 16): (16, 8),
    (True, True, True, False, True, True, 16, 16, 256, 16): (16, 8),
}
# fp32 elements of one (BLOCK_M, BLOCK_N) score tile or (BLOCK_M, BLOCK_D) accumulator per program
_TILE_ELEMENTS = 4096
_TILE_ELEMENTS_FP32 = 2048


def single_tile_limit(block_d: int, dtype: torch.dtype = torch.float16) -> int:
    """Largest key tile kept whole in registers for a head_dim bucket: smaller for wide heads and for fp32."""
    return (_SINGLE_TILE_LIMIT_FP32 if dtype == torch.float32 else _SINGLE_TILE_LIMIT)[block_d]


def block_config(len_q: int, len_k: int, head_dim: int, mode: str, dtype: torch.dtype = torch.float16,
                 framed: bool = False) -> BlockConfig:
    """Pick tiles from the key frame count, the head_dim bucket and the dtype (temporal attention: many short rows).

    Key tile: the whole padded key row when it fits (single pass, no rescaling), else a fixed multi-tile width.
    Query tile: as wide as the key tile (temporal self-attention has Lq == Lk), capped so one score tile and one
    accumulator stay within a register budget. The choice never depends on Lq, so the set of specialisations is
    small (dtype x head_dim bucket x key tile x mode) and ``python -m vstar_kernels.checks.static_check`` compiles
    all of them. ``len_q`` is accepted for overrides that want it.

    One pipeline stage: the key loop of temporal attention is one to a few tiles long, and a second stage doubled
    the shared memory, which left sm_86/sm_89 (100 KB per SM) with 8 resident warps per SM.

    ``framed`` (a video transformer's token layout: frames per row and column vector, the band window): tiles of
    2048+ elements get half the query rows (8 warps where they are 16 already), where the full tile spilled 4-32
    bytes on sm_80/sm_90; two-pass tiles of fp16/bf16 32 x 64 x 64 and fp32 16 x 64 x 32 get 8 warps (4 spilled
    8 B on sm_90).
    """
    del len_q
    fp32 = dtype == torch.float32
    block_d = max(MIN_BLOCK_D, next_pow2(head_dim))
    limit = single_tile_limit(block_d, dtype)
    fits = next_pow2(len_k) <= limit
    block_n = max(16, next_pow2(len_k)) if fits else min(limit, 64 if block_d <= 128 else 32)
    budget = _TILE_ELEMENTS_FP32 if fp32 else _TILE_ELEMENTS
    block_m = max(16, min(64, block_n, budget // block_n, budget // block_d))
    tile = block_m * max(block_n, block_d)
    two_pass = mode == "relative" and not fits
    if fp32:  # 8 warps for 128-key tiles (4 spilled 150+ B); head_dim 256: 16 warps, where 8 spilled on sm_80
        # (ptxas kept 64 registers) and 4 left 8 warps per SM
        num_warps = 2 if tile <= 1024 else 4 if tile <= 2048 and block_n < 128 else 8 if block_d < 256 else 16
    else:  # half precision: 8 warps for the widest rows, and for one-pass 32 x 64 x 128 tiles where 4 spilled on
        # sm_90 (two-pass keeps 4: with 8 its two sweeps took 140+ registers, 8 warps per SM)
        wide = max(block_n, block_d) == 256 or (block_d == 128 and block_m * block_n >= 2048 and not two_pass)
        num_warps = 8 if wide else 4 if tile > 1024 else 2
    if framed and block_m * max(block_n, block_d) >= 2048:  # the frame map and band window need registers:
        if block_m > 16:  # at the full query tile the framed kernels spilled 4-32 B on sm_80/sm_90
            block_m //= 2
        else:
            num_warps = max(num_warps, 8)
        if two_pass and (fp32, block_m, block_n, block_d) in _FRAMED_TWO_PASS_8_WARPS:
            num_warps = 8
    return BlockConfig(block_m, block_n, block_d, two_pass=two_pass, num_warps=num_warps)


# A frame-distance profile's kernels (HAS_BIAS, HAS_SCALE, MASKS: its tables, window and kept-key row max) need
# registers the plain tiles do not leave: on block_config's tiles 64 of 196 specialisations (per kernel family and
# head_dim bucket, sm_80/sm_90) spilled 4-712 B. Profile calls run 16-row query blocks (the key tile is kept, so a
# single-pass relative row still fits one tile) with at least 4 warps, 8 at head_dim 256, and more for the tiles
# that still spilled there (static_check --profiles): (fp32, BLOCK_N, BLOCK_D, warps) -> warps. The training
# forward's two-pass tiles keep the rule's warps (16 x 64 x 128 spilled 12 B on sm_90 at 8 warps, not at 4).
PROFILE_BLOCK_M = 16
_PROFILE_WARPS = {
    (False, 64, 32, 4): 8,
    (False, 128, 32, 4): 8,
    (False, 64, 128, 4): 8,
    (False, 64, 256, 8): 16,
    (True, 16, 128, 4): 8,
}
# fp32 profile calls of these head_dim buckets still spill 4-36 B on sm_80/sm_90 at every warp count tried (4-32):
# unsupported_reason refuses them on CUDA
PROFILE_FP32_SPILLING_BUCKETS = (32, 64, 256)


def profile_block_config(cfg: BlockConfig, dtype: torch.dtype = torch.float16, training: bool = False) -> BlockConfig:
    """The tiles of a call with a frame-distance profile (``params.profile`` set) whose :func:`block_config` tiles
    are ``cfg``: the same key tile, head_dim bucket and passes, :data:`PROFILE_BLOCK_M` query rows, at least 4 warps
    (8 at head_dim 256; more for the tiles of ``_PROFILE_WARPS``). The same tiles with or without the partial
    results of a Ring chunk (a given row max, the lse) and for the ``training`` forward (it saves the row
    statistics; its two-pass tiles keep the rule's warps). ``python -m vstar_kernels.checks.static_check
    --profiles`` compiles these."""
    num_warps = max(cfg.num_warps, 8 if cfg.block_d == 256 else 4)
    if not (training and cfg.two_pass):
        num_warps = _PROFILE_WARPS.get((dtype == torch.float32, cfg.block_n, cfg.block_d, num_warps), num_warps)
    return dataclasses.replace(cfg, block_m=min(cfg.block_m, PROFILE_BLOCK_M), num_warps=num_warps)


def partial_block_config(cfg: BlockConfig, params: TARParams, dtype: torch.dtype, row_max_given: bool,
                         lse: bool) -> BlockConfig:
    """The tiles of an inference call with partial results (``row_max`` given, ``return_lse``) whose
    :func:`block_config` tiles are ``cfg``: ``cfg`` itself, except the few variants whose registers spilled there
    (``_PARTIAL_TILES``, found by the static check), which get other query tiles or warps. ``row_max_given`` counts
    in relative mode only, like the kernel's ROW_MAX_GIVEN. A call with a frame-distance profile runs
    :func:`profile_block_config` of ``cfg``, with or without partial results."""
    if params.shaped:
        return profile_block_config(cfg, dtype)
    relative = runs_relative(params)
    key = (relative, relative and cfg.two_pass, runs_framed(params), relative and row_max_given, lse,
           dtype == torch.float32, cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps)
    if key not in _PARTIAL_TILES:
        return cfg
    block_m, num_warps = _PARTIAL_TILES[key]
    return dataclasses.replace(cfg, block_m=block_m, num_warps=num_warps)


# ------------------------------------------------------------------------------------------------- launcher
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: TARParams,
    *,
    config: BlockConfig | None = None,
    stats: torch.Tensor | None = None,
    row_max: torch.Tensor | None = None,
    return_lse: bool = False,
    k_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on (batch, frames, heads, head_dim) inputs of any strides.

    ``k_lengths`` (a contiguous int64 (batch,) tensor of values in [1, Lk]): each sequence attends to its first
    ``k_lengths[b]`` keys only; the kernel (``VARLEN``) reads the count once per program and runs every key loop,
    mask and band window up to it.

    ``config`` overrides :func:`block_config` (tests use it to force the two-pass path); a relative-mode config
    must be two-pass unless its key tile covers Lk. ``stats``, a contiguous fp32 (2, batch·heads, Lq) tensor,
    receives each query row's unbiased row max and the log-sum-exp of S' (log2 units) for the backward. Returns a
    contiguous (batch, Lq, heads, head_dim) tensor.

    The partial results of a chunk of keys (context parallelism's Ring; inference only, not with ``stats``; default
    tiles from :func:`partial_block_config`):
    ``row_max``, a float32 (batch, Lq, heads) tensor of any strides, replaces in relative mode the row max of the
    unbiased logits in the bias coefficient, c_i = sat(strength * row_max_i) (natural units; ignored in absolute
    mode): a two-pass config skips its first pass over K, a single-tile one does not take the tile's max.
    ``return_lse=True`` returns ``(out, lse)``, lse a float32 (batch, Lq, heads) tensor of the rows' natural-log
    log-sum-exp of the biased logits S': the (batch, Lq, heads) view of a contiguous (batch, heads, Lq) tensor
    (flash attention's layout: each (batch, head) row of lse is stored contiguously).
    """
    len_q, head_dim = q.shape[1], q.shape[3]
    len_k = k.shape[1]
    cfg = config or block_config(len_q, len_k, head_dim, params.mode, q.dtype, framed=runs_framed(params))
    if config is None and (row_max is not None or return_lse or params.shaped):  # a profile: its own tiles
        cfg = partial_block_config(cfg, params, q.dtype, row_max is not None, return_lse)
    if params.relative and not cfg.two_pass and len_k > cfg.block_n:
        raise ValueError(f"single-pass relative mode needs block_n >= Lk, got {cfg.block_n} < {len_k}")
    if cfg.block_d < head_dim:
        raise ValueError(f"block_d {cfg.block_d} < head_dim {head_dim}")
    if stats is not None and (row_max is not None or return_lse):
        raise ValueError("row_max= and return_lse=True are for inference: not with the training forward's stats")
    if row_max is not None and (row_max.shape != q.shape[:3] or row_max.dtype != torch.float32
                                or row_max.device != q.device):
        raise ValueError(f"row_max must be a float32 {tuple(q.shape[:3])} tensor on {q.device}, got "
                         f"{row_max.dtype} {tuple(row_max.shape)} on {row_max.device}")
    return _run(q, k, v, params, cfg, stats, row_max if params.relative else None, return_lse, k_lengths)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, cfg: BlockConfig,
         stats: torch.Tensor | None = None, row_max: torch.Tensor | None = None, return_lse: bool = False,
         k_lengths: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Allocate the output (and the lse when ``return_lse``) and launch with ``cfg`` (checked by :func:`forward`)."""
    batch, len_q, heads, head_dim = q.shape
    out = torch.empty((batch, len_q, heads, head_dim), dtype=q.dtype, device=q.device)
    # the lse rows of one (batch, head) slice are contiguous, like the training forward's stats (coalesced stores)
    lse = torch.empty((batch, heads, len_q), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        return out if lse is None else (out, lse.transpose(1, 2))
    if stats is not None and (stats.shape != (2, batch * heads, len_q) or stats.dtype != torch.float32
                              or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 (2, {batch * heads}, {len_q}) tensor")
    check_launch_limits(len_q, k.shape[1], batch * heads, cfg.block_m, params)
    q, k, v = int32_slices(q, k, v, fits=in_slice_offsets_fit)
    grid = (batch * heads * triton.cdiv(len_q, cfg.block_m),)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _launch(grid, q, k, v, out, params, cfg, stats, row_max, lse, k_lengths)
    return out if lse is None else (out, lse.transpose(1, 2))


def _launch(grid, q, k, v, out, params: TARParams, cfg: BlockConfig, stats: torch.Tensor | None = None,
            row_max: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            k_lengths: torch.Tensor | None = None) -> None:
    """One launch of the forward kernel: its flags follow from the call (``row_max`` only in relative mode;
    ``stats`` for the training forward, ``row_max`` / ``lse`` (contiguous (batch, heads, Lq)) for the partial
    results of inference)."""
    relative = runs_relative(params)
    given = relative and row_max is not None
    bias_table, scale_table, *profile_ints = profile_args(params, q.device)
    _tar_attention_fwd[grid](
        q, k, v, out, out if stats is None else stats,
        row_max if given else out, out if lse is None else lse, key_lengths_arg(k_lengths, q.device),
        bias_table, scale_table,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(row_max.stride() if given else (0, 0, 0)),
        q.shape[2], q.shape[1], k.shape[1], q.shape[3],
        params.offset_delta, params.qk_log2_scale, params.gauss_log2_coeff, params.bias_log2_scale,
        *params.kernel_layout_args(q.shape[1], k.shape[1]), band_reach(params), *profile_ints,
        RELATIVE=relative,
        FRAMED=runs_framed(params),
        SKIP_BAND=skips_band(params, cfg, q.dtype, saves_stats=stats is not None),
        TWO_PASS=relative and cfg.two_pass,
        ROW_MAX_GIVEN=given,
        VARLEN=k_lengths is not None,
        **profile_flags(params),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SAVE_STATS=stats is not None,
        WRITE_LSE=lse is not None,
        ALIGN=vector_width(q.shape[3], q, k, v, out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def row_max_block_config(len_k: int, head_dim: int, dtype: torch.dtype = torch.float16) -> BlockConfig:
    """Tiles of the row-max kernel (:func:`row_max`): QKᵀ alone, no V tile and no accumulator, so the query tile
    can be as wide as the forward's largest. Key tiles of up to 64 keys (32 for head_dim 256; fp32, whose IEEE
    dots hold both operand tiles in registers: 32, and 16 from head_dim 128), no wider than the padded key row;
    4 warps. Depends on the key count only through that clip, so the static check compiles every config."""
    block_d = max(MIN_BLOCK_D, next_pow2(head_dim))
    if dtype == torch.float32:
        cap, block_m = (32, 32) if block_d <= 64 else (16, 32 if block_d == 128 else 16)
    else:
        cap, block_m = (64, 64) if block_d <= 128 else (32, 32)
    return BlockConfig(block_m, min(cap, max(16, next_pow2(len_k))), block_d, two_pass=False, num_warps=4)


def row_max(q: torch.Tensor, k: torch.Tensor, params: TARParams, *,
            config: BlockConfig | None = None) -> torch.Tensor:
    """max_j scale * <q_i, k_j> of the unbiased logits: a float32 (batch, Lq, heads) contiguous tensor
    (:func:`vstar_kernels.ops.tar_row_max`), the first pass of the two-pass forward alone (``_tar_row_max``: QKᵀ
    tile by tile, no bias, no softmax, no V). Tiles from :func:`row_max_block_config` (or ``config``); only
    ``params.scale`` is read. No autograd (ops routes calls that need gradients to torch)."""
    batch, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    cfg = config or row_max_block_config(len_k, head_dim, q.dtype)
    if cfg.block_d < head_dim:
        raise ValueError(f"block_d {cfg.block_d} < head_dim {head_dim}")
    out = torch.empty((batch, len_q, heads), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if len_k == 0:
        return out.fill_(float("-inf"))
    check_launch_limits(len_q, len_k, batch * heads, cfg.block_m, params)
    q, k = int32_slices(q, k, fits=in_slice_offsets_fit)
    grid = (batch * heads * triton.cdiv(len_q, cfg.block_m),)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _launch_row_max(grid, q, k, out, params, cfg)
    return out


def _launch_row_max(grid, q, k, out, params: TARParams, cfg: BlockConfig) -> None:
    """One launch of the row-max kernel (``out`` contiguous (batch, Lq, heads) fp32)."""
    _tar_row_max[grid](
        q, k, out,
        *q.stride(), *k.stride(),
        q.shape[2], q.shape[1], k.shape[1], q.shape[3],
        params.scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ALIGN=vector_width(q.shape[3], q, k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def band_tiles_skipped(length: int, tokens_per_frame: int, sigma: float, head_dim: int, mode: str = "relative",
                       dtype: torch.dtype = torch.float16, video_start: int = 0, video_tokens: int | None = None,
                       config: BlockConfig | None = None) -> float:
    """The share of (query block, key tile) pairs whose bias the forward kernel skips for a self-attention call of
    ``length`` tokens with this layout: the key tiles outside each query block's :func:`band_window` (the closest
    frames are more than :func:`band_reach` apart, where the Gaussian is exactly zero in fp32, or the keys are text).
    The kernel's window computed on the host with the launcher's tiles (or ``config``), for benchmarks and the
    README; the kernel itself is tested against the reference."""
    from ..contract import make_params

    params = make_params(head_dim, sigma=sigma, mode=mode, tokens_per_frame=tokens_per_frame,
                         video_start=video_start, video_tokens=video_tokens)
    if not params.framed:
        return 0.0
    cfg = config or block_config(length, length, head_dim, mode, dtype, framed=True)
    if not skips_band(params, cfg, dtype):
        return 0.0
    layout = params.layout
    reach, per_frame = band_reach(params), params.tokens_per_frame
    start, end = params.video_start, layout.video_end(length)
    frames = layout.frames(length)
    framed = layout.framed_mask(length)
    skipped = 0
    blocks = range(0, length, cfg.block_m)
    tiles = -(-length // cfg.block_n)
    for m0 in blocks:
        rows = framed[m0:m0 + cfg.block_m]
        if not rows.any():
            skipped += tiles
            continue
        lo, hi = frames[m0:m0 + cfg.block_m][rows].min().item(), frames[m0:m0 + cfg.block_m][rows].max().item()
        first = max(start + (lo - reach) * per_frame, start)
        last = min(start + (hi + reach + 1) * per_frame, end)
        if first >= last:
            skipped += tiles
            continue
        window = -(-last // cfg.block_n) - first // cfg.block_n
        skipped += tiles - min(window, tiles)
    return skipped / (len(blocks) * tiles)


def _window_tiles(pos: list[int], full: bool, length: int, per_frame: int, start: int, end: int, reach: int,
                  head_frames: int, block: int) -> list[int]:
    """The first tokens of the tiles :func:`~.triton_common.frame_window` visits, on the host (the same integers)."""
    end = max(end, 0)
    stop = -(-length // block) * block
    head = stop if full else min(-(-max(min(start + head_frames * per_frame, end), 0) // block) * block, stop)
    mid_start = mid_stop = head
    if pos:
        lo, hi = min(pos), max(pos)
        first = max(start + (lo - reach) * per_frame, max(start, 0))
        last = min(start + (hi + reach + 1) * per_frame, end)
        if first < last:
            mid_start = max(first // block * block, head)
            mid_stop = max(min(-(-last // block) * block, stop), mid_start)
    tail = max(end // block * block, mid_stop)
    return [*range(0, head, block), *range(mid_start, mid_stop, block), *range(tail, stop, block)]


def profile_window(params: TARParams, len_q: int, len_k: int, block_m: int, block_n: int, *,
                   k_lengths: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The tiles the kernels visit for a call with a masking profile (MASKS), computed on the host exactly as the
    kernels compute them (:func:`~.triton_common.frame_window`): ``(key_tiles, query_blocks)``, for each query block
    of ``block_m`` rows the first keys of the key tiles its forward, prep and dQ loops visit, and for each key tile
    of ``block_n`` keys the first rows of the query blocks its dK/dV loop visits (``k_lengths``: one sequence's key
    count). Every other tile holds masked pairs only and is skipped. Without MASKS every tile is visited. For tests
    and benchmarks (:func:`profile_tiles_skipped`)."""
    keys = len_k if k_lengths is None else k_lengths
    every_key = list(range(0, -(-keys // block_n) * block_n, block_n))
    every_row = list(range(0, -(-len_q // block_m) * block_m, block_m))
    if not profile_flags(params)["MASKS"]:
        return [every_key for _ in every_row], [every_row for _ in range(0, len_k, block_n)]
    per_frame, start_q, start_k, end_q, end_k = params.kernel_layout_args(len_q, len_k)
    *_, reach, sinks = profile_args(params, torch.device("cpu"))
    delta = params.offset_delta
    framed = runs_framed(params)

    def frame(t: int, start: int, end: int) -> int | None:
        if not framed:
            return t
        return (t - start) // per_frame if start <= t < end else None

    key_tiles = []
    for m0 in every_row:
        rows = [frame(i, start_q, end_q) for i in range(m0, min(m0 + block_m, len_q))]
        pos = [delta + f for f in rows if f is not None]
        key_tiles.append(_window_tiles(pos, None in rows, keys, per_frame, start_k, end_k, reach, sinks, block_n))
    query_blocks = []
    for n0 in range(0, len_k, block_n):
        cols = [frame(j, start_k, end_k) for j in range(n0, min(n0 + block_n, keys))]
        full = None in cols or any(f < sinks for f in cols if f is not None)
        pos = [f - delta for f in cols if f is not None]
        query_blocks.append(_window_tiles(pos, full, len_q, per_frame, start_q, end_q, reach, 0, block_m))
    return key_tiles, query_blocks


def profile_tiles_skipped(params: TARParams, len_q: int, len_k: int, config: BlockConfig) -> float:
    """The share of (query block, key tile) pairs the forward skips for a call with a masking profile (the key
    tiles outside each query block's window, :func:`profile_window`; 0.0 without MASKS)."""
    key_tiles, _ = profile_window(params, len_q, len_k, config.block_m, config.block_n)
    tiles = -(-len_k // config.block_n)
    return 1.0 - sum(map(len, key_tiles)) / (len(key_tiles) * tiles) if key_tiles and tiles else 0.0


def skips_band(params: TARParams, cfg: BlockConfig, dtype: torch.dtype, saves_stats: bool = False) -> bool:
    """Whether the forward skips the bias of key tiles out of the band's reach (:func:`band_window`): framed calls
    of several key tiles in fp16/bf16 inference. fp32 (IEEE dots on the FMA units) and the training forward keep one
    biased loop: their registers have no room for the second loop (the static check found 4-32 B spills). A
    frame-distance profile biases every tile it keeps (its own window skips the tiles it masks: MASKS)."""
    several_tiles = cfg.two_pass or not params.relative
    return (runs_framed(params) and several_tiles and dtype != torch.float32 and not saves_stats
            and not params.shaped)


# --------------------------------------------------------------------------------------------------- kernel
if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)  # a given row max (natural units) in the kernel's log2 units
    _LN2 = tl.constexpr(1.0 / LOG2E)  # the kernel's log2-sum-exp2 in natural units

    @triton.jit
    def unbiased_row_max(q, k_base, stride_kn, stride_kd, offs_n, offs_d, mask_d, len_k, qk_log2_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         ALIGN: tl.constexpr):
        """max_j of the unbiased logits (times ``qk_log2_scale``: log2 units in the forward) of each query row, over
        every key tile (relative mode's first pass; :func:`row_max` with the natural scale)."""
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for start_n in range(0, len_k, BLOCK_N):
            s = scores_tile(q, k_base, stride_kn, stride_kd, offs_d, mask_d, start_n + offs_n, len_k, qk_log2_scale,
                            DOT_PRECISION, ALIGN)
            row_max = tl.maximum(row_max, tl.max(s, 1))
        return row_max

    @triton.jit
    def profile_row_max(q, k_base, stride_kn, stride_kd, offs_n, offs_d, mask_d, len_k, qk_log2_scale, row_pos,
                        tokens_per_frame, video_start_k, video_end_k, bias_row, table_len, radius, sink_limit, head,
                        gap1, mid, gap2, total, FRAMED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
        """:func:`unbiased_row_max` over the keys a masking profile keeps (MASKS): the max of the unbiased logits over
        the window's key tiles (:func:`frame_window`), -inf for a row that keeps none."""
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for tile in range(0, total, BLOCK_N):
            cols = window_tile(tile, head, gap1, mid, gap2) + offs_n
            s = scores_tile(q, k_base, stride_kn, stride_kd, offs_d, mask_d, cols, len_k, qk_log2_scale,
                            DOT_PRECISION, ALIGN)
            col_pos = token_frames(cols, 0, tokens_per_frame, video_start_k, video_end_k, FRAMED)
            kept, _bias, _scale = profile_terms(row_pos, col_pos, bias_row, bias_row, table_len, radius, sink_limit,
                                                FRAMED, HAS_BIAS, False, True)
            row_max = tl.maximum(row_max, kept_row_max(s, kept, True))
        return row_max

    @triton.jit
    def softmax_tiles(m_i, l_i, acc, start, stop, skip_start, skip_stop, q, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, offs_n, offs_d, mask_d, len_k, row_pos, row_max, qk_log2_scale,
                      gauss_log2_coeff, bias_log2_scale, tokens_per_frame, video_start_k, video_end_k,
                      bias_row, scale_row, table_len, radius, sink_limit, head, gap1, mid, gap2,
                      BIASED: tl.constexpr, RELATIVE: tl.constexpr, ROW_MAX_KNOWN: tl.constexpr,
                      FRAMED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, MASKS: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
        """The online softmax over the key tiles [start, stop) minus [skip_start, skip_stop) (all multiples of
        BLOCK_N): (m, l, P·V, row max) updated. BIASED: add the band and the profile's terms (relative mode takes
        the row max from this, the row's only tile, unless ROW_MAX_KNOWN: from a first pass, or given). MASKS (a
        profile's window): tile number t of [start, stop) is the window's (:func:`window_tile`), and a row whose
        every key is masked so far keeps m = -inf, l = 0 (no NaN)."""
        for tile in range(start, stop - (skip_stop - skip_start), BLOCK_N):
            if MASKS:
                start_n = window_tile(tile, head, gap1, mid, gap2)
            else:
                start_n = tl.where(tile < skip_start, tile, tile + (skip_stop - skip_start))
            cols = start_n + offs_n
            s = scores_tile(q, k_base, stride_kn, stride_kd, offs_d, mask_d, cols, len_k, qk_log2_scale,
                            DOT_PRECISION, ALIGN)
            if BIASED:
                if MASKS:  # the tile's row max over the kept keys: the terms first
                    col_pos = token_frames(cols, 0, tokens_per_frame, video_start_k, video_end_k, FRAMED)
                    kept, bias, scale = profile_terms(row_pos, col_pos, bias_row, scale_row, table_len, radius,
                                                      sink_limit, FRAMED, HAS_BIAS, HAS_SCALE, MASKS)
                    if RELATIVE:  # noqa: SIM102 - nested constexpr branches, as Triton evaluates them
                        if not ROW_MAX_KNOWN:
                            row_max = kept_row_max(s, kept, MASKS)  # the whole key row is in this tile
                else:
                    if RELATIVE:  # noqa: SIM102 - nested constexpr branches, as Triton evaluates them
                        if not ROW_MAX_KNOWN:
                            row_max = tl.max(s, 1)  # the whole key row is in this tile
                    col_pos = token_frames(cols, 0, tokens_per_frame, video_start_k, video_end_k, FRAMED)
                    kept, bias, scale = profile_terms(row_pos, col_pos, bias_row, scale_row, table_len, radius,
                                                      sink_limit, FRAMED, HAS_BIAS, HAS_SCALE, MASKS)
                s, _gauss = tar_bias_tile(s, row_pos, col_pos, row_max, gauss_log2_coeff, bias_log2_scale, kept, bias,
                                          scale, RELATIVE, FRAMED, HAS_BIAS, HAS_SCALE, MASKS)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if MASKS:  # a row with no kept key yet: exp2 against 0, not -inf - -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + strided(cols, stride_vn, ALIGN)[:, None] + offs_d[None, :] * stride_vd,
                         mask=(cols < len_k)[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            m_i = m_new
        return m_i, l_i, acc, row_max

    @triton.jit
    def band_window(row_pos, len_k, tokens_per_frame, video_start_k, video_end_k, band_reach,
                    BLOCK_N: tl.constexpr):
        """[start, stop): the key tiles the band reaches from this query block, tile-aligned. Keys of frames more than
        ``band_reach`` frames from every framed row have an exactly zero band (:func:`band_reach`), and text keys
        have none, so tiles outside skip the bias. Empty when the block has no framed row. ``row_pos`` holds the
        rows' frames relative to the keys' (offset_delta + f_q), so key frame f starts at token
        ``video_start_k + f * tokens_per_frame`` (a negative start: a key chunk that begins inside a frame; the
        window is clipped to the chunk's tokens)."""
        framed = row_pos != -2147483648  # NO_FRAME
        lo = tl.min(tl.where(framed, row_pos, 2147483647), 0).to(tl.int64)
        hi = tl.max(tl.where(framed, row_pos, -2147483648), 0).to(tl.int64)
        first = video_start_k + (lo - band_reach) * tokens_per_frame  # int64: frames x tokens may pass 2^31
        last = video_start_k + (hi + band_reach + 1) * tokens_per_frame
        first = tl.maximum(first, tl.maximum(video_start_k, 0).to(tl.int64))
        last = tl.minimum(last, video_end_k.to(tl.int64))
        start = (first // BLOCK_N) * BLOCK_N
        stop = tl.minimum(tl.cdiv(last, BLOCK_N) * BLOCK_N, len_k)
        empty = (lo > hi) | (first >= last)
        return tl.where(empty, 0, start).to(tl.int32), tl.where(empty, 0, stop).to(tl.int32)

    @triton.jit
    def online_softmax(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d, mask_d, len_k,
                       row_pos, row_max, qk_log2_scale, gauss_log2_coeff, bias_log2_scale,
                       tokens_per_frame, video_start_k, video_end_k, band_reach,
                       bias_row, scale_row, table_len, radius, sink_limit, head, gap1, mid, gap2, total,
                       RELATIVE: tl.constexpr, ROW_MAX_KNOWN: tl.constexpr, FRAMED: tl.constexpr,
                       SKIP_BAND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                       MASKS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       ALIGN: tl.constexpr):
        """The TAR softmax over every key tile, online: (running max m, sum l, unnormalised P·V, the unbiased row max),
        all in log2 units. Relative mode takes ``row_max`` as passed (ROW_MAX_KNOWN: from a first pass, or given by
        the caller) or from the single tile that holds the row, and returns the one it used. SKIP_BAND (framed,
        several key tiles): the tiles outside the band's reach (:func:`band_window`) run in a second, branch-free
        loop without the bias. MASKS: the ``total`` tokens of the profile's window (:func:`frame_window`) only."""
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        band_start = 0
        band_stop = len_k
        if MASKS:
            band_stop = total
        if SKIP_BAND:
            band_start, band_stop = band_window(row_pos, len_k, tokens_per_frame, video_start_k, video_end_k,
                                                band_reach, BLOCK_N)
        # the tiles the band reaches, biased
        m_i, l_i, acc, row_max = softmax_tiles(
            m_i, l_i, acc, band_start, band_stop, 0, 0, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
            stride_vd, offs_n, offs_d, mask_d, len_k, row_pos, row_max, qk_log2_scale, gauss_log2_coeff,
            bias_log2_scale, tokens_per_frame, video_start_k, video_end_k, bias_row, scale_row, table_len, radius,
            sink_limit, head, gap1, mid, gap2, True, RELATIVE, ROW_MAX_KNOWN, FRAMED, HAS_BIAS, HAS_SCALE, MASKS,
            BLOCK_N, DOT_PRECISION, ALIGN)
        if SKIP_BAND:  # every other tile, before and after the window, without the bias
            m_i, l_i, acc, row_max = softmax_tiles(
                m_i, l_i, acc, 0, len_k, band_start, band_stop, q, k_base, v_base, stride_kn, stride_kd,
                stride_vn, stride_vd, offs_n, offs_d, mask_d, len_k, row_pos, row_max, qk_log2_scale,
                gauss_log2_coeff, bias_log2_scale, tokens_per_frame, video_start_k, video_end_k, bias_row, scale_row,
                table_len, radius, sink_limit, head, gap1, mid, gap2, False, RELATIVE, ROW_MAX_KNOWN, FRAMED,
                HAS_BIAS, HAS_SCALE, MASKS, BLOCK_N, DOT_PRECISION, ALIGN)
        return m_i, l_i, acc, row_max

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _tar_attention_fwd(
        Q, K, V, O,  # noqa: E741 - the kernel names its tensors like the math does
        STATS,  # (2, batch·heads, Lq) fp32 when SAVE_STATS, else unused
        ROW_MAX,  # (batch, Lq, heads) fp32, natural units, any strides, when ROW_MAX_GIVEN, else unused
        LSE,  # contiguous (batch, heads, Lq) fp32 when WRITE_LSE, else unused
        K_LENGTHS,  # (batch,) int64 when VARLEN, else a placeholder
        BIAS_TABLE, SCALE_TABLE,  # a profile's fp32 (rows, table_len) tables when HAS_BIAS / HAS_SCALE (profile_args)
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_rb, stride_rm, stride_rh,  # of ROW_MAX (0 when unused)
        num_heads, len_q, len_k, head_dim,
        offset_delta,      # int: the frame offset (TARParams.offset_delta), |.| <= 2**30
        qk_log2_scale,     # scale * log2(e)
        gauss_log2_coeff,  # log2(e) / (2 sigma^2)
        bias_log2_scale,   # strength (relative) or strength * log2(e) (absolute)
        # the token layout, each side's own video span (TARParams.kernel_layout_args; starts may be negative)
        tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k,
        band_reach,        # frames beyond which the band is exactly zero (band_reach())
        # the profile's integers (profile_args): entries per table row, elements between two heads' rows of each
        # table (0: one row), the window's radius, the sink limit, the reach and the window's sink frames
        table_len, bias_head_stride, scale_head_stride, radius, sink_limit, profile_reach, window_sinks,
        RELATIVE: tl.constexpr,
        FRAMED: tl.constexpr,  # False: token = frame (temporal attention), the layout arguments are unused
        SKIP_BAND: tl.constexpr,  # framed with several key tiles: the tiles out of the band's reach skip the bias
        TWO_PASS: tl.constexpr,
        ROW_MAX_GIVEN: tl.constexpr,  # relative: the row max comes from ROW_MAX (no first pass, no tile max)
        VARLEN: tl.constexpr,  # sequence b attends to its first K_LENGTHS[b] keys only (varlen keys)
        HAS_BIAS: tl.constexpr,  # a profile's bias table (profile_flags)
        HAS_SCALE: tl.constexpr,  # a profile's positive-logit scale table
        MASKS: tl.constexpr,  # a profile that masks pairs: kept-key row max, empty rows, its window of key tiles
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        SAVE_STATS: tl.constexpr,
        WRITE_LSE: tl.constexpr,  # store each row's natural log-sum-exp of S' in LSE
        ALIGN: tl.constexpr,  # every row starts 16-byte aligned: strides are multiples of ALIGN elements
    ):
        pid_bh, pid_m = slice_program(len_q, BLOCK_M)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        q_base = Q + slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        k_base = K + slice_offset(b, h, stride_kb, stride_kh, ALIGN)
        v_base = V + slice_offset(b, h, stride_vb, stride_vh, ALIGN)
        o_base = O + slice_offset(b, h, stride_ob, stride_oh, ALIGN)
        len_k = sequence_keys(K_LENGTHS, b, len_k, VARLEN)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < len_q
        mask_d = channel_mask(offs_d, head_dim, ALIGN)
        q = tl.load(q_base + strided(offs_m, stride_qm, ALIGN)[:, None] + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        # offset_delta + the local frame of each query row: gi - gj = row_pos - col_pos (int32; NO_FRAME for text)
        row_pos = token_frames(offs_m, offset_delta, tokens_per_frame, video_start_q, video_end_q, FRAMED)

        # a profile: this head's table rows, and the window of key tiles its kept pairs reach (MASKS)
        bias_row = BIAS_TABLE + h * bias_head_stride
        scale_row = SCALE_TABLE + h * scale_head_stride
        head, gap1, mid, gap2, total = key_window(row_pos, mask_m, len_k, tokens_per_frame, video_start_k,
                                                  video_end_k, profile_reach, window_sinks, FRAMED, MASKS, BLOCK_N)

        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if ROW_MAX_GIVEN:  # the caller's row max (over every key chunk of the row), in log2 units like the logits
            row_max = tl.load(ROW_MAX + b * stride_rb + offs_m.to(tl.int64) * stride_rm + h * stride_rh,
                              mask=mask_m, other=0.0) * _LOG2E
        elif TWO_PASS:  # pass 1: the row max of the unbiased logits over every key tile (every kept key: MASKS)
            if MASKS:
                row_max = profile_row_max(q, k_base, stride_kn, stride_kd, offs_n, offs_d, mask_d, len_k,
                                          qk_log2_scale, row_pos, tokens_per_frame, video_start_k, video_end_k,
                                          bias_row, table_len, radius, sink_limit, head, gap1, mid, gap2, total,
                                          FRAMED, HAS_BIAS, BLOCK_M, BLOCK_N, DOT_PRECISION, ALIGN)
            else:
                row_max = unbiased_row_max(q, k_base, stride_kn, stride_kd, offs_n, offs_d, mask_d, len_k,
                                           qk_log2_scale, BLOCK_M, BLOCK_N, DOT_PRECISION, ALIGN)
        m_i, l_i, acc, row_max = online_softmax(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n,
                                                offs_d, mask_d, len_k, row_pos, row_max, qk_log2_scale,
                                                gauss_log2_coeff, bias_log2_scale, tokens_per_frame, video_start_k,
                                                video_end_k, band_reach, bias_row, scale_row, table_len, radius,
                                                sink_limit, head, gap1, mid, gap2, total, RELATIVE,
                                                TWO_PASS or ROW_MAX_GIVEN, FRAMED, SKIP_BAND, HAS_BIAS, HAS_SCALE,
                                                MASKS, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, ALIGN)

        if WRITE_LSE and TWO_PASS:  # the same, before the output (fewer registers after the two passes)
            tl.store(LSE + pid_bh * len_q + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)
        if MASKS:  # noqa: SIM108 - a constexpr branch. A row with no kept key: output 0 (lse -inf: m -inf, l 0)
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        else:
            out = acc / l_i[:, None]
        tl.store(o_base + strided(offs_m, stride_om, ALIGN)[:, None] + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        if SAVE_STATS:  # for the backward: the unbiased row max and the log-sum-exp of S' (log2 units)
            rows = STATS + pid_bh * len_q + offs_m
            tl.store(rows, row_max, mask=mask_m)
            tl.store(rows + grid_slices(len_q, BLOCK_M) * len_q, m_i + tl.log2(l_i), mask=mask_m)
        if WRITE_LSE and not TWO_PASS:  # the partial result's log-sum-exp of S' in natural log (log2 units * ln 2)
            tl.store(LSE + pid_bh * len_q + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _tar_row_max(
        Q, K, OUT,  # OUT: contiguous (batch, Lq, heads) fp32
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        num_heads, len_q, len_k, head_dim,
        qk_scale,  # the natural scale: max_j scale * <q_i, k_j>, as torch computes it in fp32
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        """The row max of the unbiased logits over every key of this call (:func:`row_max`): the forward's first
        pass alone, on the forward's one-axis slice-major grid."""
        pid_bh, pid_m = slice_program(len_q, BLOCK_M)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        q_base = Q + slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        k_base = K + slice_offset(b, h, stride_kb, stride_kh, ALIGN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < len_q
        mask_d = channel_mask(offs_d, head_dim, ALIGN)
        q = tl.load(q_base + strided(offs_m, stride_qm, ALIGN)[:, None] + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        row_max = unbiased_row_max(q, k_base, stride_kn, stride_kd, offs_n, offs_d, mask_d, len_k, qk_scale,
                                   BLOCK_M, BLOCK_N, DOT_PRECISION, ALIGN)
        tl.store(OUT + (b * len_q + offs_m) * num_heads + h, row_max, mask=mask_m)


def forward_with_residuals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, *,
                           k_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward of a call whose inputs require grad: (out, residuals for :func:`backward`). fp16/bf16: the
    output and each row's max and log-sum-exp (:func:`training_forward`); fp32: nothing beyond q, k, v."""
    if q.dtype == torch.float32:
        return forward(q, k, v, params, k_lengths=k_lengths), ()
    return training_forward(q, k, v, params, k_lengths=k_lengths)


def training_forward_config(cfg: BlockConfig, params: TARParams, dtype: torch.dtype) -> BlockConfig:
    """The tiles of the forward of a training call whose :func:`block_config` tiles are ``cfg``:
    :func:`~.triton_tar_backward.training_block_config`, or with a frame-distance profile
    :func:`profile_block_config` (``training``)."""
    if params.shaped:
        return profile_block_config(cfg, dtype, training=True)
    return training_block_config(cfg, framed=runs_framed(params))


def training_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, *,
                     config: BlockConfig | None = None,
                     k_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(out, (out, stats)): the forward (``config``, default
    :func:`training_forward_config` of :func:`block_config`), saving per query row the unbiased
    row max and the log-sum-exp of S' (log2 units) in ``stats``, a (2, batch·heads, Lq) fp32 tensor: the residuals
    of the fused backward (:mod:`.triton_tar_backward`)."""
    batch, len_q, heads, head_dim = q.shape
    cfg = config or training_forward_config(block_config(len_q, k.shape[1], head_dim, params.mode, q.dtype,
                                                         framed=runs_framed(params)), params, q.dtype)
    stats = torch.empty((2, batch * heads, len_q), dtype=torch.float32, device=q.device)
    return (out := forward(q, k, v, params, config=cfg, stats=stats, k_lengths=k_lengths)), (out, stats)


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, params: TARParams,
             residuals: tuple[torch.Tensor, ...] = (), k_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): fp16/bf16 by the fused Triton backward kernels (:mod:`.triton_tar_backward`), from the
    ``residuals`` of :func:`forward_with_residuals` (recomputed when not given); fp32 by the torch backend's chunked
    backward (the fused kernels' IEEE fp32 tiles spill; fp32 training is rare), as are calls with a frame-distance
    profile at head_dim 129-256 on a GPU (its backward kernels spill there)."""
    if q.dtype == torch.float32 or (params.shaped and q.is_cuda and q.shape[3] > 128):
        # a profile's backward kernels at head_dim 129-256 spill 8-104 B on sm_80/sm_90 (static_check --profiles)
        return torch_tar.backward(q, k, v, grad_out, params, k_lengths=k_lengths)
    return triton_tar_backward.backward(q, k, v, grad_out, params, residuals=residuals, k_lengths=k_lengths)


# The backward recomputes missing residuals with training_forward; it cannot import this module (which imports
# it: the graph stays acyclic), so the function is handed over here, once.
triton_tar_backward.use_training_forward(training_forward)

__all__ = [
    "BAND_ZERO_EXPONENT",
    "MAX_BAND_REACH",
    "MAX_FRAMES",
    "MAX_HEAD_DIM",
    "MAX_OFFSET_DELTA",
    "MAX_PROGRAMS",
    "MIN_BLOCK_D",
    "NOT_SPECIALIZED",
    "NO_FRAME",
    "BlockConfig",
    "backward",
    "band_reach",
    "band_tiles_skipped",
    "block_config",
    "check_launch_limits",
    "forward",
    "forward_with_residuals",
    "in_slice_offsets_fit",
    "int32_slices",
    "next_pow2",
    "partial_block_config",
    "profile_block_config",
    "profile_tiles_skipped",
    "profile_window",
    "row_max",
    "row_max_block_config",
    "runs_framed",
    "runs_relative",
    "scores_tile",
    "single_tile_limit",
    "skips_band",
    "training_block_config",
    "training_forward",
    "training_forward_config",
    "unavailable_reason",
    "unsupported_reason",
    "vector_width",
]
