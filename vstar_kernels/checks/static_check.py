"""Static resource check of every Triton specialisation the launcher can choose, without a GPU.

Run ``python -m vstar_kernels.checks.static_check [--arch 80 90] [--jobs N] [--csv PATH] [--value-classes plain aligned]
[--cache-dir DIR] [--realistic] [--quick] [--stamp]``.

1. :func:`reachable_specialisations` enumerates the compiles :func:`~vstar_kernels.backends.triton_tar.forward`
   can trigger: every :class:`BlockConfig` that ``block_config`` returns over a grid of frame counts, head dims and
   both modes, times fp16/bf16/fp32, times the constexpr flags ``_launch`` passes for ``strength != 0`` and
   ``strength == 0``, with and without the partial results of a Ring chunk (a given row max, the lse: every
   combination :data:`PARTIAL_RESULTS`); the row-max kernel (:func:`~vstar_kernels.backends.triton_tar.row_max`)
   for every config ``row_max_block_config`` returns. The flags are not re-derived here: ``_launch`` itself is
   called with the kernel swapped for a recorder, so whatever ``_launch`` passes (today RELATIVE, FRAMED,
   SKIP_BAND, TWO_PASS, ROW_MAX_GIVEN, VARLEN, BLOCK_*, DOT_PRECISION, SAVE_STATS, WRITE_LSE, ALIGN, num_warps,
   num_stages) is what gets compiled. Identical compiles are deduplicated.
2. Each one is AOT-compiled for each requested arch (``triton.compile`` on a ``GPUTarget``; no driver needed).
3. Registers, shared and local memory come from the cubin (bundled ``cuobjdump --dump-resource-usage``); spill
   stores/loads from the ``ptxas -v`` report of triton's own ptxas run, the one that wrote the cubin (captured, not
   re-run; re-run on the PTX with triton's flags only when the compile came from a triton cache). Triton's dynamic
   shared memory (``metadata.shared``) is compared with the per-block limit of the arch, as the launcher does.
4. The SASS (``cuobjdump -sass``) is profiled: 16-bit and 128-bit global loads/stores, HMMA/HGMMA, LDL/STL; and
   the resident warps per SM follow from registers, shared memory and warps (:func:`warps_per_sm`).
5. A table is printed; the exit status is 1 if any compile fails, spills, uses local memory, needs more shared
   memory than the arch allows, makes 16-bit global accesses although the launcher passed ``ALIGN`` > 1 (every row
   16-byte aligned), or is a half-precision kernel without a tensor-core instruction (the rows are listed); 2 if the
   check cannot run at all, else 0.

``--realistic`` checks, instead, the compiles that real calls trigger (:func:`realistic_specialisations`):
AnimateDiff's 8 heads x {40, 80, 160} and ModelScope's {5, 10, 20} x 64, F in {14, 16, 24, 25, 64, 128, 256}, q/k/v
as views of separate projections or of one fused QKV projection, fp16/bf16/fp32, both modes, on sm_80/86/89/90, with
the tensors' own strides and alignment (no representative value class); the video transformers' 3D attention
(:data:`REALISTIC_DIT`), whole and as the chunks of a Ring over :data:`REALISTIC_RING_RANKS` ranks (a key chunk with
the row max given and the lse returned, and the row-max pass). There it also fails a row with fewer than
MIN_WARPS_PER_SM resident warps per SM.

Runtime-argument specialisation. Triton also specialises non-constexpr arguments on their values: an int equal
to 1 becomes the constexpr 1, an int (or pointer address) divisible by 16 gets a ``tt.divisibility = 16`` hint.
Covering every value class of every shape would multiply the compiles by ~17, so each compile uses a
representative call from :data:`VALUE_CLASSES`: a diffusers-style layout with 16-byte-aligned pointers, a unit last
stride (so ``stride_*d`` become the constexpr 1) and other strides that are multiples of 16. In the default class
"plain", ``num_heads``, ``len_q``, ``len_k`` and ``head_dim`` are neither 1 nor multiples of 16 (plain ``i32``, no
hint: the general masked case, e.g. head_dim 40); in "aligned" all four are multiples of 16 (e.g. head_dim 64, 16
frames, 16 heads), which changes vectorisation and so register allocation. ``--value-classes plain aligned``
checks both (twice the compiles). :func:`specialise_value` applies triton's rule to those values; the tests
cross-check it against triton's own binder.

Configs passed explicitly to ``forward(config=...)`` (tests forcing two-pass) are not covered: only what
``block_config`` (with ``partial_block_config`` for the partial results) and ``row_max_block_config`` can return.

``--quick`` compiles one specialisation per kernel family (:func:`quick_specialisations`: per kernel, variant and
precision, the largest tile per thread), about 100 compiles instead of 1224: the test suite's fast check. ``--stamp``
skips a check that already passed with the same options on the same kernel sources, triton and torch (a stamp file
under ``~/.cache/vstar-kernels/static-check``, :func:`stamp_path`) and writes the stamp when it passes: CI's full
steps, rerun on an unchanged tree, cost nothing. ``--quick --stamp`` is also skipped when the full check with the
same other options passed (its rows include every quick one): the test suite's quick check after .ci/run's full step.

``--profiles`` compiles, instead, the kernels of calls with a frame-distance profile (every profile flag set) on
the tiles the launchers choose for them, one specialisation per kernel family and head_dim bucket
(:func:`profile_specialisations`, 196 compiles per arch).

Under ``TRITON_INTERPRET=1`` the kernel is an interpreted function that cannot be compiled; :func:`main` refuses.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import functools
import inspect
import io
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from ..backends import triton_tar, triton_tar_backward
from ..backends.triton_tar import BlockConfig, block_config, row_max_block_config
from ..backends.triton_tar_backward import backward_block_config, training_block_config
from ..contract import MODES, make_params
from ..profiles import FrameProfile

ARCHS: tuple[int, ...] = (80, 90)
# Largest dynamic shared memory one block may request (opt-in), as the launcher checks ``metadata.shared``.
SHARED_LIMIT: dict[int, int] = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TRITON_TYPES: dict[torch.dtype, str] = {**{dt: name for name, dt in DTYPES.items()}, torch.int64: "i64"}

# Shapes fed to block_config: every head_dim, powers of two and their neighbours plus a few odd frame counts.
HEAD_DIMS: tuple[int, ...] = tuple(range(1, triton_tar.MAX_HEAD_DIM + 1))
FRAME_COUNTS: tuple[int, ...] = tuple(sorted(
    {n for p in range(12) for n in (2**p - 1, 2**p, 2**p + 1) if 1 <= n <= 2048} | {14, 24, 25, 100, 1000}
))
STRENGTHS: tuple[float, ...] = (1.0, 0.0)  # biased, and strength == 0 (launched as absolute with a zero bias)
# Long rows (a video transformer's 3D attention) launch the framed kernels (FRAMED: tokens in frames, text without a
# frame, band-tile skipping); their tiles do not depend on the length past one tile, so one length covers them.
LONG_ROW = 1024
FRAMED_LAYOUT = {"tokens_per_frame": 256, "video_start": 0, "video_tokens": 768}
BACKWARD_DTYPES: tuple[str, ...] = ("fp16", "bf16")  # the dtypes the Triton backward kernels are launched for
# The partial results of an inference call (a chunk of keys, context parallelism's Ring): (row max given, lse
# returned). A given row max applies to relative mode only (absolute launches ignore it: deduplicated).
PARTIAL_RESULTS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))
# A frame-distance profile's kernels (HAS_BIAS, HAS_SCALE, MASKS) are checked with one composed profile that sets
# every flag (per-head bias with -inf entries, a positive-logit scale, a window with sinks): the superset of their
# code paths, on the tiles the launchers choose for profile calls (``triton_tar.profile_block_config``: 16 query
# rows, 4-8 warps; ``backward_block_config(profile=True)``), reduced to one per kernel family (kernel, variant,
# precision) and head_dim bucket, the largest tile per thread (:func:`profile_specialisations`), not the cross
# product with every tile: 196 specialisations, compiled with ``--profiles`` (instead of the reachable ones). On the
# plain tiles 64 of them spilled 4-712 B on sm_80/sm_90, which is why profile calls run their own.

# Representative calls (see the module docstring): (batch, frames, heads, head_dim) shape and strides.
VALUE_CLASSES: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "plain": ((2, 100, 10, 40), (100 * 10 * 48, 10 * 48, 48, 1)),
    "aligned": ((2, 32, 16, 64), (32 * 16 * 64, 16 * 64, 64, 1)),
}

_FP_FUSION_WARNING = "TRITON_DEFAULT_FP_FUSION is unset"


def composed_profile(heads: int, strength: float, mode: str) -> FrameProfile:
    """The profile of the profile specialisations: every flag set (the band only when ``strength`` != 0)."""
    bias = torch.zeros(heads, 6, dtype=torch.float64)
    bias[:, -1] = float("-inf")
    scale = torch.ones(7, dtype=torch.float64)
    scale[-1] = 0.9
    profile = FrameProfile.table(bias=bias, positive_scale=scale) + FrameProfile.window(4, sink_frames=1)
    return profile + FrameProfile.gaussian(2.0, strength, mode) if strength != 0.0 else profile

# Every kernel the launchers can start, by name, with the module that defines it.
FORWARD_KERNEL = "_tar_attention_fwd"
ROW_MAX_KERNEL = "_tar_row_max"
KERNELS: dict[str, object] = {
    FORWARD_KERNEL: triton_tar,
    ROW_MAX_KERNEL: triton_tar,
    "_tar_bwd_prep": triton_tar_backward,
    "_tar_bwd_dq": triton_tar_backward,
    "_tar_bwd_dkdv": triton_tar_backward,
}


# ---------------------------------------------------------------------------------------------- enumeration
@dataclass(frozen=True)
class Spec:
    """One distinct compile: equal Specs are identical ``triton.compile`` calls for a given arch.

    ``value_class`` names the representative call (:data:`VALUE_CLASSES`). ``config.two_pass`` equals the
    TWO_PASS constexpr actually passed (a two-pass config launched with strength 0 compiles as absolute). ``constexprs``
    are the constexpr keywords ``_launch`` passes, in kernel order; ``signature`` maps every kernel argument to its
    triton type ("*fp16", "i32", "fp32", "constexpr"); ``specialised`` holds the runtime arguments triton turns
    into constexprs (the unit strides); ``divisible`` the arguments that carry ``tt.divisibility = 16``.
    """

    dtype: str
    value_class: str
    config: BlockConfig
    constexprs: tuple[tuple[str, object], ...]
    signature: tuple[tuple[str, str], ...]
    specialised: tuple[tuple[str, int], ...]
    divisible: tuple[str, ...]
    kernel: str = FORWARD_KERNEL

    @property
    def variant(self) -> str:
        """Forward: relative, relative-2pass or absolute (which strength == 0 also runs), with "+framed" for a token
        layout, "+stats" for the forward of a training call (it saves the row statistics), "+rowmax" where the row
        max is given and "+lse" where the lse is stored (the partial results of a Ring chunk), "+profile" for a
        frame-distance profile's kernels (every profile flag; "+bias", "+scale", "+masks" for some). Backward: the
        kernel and the mode, e.g. bwd_dq-relative. The row-max kernel: row_max."""
        flags = dict(self.constexprs)
        if self.kernel == ROW_MAX_KERNEL:
            return "row_max"
        mode = "relative" if flags["RELATIVE"] else "absolute"
        framed = "+framed" if flags.get("FRAMED") else ""
        terms = [name for name, flag in (("bias", "HAS_BIAS"), ("scale", "HAS_SCALE"), ("masks", "MASKS"))
                 if flags.get(flag)]
        profile = "" if not terms else "+profile" if len(terms) == 3 else "".join(f"+{t}" for t in terms)
        if self.kernel != FORWARD_KERNEL:
            return f"{self.kernel.removeprefix('_tar_')}-{mode}{framed}{profile}"
        variant = "relative-2pass" if flags["RELATIVE"] and flags["TWO_PASS"] else mode
        return (variant + framed + ("+stats" if flags.get("SAVE_STATS") else "")
                + ("+rowmax" if flags.get("ROW_MAX_GIVEN") else "") + ("+lse" if flags.get("WRITE_LSE") else "")
                + profile)


def reachable_configs() -> list[tuple[BlockConfig, str, str]]:
    """Every distinct (BlockConfig, mode, dtype) ``block_config`` returns over FRAME_COUNTS² x HEAD_DIMS x MODES x
    DTYPES (2.4 million calls, seconds: computed once per process)."""
    return list(_reachable_configs())


@functools.cache
def _reachable_configs() -> tuple[tuple[BlockConfig, str, str], ...]:
    found = {
        (block_config(len_q, len_k, head_dim, mode, DTYPES[dtype]), mode, dtype)
        for dtype in DTYPES for len_q in FRAME_COUNTS for len_k in FRAME_COUNTS for head_dim in HEAD_DIMS
        for mode in MODES
    }
    return tuple(sorted(found, key=lambda item: (_config_key(item[0]), item[1], item[2])))


def reachable_backward_configs(profiled: bool = False) -> list[tuple[object, str, str]]:
    """Every distinct (BackwardConfig, mode, dtype) ``backward_block_config`` returns over FRAME_COUNTS x HEAD_DIMS
    x MODES x BACKWARD_DTYPES (fp32 gradients run the chunked torch backward); ``profiled``: those of calls with a
    frame-distance profile."""
    found = {(backward_block_config(len_k, head_dim, DTYPES[dtype], profile=profiled), mode, dtype)
             for dtype in BACKWARD_DTYPES for len_k in FRAME_COUNTS for head_dim in HEAD_DIMS for mode in MODES}
    return sorted(found, key=lambda item: (item[0].block_d, item[0].block_n, item[1], item[2]))


def reachable_training_forward_configs() -> list[tuple[BlockConfig, str, str]]:
    """Every distinct (BlockConfig, mode, dtype) the forward of a training call runs with (it also saves the row
    statistics): ``training_block_config`` of the inference configs, for the dtypes the fused backward takes."""
    return [(training_block_config(cfg), mode, dtype) for cfg, mode, dtype in reachable_configs()
            if dtype in BACKWARD_DTYPES]


def reachable_row_max_configs() -> list[tuple[BlockConfig, str]]:
    """Every distinct (BlockConfig, dtype) ``row_max_block_config`` returns over FRAME_COUNTS x HEAD_DIMS x DTYPES
    (the row-max kernel of ``tar_row_max``)."""
    found = {(row_max_block_config(len_k, head_dim, DTYPES[dtype]), dtype)
             for dtype in DTYPES for len_k in FRAME_COUNTS for head_dim in HEAD_DIMS}
    return sorted(found, key=lambda item: (_config_key(item[0]), item[1]))


def reachable_framed_configs(profiled: bool = False) -> list[tuple[BlockConfig, object, str, str]]:
    """(forward config, backward config, mode, dtype) of long-row calls, the ones that run the framed kernels
    (``profiled``: the backward configs of calls with a frame-distance profile; the forward's follow from the call,
    :func:`~vstar_kernels.backends.triton_tar.partial_block_config`)."""
    found = {(block_config(LONG_ROW, LONG_ROW, head_dim, mode, DTYPES[dtype], framed=True),
              backward_block_config(LONG_ROW, head_dim, DTYPES[dtype], profile=profiled), mode, dtype)
             for dtype in DTYPES for head_dim in HEAD_DIMS for mode in MODES}
    return sorted(found, key=lambda item: (_config_key(item[0]), item[1].block_n, item[2], item[3]))


def reachable_specialisations(value_classes: Sequence[str] = ("plain",), profiled: bool = False) -> list[Spec]:
    """Every distinct compile the launchers can choose: reachable (config, mode, dtype) x the flags ``_launch``
    passes, with every combination of :data:`PARTIAL_RESULTS`, for each representative call in ``value_classes``
    (keys of :data:`VALUE_CLASSES`); the row-max kernel for every config it runs with; the forward of a training
    call (saving the row statistics) for every config it runs with; and the three kernels of the Triton backward
    for every config ``backward_block_config`` returns.

    ``profiled``: instead, the same calls with a frame-distance profile (:func:`composed_profile`), on the tiles
    the launchers choose for them (``triton_tar.profile_block_config``, ``backward_block_config(profile=True)``),
    reduced to :func:`profile_specialisations`.

    Deterministic order (kernel, value class, dtype, block_d, block_n, block_m, variant); no two are equal.
    """
    if profiled:
        return [spec for spec in profile_specialisations(_enumerate(value_classes, profiled=True))
                if launched_with_a_profile(spec)]
    return sorted(_enumerate(value_classes, profiled=False), key=_spec_key)


def launched_with_a_profile(spec: Spec) -> bool:
    """Whether the launchers run this profile specialisation on a GPU: not fp32 at the head_dim buckets
    ``triton_tar.unsupported_reason`` refuses (``PROFILE_FP32_SPILLING_BUCKETS``), and no backward kernel at head_dim
    bucket 256 (``triton_tar.backward`` runs the torch backward there). Those spill; the check compiles what runs."""
    if spec.dtype == "fp32" and spec.config.block_d in triton_tar.PROFILE_FP32_SPILLING_BUCKETS:
        return False
    return spec.kernel in (FORWARD_KERNEL, ROW_MAX_KERNEL) or spec.config.block_d < 256


def profile_specialisations(specs: set[Spec] | Sequence[Spec]) -> list[Spec]:
    """Of the specialisations of calls with a profile, one per (kernel family, value class, head_dim bucket): the
    largest tile per thread (:func:`_tile_per_thread`), the most likely to spill, as the quick check chooses. The
    profile's terms and window add the same code to every tile of a family; within a head_dim bucket the profile
    tiles differ only in the key tile (16 query rows), so its widest bounds the others' registers."""
    chosen: dict[tuple[object, ...], Spec] = {}
    for spec in specs:
        key = (*kernel_family(spec), spec.value_class, spec.config.block_d)
        if key not in chosen or _tile_per_thread(spec) > _tile_per_thread(chosen[key]):
            chosen[key] = spec
    return sorted(chosen.values(), key=_spec_key)


def _params(value_class: str, profiled: bool, strength: float = 1.0, mode: str = "relative", **layout):
    """The representative call's params: TAR's band (sigma 2), or with ``profiled`` the composed profile."""
    head_dim = VALUE_CLASSES[value_class][0][3]
    if not profiled:
        return make_params(head_dim, sigma=2.0, strength=strength, mode=mode, **layout)
    profile = composed_profile(VALUE_CLASSES[value_class][0][2], strength, mode)
    return make_params(head_dim, profile=profile, **layout)


def _enumerate(value_classes: Sequence[str], profiled: bool) -> set[Spec]:
    """The compiles of :func:`reachable_specialisations`, without (or, ``profiled``, with) a profile."""
    specs: set[Spec] = set()
    with _recording_kernels() as calls:
        for value_class, (config, mode, dtype), strength, partial in itertools.product(
                value_classes, reachable_configs(), STRENGTHS, PARTIAL_RESULTS):
            params = _params(value_class, profiled, strength, mode)
            tensors = [_representative_tensor(DTYPES[dtype], value_class) for _ in range(4)]
            tiles = triton_tar.partial_block_config(config, params, DTYPES[dtype], *partial)  # config w/o partials
            triton_tar._launch((1, 1), *tensors, params, tiles, None, *_partial_tensors(value_class, *partial))
            specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
        for value_class, (config, dtype) in itertools.product(value_classes, () if profiled else
                                                              reachable_row_max_configs()):
            params = make_params(VALUE_CLASSES[value_class][0][3], sigma=2.0)
            tensors = [_representative_tensor(DTYPES[dtype], value_class) for _ in range(2)]
            triton_tar._launch_row_max((1, 1), *tensors, _representative_rows(value_class), params, config)
            specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
        for value_class, (config, mode, dtype), strength in itertools.product(
                value_classes, reachable_configs(), STRENGTHS):
            if dtype not in BACKWARD_DTYPES:  # the training forward (reachable_training_forward_configs)
                continue
            params = _params(value_class, profiled, strength, mode)
            tensors = [_representative_tensor(DTYPES[dtype], value_class) for _ in range(4)]
            tiles = triton_tar.training_forward_config(config, params, DTYPES[dtype])
            triton_tar._launch((1, 1), *tensors, params, tiles, _representative_tensor(torch.float32, value_class))
            specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
        for value_class, (config, mode, dtype), strength in itertools.product(
                value_classes, reachable_backward_configs(profiled), STRENGTHS):
            params = _params(value_class, profiled, strength, mode)
            tensors = [_representative_tensor(DTYPES[dtype], value_class) for _ in range(4)]
            saved = (tensors[0], _representative_tensor(torch.float32, value_class))  # the forward is enumerated above
            triton_tar_backward.backward(*tensors, params, config=config, residuals=saved)
            while calls:
                specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
        for value_class, (config, backward_config, mode, dtype) in itertools.product(
                value_classes, reachable_framed_configs(profiled)):
            params = _params(value_class, profiled, mode=mode, **FRAMED_LAYOUT)
            tensors = [_representative_tensor(DTYPES[dtype], value_class) for _ in range(4)]
            for partial in PARTIAL_RESULTS:
                tiles = triton_tar.partial_block_config(config, params, DTYPES[dtype], *partial)
                triton_tar._launch((1, 1), *tensors, params, tiles, None, *_partial_tensors(value_class, *partial))
                specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
            if dtype in BACKWARD_DTYPES:  # the training forward (saving the row statistics), then the backward
                stats = _representative_tensor(torch.float32, value_class)
                tiles = triton_tar.training_forward_config(config, params, DTYPES[dtype])
                triton_tar._launch((1, 1), *tensors, params, tiles, stats)
                specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
                saved = (tensors[0], _representative_tensor(torch.float32, value_class))
                triton_tar_backward.backward(*tensors, params, config=backward_config, residuals=saved)
                while calls:
                    specs.add(_spec_from_call(dtype, value_class, *calls.pop()))
    return specs


# ---------------------------------------------------------------------------------------------- realistic calls
# (heads, head_dim) of the temporal attention layers of released models: AnimateDiff's motion modules on SD 1.5
# (320/640/1280 channels, 8 heads) and ModelScope/zeroscope's UNet3D temporal transformers (head_dim 64).
REALISTIC_MODELS: dict[str, tuple[tuple[int, int], ...]] = {
    "animatediff": ((8, 40), (8, 80), (8, 160)),
    "modelscope": ((5, 64), (10, 64), (20, 64)),
}
REALISTIC_FRAMES: tuple[int, ...] = (14, 16, 24, 25, 64, 128, 256)
# Video transformers' 3D self-attention at released resolutions: (heads, head_dim, tokens, tokens per frame, text
# tokens, text first). Wan 2.1 480p 81 frames: 21 latent frames of 30 x 52 patches; CogVideoX-5b 49 frames 480x720:
# 226 text tokens, then 13 x 30 x 45; LTX-Video 121 frames 704x480: 16 x 22 x 15; HunyuanVideo 129 frames 544x960:
# 33 x 34 x 60, then 256 text tokens.
REALISTIC_DIT: dict[str, tuple[int, int, int, int, int, bool]] = {
    "wan-1.3b": (12, 128, 21 * 1560, 1560, 0, False),
    "wan-14b": (40, 128, 21 * 1560, 1560, 0, False),
    "cogvideox-5b": (48, 64, 226 + 13 * 1350, 1350, 226, True),
    "ltx-video": (32, 64, 16 * 330, 330, 0, False),
    "hunyuanvideo": (24, 128, 33 * 2040 + 256, 2040, 256, False),
}
# Context parallelism's Ring over this many ranks: each rank's query chunk meets every key chunk, and biases with the
# row max over all of them (relative mode: a row-max pass first).
REALISTIC_RING_RANKS = 8
# How q, k, v reach the op: views of separate to_q/to_k/to_v outputs (the processor), or of one fused QKV output.
LAYOUTS: tuple[str, ...] = ("projection", "fused_qkv")
REALISTIC_ARCHS: tuple[int, ...] = (80, 86, 89, 90)
REALISTIC = "realistic"  # the value_class of a Spec enumerated from realistic calls


def realistic_tensors(layout: str, frames: int, heads: int, head_dim: int, dtype: torch.dtype,
                      batch: int = 2) -> tuple[torch.Tensor, ...]:
    """(q, k, v, out) as a real call has them, storage-free (meta): (batch·H·W, frames, heads, head_dim) views of a
    (batch·H·W, frames, channels) projection, or of one (…, 3·channels) fused QKV projection; the output is the
    contiguous tensor the launcher allocates."""
    channels = heads * head_dim
    if layout == "projection":
        q, k, v = (torch.empty((batch, frames, channels), dtype=dtype, device="meta").unflatten(-1, (heads, head_dim))
                   for _ in range(3))
    elif layout == "fused_qkv":
        qkv = torch.empty((batch, frames, 3 * channels), dtype=dtype, device="meta")
        q, k, v = (qkv[..., i * channels:(i + 1) * channels].unflatten(-1, (heads, head_dim)) for i in range(3))
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    return q, k, v, torch.empty((batch, frames, heads, head_dim), dtype=dtype, device="meta")


def realistic_specialisations() -> dict[Spec, list[str]]:
    """The forward compiles that the realistic calls trigger (REALISTIC_MODELS x REALISTIC_FRAMES x LAYOUTS x DTYPES x
    modes, each with its ``block_config`` and the flags ``_launch`` passes for those very tensors), each mapped to the
    calls (labels) that trigger it. Deterministic order."""
    found: dict[Spec, list[str]] = {}
    with _recording_kernels() as calls:
        for model, shapes in REALISTIC_MODELS.items():
            for (heads, head_dim), frames, layout, dtype, mode in itertools.product(
                    shapes, REALISTIC_FRAMES, LAYOUTS, DTYPES, MODES):
                q, k, v, out = realistic_tensors(layout, frames, heads, head_dim, DTYPES[dtype])
                params = make_params(head_dim, sigma=2.0, strength=1.0, mode=mode)
                config = block_config(frames, frames, head_dim, mode, DTYPES[dtype])
                triton_tar._launch((1,), q, k, v, out, params, config)
                spec = _spec_from_call(dtype, REALISTIC, *calls.pop())
                found.setdefault(spec, []).append(f"{model} {heads}x{head_dim} F={frames} {layout} {dtype} {mode}")
        for (model, (heads, head_dim, tokens, per_frame, text, text_first)), dtype, mode in itertools.product(
                REALISTIC_DIT.items(), DTYPES, MODES):
            q, k, v, out = realistic_tensors("projection", tokens, heads, head_dim, DTYPES[dtype], batch=1)
            params = make_params(head_dim, sigma=2.0, strength=1.0, mode=mode, tokens_per_frame=per_frame,
                                 video_start=text if text_first else 0, video_tokens=tokens - text)
            config = block_config(tokens, tokens, head_dim, mode, DTYPES[dtype], framed=True)
            triton_tar._launch((1,), q, k, v, out, params, config)
            spec = _spec_from_call(dtype, REALISTIC, *calls.pop())
            found.setdefault(spec, []).append(f"{model} {heads}x{head_dim} L={tokens} {dtype} {mode}")
            if text and not text_first:  # HunyuanVideo's text mask on every call: the op's varlen keys
                lengths = torch.empty((1,), dtype=torch.int64, device="meta")
                triton_tar._launch((1,), q, k, v, out, params, config, k_lengths=lengths)
                found.setdefault(_spec_from_call(dtype, REALISTIC, *calls.pop()), []).append(
                    f"{model} {heads}x{head_dim} L={tokens} {dtype} {mode} varlen")
            # a Ring chunk pairing (query chunk 3 with key chunk 5: both begin inside a frame)
            chunk = -(-tokens // REALISTIC_RING_RANKS)
            q, k, v, out = realistic_tensors("projection", chunk, heads, head_dim, DTYPES[dtype], batch=1)
            params = make_params(head_dim, sigma=2.0, strength=1.0, mode=mode, tokens_per_frame=per_frame,
                                 video_start=text if text_first else 0, video_tokens=tokens - text,
                                 q_token_offset=3 * chunk, k_token_offset=5 * chunk)
            rows = torch.empty((1, chunk, heads), dtype=torch.float32, device="meta")
            config = triton_tar.partial_block_config(
                block_config(chunk, chunk, head_dim, mode, DTYPES[dtype], framed=True), params, DTYPES[dtype],
                mode == "relative", True)
            ring = f"ring/{REALISTIC_RING_RANKS} {dtype} {mode}"
            triton_tar._launch((1,), q, k, v, out, params, config, None, rows if mode == "relative" else None, rows)
            found.setdefault(_spec_from_call(dtype, REALISTIC, *calls.pop()), []).append(
                f"{model} {heads}x{head_dim} L={chunk} {ring}")
            if mode == "relative":  # its row-max pass, with the tiles triton_tar.row_max picks
                triton_tar._launch_row_max((1,), q, k, rows, params, row_max_block_config(chunk, head_dim,
                                                                                          DTYPES[dtype]))
                found.setdefault(_spec_from_call(dtype, REALISTIC, *calls.pop()), []).append(
                    f"{model} {heads}x{head_dim} rows={chunk} {ring} row_max")
    return dict(sorted(found.items(), key=lambda item: _spec_key(item[0])))


def specialise_value(value: object) -> tuple[str, int | None, bool]:
    """How triton 3.x specialises one non-constexpr argument: (type, constexpr value or None, divisible by 16).

    Pointers (tensors) are typed by dtype and divisible when their address is 16-byte aligned; ints equal to 1
    become the constexpr 1, other ints are i32 (i64 beyond 32 bits) and divisible when a multiple of 16; floats
    are fp32 and never specialised.
    """
    if isinstance(value, torch.Tensor):
        return f"*{_TRITON_TYPES[value.dtype]}", None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        raise TypeError("bool kernel arguments are not expected by this kernel")
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"unexpected kernel argument type {type(value).__name__}")


def _config_key(config: BlockConfig) -> tuple[int, ...]:
    return (config.block_d, config.block_n, config.block_m, config.two_pass, config.num_warps, config.num_stages)


def _spec_key(spec: Spec) -> tuple[object, ...]:
    return (list(KERNELS).index(spec.kernel), [*VALUE_CLASSES, REALISTIC].index(spec.value_class),
            list(DTYPES).index(spec.dtype), _config_key(spec.config), spec.variant, spec.constexprs)


def _representative_tensor(dtype: torch.dtype, value_class: str = "plain") -> torch.Tensor:
    """A storage-free (meta) tensor of the value class's shape and strides; its data_ptr() is 0 (aligned)."""
    shape, strides = VALUE_CLASSES[value_class]
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


def _representative_rows(value_class: str = "plain") -> torch.Tensor:
    """A storage-free contiguous fp32 (batch, Lq, heads) tensor: a row max or lse of the value class's call."""
    return torch.empty(VALUE_CLASSES[value_class][0][:3], dtype=torch.float32, device="meta")


def _partial_tensors(value_class: str, given: bool, lse: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row_max, lse) for ``_launch``: a row max when ``given``, an lse output ((batch, heads, Lq), as the launcher
    allocates it) when ``lse``, else None."""
    rows = _representative_rows(value_class)
    return (rows if given else None, rows.transpose(1, 2).contiguous() if lse else None)


Call = tuple[str, tuple[object, ...], dict[str, object]]


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records (name, args, kwargs) instead of
    launching."""

    def __init__(self, name: str, calls: list[Call], original: object) -> None:
        self.name, self.calls = name, calls
        self.fn = original.fn  # the Python function: its parameter names stay readable while recording

    def __getitem__(self, grid: object):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


@contextmanager
def _recording_kernels() -> Iterator[list[Call]]:
    """Swap every kernel of :data:`KERNELS` for a :class:`_Recorder` (restored on exit); yields the calls."""
    calls: list[Call] = []
    with contextlib.ExitStack() as stack:
        for name, module in KERNELS.items():
            stack.enter_context(mock.patch.object(module, name, _Recorder(name, calls, getattr(module, name))))
        yield calls


def _kernel_arg_names(kernel: str = FORWARD_KERNEL) -> list[str]:
    """The kernel's parameter names (works for a JITFunction and an interpreted one)."""
    return list(inspect.signature(getattr(KERNELS[kernel], kernel).fn).parameters)


def _spec_from_call(dtype: str, value_class: str, kernel: str, args: tuple[object, ...],
                    kwargs: dict[str, object]) -> Spec:
    """Turn one recorded launch of ``kernel`` into a Spec."""
    names = _kernel_arg_names(kernel)
    # every kernel is @triton.jit(do_not_specialize=NOT_SPECIALIZED); read from the list itself, since neither the
    # recorder standing in for a kernel nor an interpreted kernel carries it
    unspecialised = set(triton_tar.NOT_SPECIALIZED) & set(names)
    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps"), kwargs.pop("num_stages")
    signature, specialised, divisible = [], [], []
    for name, value in zip(names, args, strict=False):
        ty, const, div = specialise_value(value)
        if name in unspecialised:  # @triton.jit(do_not_specialize=...): typed only, no value hints
            ty, const, div = ("i32" if -(2**31) <= value < 2**31 else "i64"), None, False
        signature.append((name, ty))
        if const is not None:
            specialised.append((name, const))
        if div:
            divisible.append(name)
    signature += [(name, "constexpr") for name in names[len(args):]]
    config = BlockConfig(kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"],
                         two_pass=bool(kwargs.get("TWO_PASS", False)), num_warps=num_warps, num_stages=num_stages)
    constexprs = tuple((name, kwargs[name]) for name in names if name in kwargs)
    return Spec(dtype, value_class, config, constexprs, tuple(signature), tuple(specialised), tuple(divisible),
                kernel)


# ---------------------------------------------------------------------------------------- quick check, stamp
def kernel_family(spec: Spec) -> tuple[str, str, str]:
    """(kernel, variant, precision): specialisations of one family share their code path and differ in tiles.
    fp16 and bf16 are one precision (the same code and tiles); fp32 runs IEEE dots without tensor cores."""
    return spec.kernel, spec.variant, "fp32" if spec.dtype == "fp32" else "fp16/bf16"


def _tile_per_thread(spec: Spec) -> tuple[int, ...]:
    """Elements of the S, Q, K and V tiles per thread (the register pressure a tile brings), then a fixed order."""
    cfg = spec.config
    elements = cfg.block_m * cfg.block_n + (cfg.block_m + 2 * cfg.block_n) * cfg.block_d
    return (elements // (32 * cfg.num_warps), -list(DTYPES).index(spec.dtype), *_config_key(cfg))


def quick_specialisations(specs: Sequence[Spec]) -> list[Spec]:
    """One spec per :func:`kernel_family`: the one with the largest tile per thread, the most likely to spill.
    In ``specs`` order."""
    chosen: dict[tuple[str, str, str], Spec] = {}
    for spec in specs:
        family = kernel_family(spec)
        if family not in chosen or _tile_per_thread(spec) > _tile_per_thread(chosen[family]):
            chosen[family] = spec
    picked = set(chosen.values())
    return [spec for spec in specs if spec in picked]


def kernel_source_files() -> list[Path]:
    """The files whose content decides what the check compiles and how it judges it: every Triton module of the
    backends (kernels, launchers and their shared pieces), the host-side contract the launchers use, and this
    checker."""
    backends = Path(inspect.getfile(triton_tar)).resolve().parent
    modules = {*KERNELS.values(), sys.modules[make_params.__module__], sys.modules[__name__]}
    files = {Path(inspect.getfile(module)).resolve() for module in modules}  # type: ignore[arg-type]
    return sorted(files | set(backends.glob("triton_*.py")))


def stamp_key(options: Sequence[str]) -> str:
    """Hash of the kernel sources, triton's and torch's versions and the check's options."""
    import hashlib

    import triton

    digest = hashlib.sha256()
    for path in kernel_source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"triton {triton.__version__} torch {torch.__version__}\0".encode())
    digest.update(" ".join(options).encode())
    return digest.hexdigest()[:20]


def stamp_path(options: Sequence[str]) -> Path:
    """Where a passing run with ``options`` on these sources leaves its stamp (``VSTAR_KERNELS_CACHE`` moves the
    folder, as for the extension's build cache)."""
    from ..backends.extension_build import cache_root

    return cache_root() / "static-check" / f"{stamp_key(options)}.passed"


def _stamp_options(args: argparse.Namespace, archs: Sequence[int], quick: bool | None = None) -> list[str]:
    """The options that change what is compiled or judged, normalised (not --jobs, --csv, --cache-dir); ``quick``
    overrides ``args.quick``."""
    return [f"archs={','.join(map(str, archs))}", f"value_classes={','.join(dict.fromkeys(args.value_classes))}",
            f"realistic={args.realistic}", f"quick={args.quick if quick is None else quick}",
            *(["profiles"] if args.profiles else [])]


# ------------------------------------------------------------------------------------------------ compiling
@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA occupancy calculator)."""

    max_warps: int
    max_blocks: int
    shared: int  # bytes of shared memory per SM available to blocks
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    reserved_shared: int = 1024  # the runtime's shared memory per block


SM_LIMITS: dict[int, SMLimits] = {
    75: SMLimits(32, 16, 65_536), 80: SMLimits(64, 32, 167_936), 86: SMLimits(48, 16, 102_400),
    89: SMLimits(48, 24, 102_400), 90: SMLimits(64, 32, 233_472),
}
MIN_WARPS_PER_SM = 12  # below this an SM cannot hide the latency of a memory-bound kernel


def warps_per_sm(registers: int, shared: int, warps: int, arch: int) -> int:
    """Resident warps per SM of a kernel using ``registers`` per thread, ``shared`` bytes per block and ``warps``
    per block: the minimum over the register file, shared memory, the warp slots and the block slots."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // lim.register_unit) * lim.register_unit
    by_registers = (lim.registers // regs_per_warp) // warps
    by_shared = lim.shared // (shared + lim.reserved_shared)
    blocks = min(lim.max_blocks, by_registers, by_shared, lim.max_warps // warps)
    return blocks * warps


@dataclass(frozen=True)
class SassProfile:
    """Counts of the SASS instructions the check judges (``cuobjdump -sass`` of the cubin)."""

    narrow_global: int  # 8/16-bit global loads and stores (LDG/STG .U16, .S16, .U8, .S8)
    wide_global: int  # 128-bit global loads and stores (LDG.E.128, LDGSTS.*.128, STG.E.128)
    mma: int  # tensor-core instructions: HMMA (mma.sync) and HGMMA (wgmma)
    local: int  # LDL/STL: local memory
    wgmma: int = 0  # of ``mma``, the sm_90 warpgroup instructions (HGMMA)


_NARROW = re.compile(r"\b(?:LDG|STG)(?:\.E)?(?:\.\w+)*?\.(?:U16|S16|U8|S8)\b")
_WIDE = re.compile(r"\b(?:LDG|STG|LDGSTS)(?:\.\w+)*?\.128\b")
_MMA = re.compile(r"\b(?:HMMA|HGMMA)\b")
_LOCAL = re.compile(r"\b(?:LDL|STL)\b")


def sass_profile(sass: str) -> SassProfile:
    """Count the judged instructions in SASS text."""
    return SassProfile(len(_NARROW.findall(sass)), len(_WIDE.findall(sass)), len(_MMA.findall(sass)),
                       len(_LOCAL.findall(sass)), len(re.findall(r"\bHGMMA\b", sass)))


@dataclass(frozen=True)
class Usage:
    """Resources of one compiled kernel (bytes unless named otherwise)."""

    registers: int  # per thread, from the cubin
    shared: int  # static shared memory in the cubin
    dynamic_shared: int  # triton's metadata.shared, requested at launch
    local: int
    stack: int
    spill_stores: int
    spill_loads: int
    ptxas_registers: int  # from the ptxas -v report; must equal ``registers``
    sass: SassProfile | None = None
    warps_per_sm: int = 0  # resident warps per SM (:func:`warps_per_sm`)


@dataclass(frozen=True)
class Row:
    """The result for one (spec, arch): ``usage`` when it compiled, else ``error``."""

    arch: int
    spec: Spec
    usage: Usage | None
    error: str | None = None

    def label(self) -> str:
        """E.g. "sm_80 fp16 plain relative M=16 N=64 D=64 warps=2"."""
        spec, cfg = self.spec, self.spec.config
        return (f"sm_{self.arch} {spec.dtype} {spec.value_class} {spec.variant} M={cfg.block_m} N={cfg.block_n} "
                f"D={cfg.block_d} warps={cfg.num_warps}")

    def problems(self) -> list[str]:
        """Why this row fails the check (empty when it passes)."""
        if self.usage is None:
            return [f"compile error: {self.error}"]
        u, out = self.usage, []
        if u.spill_stores or u.spill_loads:
            out.append(f"spills {u.spill_stores} B stores / {u.spill_loads} B loads at {u.registers} registers")
        if u.local:
            out.append(f"uses {u.local} B local memory")
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and u.dynamic_shared > limit:
            out.append(f"needs {u.dynamic_shared} B shared memory > {limit} B per block on sm_{self.arch}")
        if u.ptxas_registers != u.registers:
            out.append(f"ptxas -v reports {u.ptxas_registers} registers, cubin {u.registers}")
        if u.sass is not None:
            out += self._sass_problems(u.sass, u.warps_per_sm)
        return out

    def _sass_problems(self, sass: SassProfile, warps: int) -> list[str]:
        """The SASS rules: 16-bit global accesses where every row is 16-byte aligned (the launcher passed ALIGN > 1),
        local memory, no tensor-core instruction in an fp16/bf16 kernel; and, for realistic calls (the shapes the
        tiles are tuned for), fewer than MIN_WARPS_PER_SM resident warps per SM."""
        out = []
        flags = dict(self.spec.constexprs)
        if sass.narrow_global and flags.get("ALIGN", 1) > 1:
            out.append(f"{sass.narrow_global} 16-bit global loads/stores although rows are 16-byte aligned")
        if sass.local:
            out.append(f"{sass.local} local-memory instructions (LDL/STL)")
        dotless = self.spec.kernel == "_tar_bwd_prep" and not flags["RELATIVE"]  # D = rowsum(dO * O): no dot
        if self.spec.dtype in ("fp16", "bf16") and not sass.mma and not dotless:
            out.append("no HMMA/HGMMA instruction in a half-precision kernel")
        if self.spec.value_class == REALISTIC and warps < MIN_WARPS_PER_SM:
            out.append(f"{warps} resident warps per SM < {MIN_WARPS_PER_SM}")
        return out


def compile_spec(spec: Spec, arch: int, ptxas_log: list[str] | None = None):
    """AOT-compile ``spec`` for ``sm_<arch>`` with ``triton.compile``; returns the CompiledKernel.

    With a list as ``ptxas_log``, the ``ptxas -v`` output of triton's own ptxas run, the one that wrote the cubin, is
    appended to it (triton's TRITON_DUMP_PTXAS_LOG knob, which prints it; the print is captured). On a hit in the
    triton cache no ptxas runs and the appended text has no ptxas report. Raises RuntimeError if the kernel is an
    interpreted function (TRITON_INTERPRET=1 at import).
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(KERNELS[spec.kernel], spec.kernel)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"the kernel is a {type(kernel).__name__}, not a JITFunction: unset TRITON_INTERPRET")
    constexprs = {**dict(spec.specialised), **dict(spec.constexprs)}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    source = ASTSource(fn=kernel, signature=dict(spec.signature), constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    if ptxas_log is None:
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    printed = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
            knobs.nvidia.dump_ptxas_log = True  # not part of triton's cache key: the same compile either way
            return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        ptxas_log.append(printed.getvalue())


def measure(spec: Spec, arch: int) -> Row:
    """Compile ``spec`` for ``arch`` and read its resource usage; never raises (errors land in the Row)."""
    try:
        log: list[str] = []
        compiled = compile_spec(spec, arch, log)
        with tempfile.TemporaryDirectory(prefix="vstar_static_") as workdir:
            usage = _usage(compiled, arch, Path(workdir), spec.kernel, "".join(log))
        return Row(arch, spec, usage)
    except Exception as exc:
        return Row(arch, spec, None, f"{type(exc).__name__}: {_first_line(str(exc))}")


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _usage(compiled, arch: int, workdir: Path, kernel: str = FORWARD_KERNEL, ptxas_log: str = "") -> Usage:
    """The resources of ``compiled``. Spills come from ``ptxas_log``, the ``ptxas -v`` report of the compile itself
    (:func:`compile_spec`); without one (a triton cache hit) ptxas is re-run on the PTX as triton runs it."""
    from triton import knobs

    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    res = _cubin_resources(cubin, kernel)
    report = _parse_ptxas_report(ptxas_log)
    regs, stores, loads = report if report is not None else _ptxas_spills(
        compiled.asm["ptx"], arch, bool(compiled.metadata.enable_fp_fusion), workdir)
    sass = sass_profile(_run_tool([knobs.nvidia.cuobjdump.path, "-sass", str(cubin)]))
    shared = res["SHARED"] + int(compiled.metadata.shared)
    return Usage(registers=res["REG"], shared=res["SHARED"], dynamic_shared=int(compiled.metadata.shared),
                 local=res["LOCAL"], stack=res.get("STACK", 0), spill_stores=stores, spill_loads=loads,
                 ptxas_registers=regs, sass=sass,
                 warps_per_sm=warps_per_sm(res["REG"], shared, int(compiled.metadata.num_warps), arch))


def _run_tool(cmd: list[str]) -> str:
    """Run a bundled NVIDIA tool; returns stdout + stderr, raises RuntimeError with its output on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc.stdout + proc.stderr


def _cubin_resources(cubin: Path, kernel: str = FORWARD_KERNEL) -> dict[str, int]:
    """REG/SHARED/LOCAL/STACK of ``kernel`` in ``cubin``, from ``cuobjdump --dump-resource-usage``."""
    from triton import knobs

    text = _run_tool([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)])
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", text)
    if match is None:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump output:\n{text}")
    fields = dict(re.findall(r"([A-Z]+):(\d+)", match.group(1)))
    return {key: int(value) for key, value in fields.items()}


def _ptx_target(ptx: str) -> str:
    """The ``.target`` arch of a PTX module, e.g. "sm_90a"."""
    match = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if match is None:
        raise RuntimeError("PTX has no .target line")
    return match.group(1)


def _ptxas_spills(ptx: str, arch: int, fp_fusion: bool, workdir: Path) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``, run as triton runs it for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    fmad = [] if fp_fusion else ["--fmad=false"]
    cmd = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={_ptx_target(ptx)}",
           str(src), "-o", str(workdir / "kernel.o")]
    log = _run_tool(cmd)
    report = _parse_ptxas_report(log)
    if report is None:
        raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
    return report


def _parse_ptxas_report(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output of one kernel; None if it has none."""
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if spills is None or regs is None:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _init_worker(cache_dir: str) -> None:
    """Process-pool initialiser: compile into ``cache_dir`` and silence triton 3.9's FP-fusion default notice."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)


def run_all(specs: Sequence[Spec], archs: Sequence[int], jobs: int, cache_dir: str) -> list[Row]:
    """Measure every (spec, arch) in a spawn-based process pool of ``jobs`` workers; rows in input order."""
    tasks = [(spec, arch) for arch in archs for spec in specs]
    ctx = multiprocessing.get_context("spawn")
    rows: list[Row | None] = [None] * len(tasks)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                                initargs=(cache_dir,)) as pool:
        futures = {pool.submit(measure, spec, arch): i for i, (spec, arch) in enumerate(tasks)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            rows[futures[future]] = future.result()
            if done % 50 == 0 or done == len(tasks):
                print(f"  compiled {done}/{len(tasks)}", file=sys.stderr, flush=True)
    return [row for row in rows if row is not None]


# --------------------------------------------------------------------------------------------------- report
# shared: static shared memory in the cubin; dyn_shared: triton's metadata.shared (requested at launch).
# ld128 / ld16: 128-bit and 16-bit global loads+stores in the SASS; mma: HMMA + HGMMA count, wgmma: HGMMA alone;
# warps/SM: occupancy.
COLUMNS: tuple[str, ...] = ("arch", "dtype", "ints", "variant", "BLOCK_M", "BLOCK_N", "BLOCK_D", "warps", "regs",
                            "shared", "dyn_shared", "local", "stack", "spill_st", "spill_ld", "ld128", "ld16", "mma",
                            "wgmma", "warps/SM", "status")


def row_cells(row: Row) -> list[str]:
    """The table cells of ``row``, in COLUMNS order."""
    cfg, u = row.spec.config, row.usage
    sass = [u.sass.wide_global, u.sass.narrow_global, u.sass.mma, u.sass.wgmma] if u and u.sass else ["-"] * 4
    numbers = ["-"] * 12 if u is None else [
        str(v) for v in (u.registers, u.shared, u.dynamic_shared, u.local, u.stack, u.spill_stores, u.spill_loads,
                         *sass, u.warps_per_sm)]
    status = "ok" if not row.problems() else ("ERROR" if u is None else "FAIL")
    spec = row.spec
    return [f"sm_{row.arch}", spec.dtype, spec.value_class, spec.variant,
            *(str(n) for n in (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps)), *numbers, status]


def format_table(rows: Sequence[Row]) -> str:
    """Plain aligned text, one line per row, with a header."""
    table = [list(COLUMNS), *(row_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in table)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """The table as CSV, plus a ``problems`` column."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*COLUMNS, "problems"])
        for row in rows:
            writer.writerow([*row_cells(row), "; ".join(row.problems())])


def summary(rows: Sequence[Row], archs: Sequence[int]) -> list[str]:
    """Max registers and dynamic shared memory per arch, then one line per failing row."""
    lines = []
    for arch in archs:
        usages = [row.usage for row in rows if row.arch == arch and row.usage is not None]
        if usages:
            lines.append(f"sm_{arch}: max registers {max(u.registers for u in usages)}, "
                         f"max dynamic shared {max(u.dynamic_shared for u in usages)} B")
    for row in rows:
        for problem in row.problems():
            lines.append(f"FAIL {row.label()}: {problem}")
    return lines


# ------------------------------------------------------------------------------------------------------ CLI
def toolchain_problem() -> str | None:
    """None when an AOT compile can run here, else why not (interpreter mode, no triton / nvidia tools)."""
    if triton_tar.triton is None:
        return triton_tar._IMPORT_ERROR
    from triton import knobs
    from triton.runtime.jit import JITFunction

    if knobs.runtime.interpret or not isinstance(triton_tar._tar_attention_fwd, JITFunction):
        return ("TRITON_INTERPRET=1 is set (or was when vstar_kernels was imported): the kernel is an interpreted "
                "function that triton.compile cannot compile. Run without it: "
                "env -u TRITON_INTERPRET python -m vstar_kernels.checks.static_check")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tools = [knobs.nvidia.cuobjdump.path, get_ptxas(80).path, get_ptxas(90).path]
    except Exception as exc:
        return f"triton's NVIDIA backend tools are unavailable ({type(exc).__name__}: {exc})"
    missing = [tool for tool in tools if not Path(tool).is_file()]
    return f"missing NVIDIA tools: {missing}" if missing else None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vstar_kernels.checks.static_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 80 90; with --realistic 80 86 89 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all CPUs)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH as CSV")
    parser.add_argument("--value-classes", nargs="+", default=["plain"], choices=list(VALUE_CLASSES),
                        help="representative argument values (see the module docstring); default: plain")
    parser.add_argument("--realistic", action="store_true",
                        help="check the compiles of realistic calls instead (AnimateDiff / ModelScope head shapes, "
                             "projection and fused-QKV layouts; default archs 80 86 89 90)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="triton cache to compile into (reruns hit it); default: a temporary directory, removed "
                             "afterwards (the full run writes ~0.5 GB)")
    parser.add_argument("--quick", action="store_true",
                        help="one specialisation per kernel family (kernel, variant, precision: the largest tile per "
                             "thread), about 100 compiles: the test suite's fast check")
    parser.add_argument("--profiles", action="store_true",
                        help="compile the frame-distance profile kernels instead (one composed profile per kernel "
                             "family and head_dim bucket, on the profile calls' tiles)")
    parser.add_argument("--stamp", action="store_true",
                        help="skip when this check already passed with these options on the same kernel sources, "
                             "triton and torch (a stamp under ~/.cache/vstar-kernels/static-check); write the stamp "
                             "when it passes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every specialisation compiles without spills, 1 otherwise, 2 if it cannot run."""
    args = _parse_args(argv)
    problem = toolchain_problem()
    if problem is not None:
        print(f"static_check: cannot run: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    stamp = None
    if args.stamp:  # before the enumeration, which takes a while
        stamp_archs = list(dict.fromkeys(args.arch or (REALISTIC_ARCHS if args.realistic else ARCHS)))
        stamp = stamp_path(_stamp_options(args, stamp_archs))
        # --quick compiles a subset of the full check's rows (the same options without --quick): its pass covers it
        covering = [stamp, *([stamp_path(_stamp_options(args, stamp_archs, quick=False))] if args.quick else [])]
        passed = next((path for path in covering if path.is_file()), None)
        if passed is not None:
            which = "the full check" if passed != stamp else "this check"
            print(f"static_check: {which} passed before with these options on the same kernel sources, triton and "
                  f"torch ({passed}); skipped")
            return 0
    if args.realistic:
        calls = realistic_specialisations()
        specs = list(calls)
        print(f"{sum(map(len, calls.values()))} realistic calls -> {len(specs)} distinct compiles")
    else:
        specs = reachable_specialisations(list(dict.fromkeys(args.value_classes)), profiled=args.profiles)
    archs = list(dict.fromkeys(args.arch or (REALISTIC_ARCHS if args.realistic else ARCHS)))
    if args.quick:
        families = len({kernel_family(spec) for spec in specs})
        specs = quick_specialisations(specs)
        print(f"quick: {families} kernel families, one specialisation each (the largest tile per thread)")
    print(f"{len(specs)} specialisations x {len(archs)} arch(s) = {len(specs) * len(archs)} compiles, "
          f"{args.jobs} job(s)", flush=True)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="vstar_static_cache_")
    try:
        rows = run_all(specs, archs, args.jobs, cache_dir)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(format_table(rows))
    print("\n".join(summary(rows, archs)))
    if args.csv:
        write_csv(rows, args.csv)
    failing = sum(1 for row in rows if row.problems())
    print(f"{len(rows)} rows, {failing} failing, {time.perf_counter() - start:.0f} s wall")
    if stamp is not None and stamp != stamp_path(_stamp_options(args, archs)):
        print("static_check: a kernel source changed during the check; no stamp written", file=sys.stderr)
    elif stamp is not None and not failing and rows:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(f"{len(rows)} rows, 0 failing, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            print(f"stamp written: {stamp}")
        except OSError as exc:  # a read-only cache: the check passed all the same
            print(f"static_check: no stamp written ({exc})", file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
