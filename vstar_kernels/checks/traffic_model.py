"""HBM traffic model of the GPU forward kernels: bytes moved per call, from the launch configuration alone.

Run ``python -m vstar_kernels.checks.traffic_model [--gpu H100|A100] [--mode relative|absolute] [--markdown]`` for
the table in README.md. No GPU is needed: this is a model, and its figures are marked as such wherever they are shown.

What it models. A call is ``slices`` = batch·heads independent (batch, head) slices of Lq query and Lk key frames.
The launcher cuts each slice into programs (Triton: ``block_config``'s BLOCK_M query rows, one program each; CUDA
fallback: blocks of ``kWarps`` = 4 rows) and launches them in one order (:data:`ORDERS`): "slice-major", the order of
both kernels since issue 15 (``slice_program`` in the Triton kernel, the work-item loop in the .cu), or
"block-major", the order before it (grid (batch·heads, blocks) with axis 0 fastest). Every program reads its own
query rows, the whole K of its slice (twice in relative mode when the key row does not fit one tile: the two-pass
row max) and the whole V, and writes its output rows (plus two fp32 numbers per row when it saves statistics for
the backward).

The memory system is an LRU cache of ``l2_fraction`` x the GPU's L2 (default half: the H100's L2 is two partitions
and the kernel does not own it) in front of HBM, at the granularity of one tensor of one slice. Programs run in waves
of ``resident`` programs (the SMs times the programs each SM holds): a wave first makes every program's first K
sweep, then every program's remaining reads, so a two-pass program's second K sweep competes with its whole wave.
Writes go to HBM once. The 32-byte sectors a row shares with the neighbouring head's row are counted once: in both
orders neighbouring heads are neighbouring slices, so they run together.

A frame-distance profile (:func:`profile_call`) adds its tables, read once (they stay in L2 and L1 for every
program), and a masking one skips the key tiles outside each query block's window (``triton_tar.profile_window``):
its FLOPs fall with the visited share of the tiles (``tile_share``); its bytes do not (the programs of one slice
together still read all of K and V, from L2 after the first).

The minimum is Q + K + V + O, each read or written once (plus a profile's tables). :func:`model_call` returns both
and their ratio; the test suite holds the ratio of both kernels at <= 1.25 for every realistic call with Lq = Lk <= 256.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..backends.triton_tar import (
    BlockConfig,
    block_config,
    partial_block_config,
    profile_block_config,
    profile_tiles_skipped,
    runs_framed,
)
from ..contract import TARParams

ORDERS: tuple[str, ...] = ("slice-major", "block-major")
BACKENDS: tuple[str, ...] = ("triton", "cuda")
CUDA_ROWS_PER_BLOCK = 4  # csrc/tar_attention_cuda.cu kWarps: one warp per query row
CUDA_BLOCKS_PER_SM = 4  # its __launch_bounds__(128, 4)


@dataclass(frozen=True)
class GPUModel:
    """What the model needs of a GPU (datasheet figures)."""

    name: str
    l2_bytes: int
    hbm_bytes_per_s: float
    sms: int
    tensor_flops: float  # tensor-core fp16/bf16 FLOP/s, dense
    fma_flops: float  # fp32 FMA-pipe FLOP/s (IEEE fp32 dots; the CUDA fallback, which uses no tensor cores)


GPUS: dict[str, GPUModel] = {
    "H100": GPUModel("H100 SXM5", 50 * 2**20, 3.35e12, 132, 989e12, 67e12),
    "A100": GPUModel("A100 SXM4 80GB", 40 * 2**20, 2.039e12, 108, 312e12, 19.5e12),
}


@dataclass(frozen=True)
class CallShape:
    """One call of the op: batch·heads slices of (Lq, Lk) frames, head_dim channels, an element size."""

    slices: int
    len_q: int
    len_k: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    mode: str = "relative"
    save_stats: bool = False
    table_bytes: int = 0  # a frame-distance profile's tables, read once per call
    tile_share: float = 1.0  # the share of (query block, key tile) pairs the kernel visits (a profile's window)
    profiled: bool = False  # a frame-distance profile: the launcher runs its tiles (triton_tar.profile_block_config)

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def row_bytes(self) -> int:
        return self.head_dim * self.element_bytes

    def minimum_bytes(self) -> int:
        """Q + K + V + O once each (plus the saved statistics, when the forward saves them)."""
        rows = 2 * (self.len_q + self.len_k)
        stats = 8 * self.len_q if self.save_stats else 0
        return self.slices * (rows * self.row_bytes() + stats) + self.table_bytes


@dataclass(frozen=True)
class Program:
    """One program (Triton) or block (CUDA): its slice, first query row, row count and K sweeps."""

    slice: int
    first_row: int
    rows: int
    k_sweeps: int


@dataclass(frozen=True)
class Traffic:
    """The model's answer for one call."""

    minimum: int
    modelled: int
    flops: int
    tensor_cores: bool  # whether the dots run on tensor cores (Triton fp16/bf16) or the FMA pipe

    @property
    def ratio(self) -> float:
        return self.modelled / self.minimum

    def seconds(self, gpu: GPUModel) -> float:
        """max(modelled bytes at the HBM peak, FLOPs at the peak of the pipe the dots run on)."""
        flops = gpu.tensor_flops if self.tensor_cores else gpu.fma_flops
        return max(self.modelled / gpu.hbm_bytes_per_s, self.flops / flops)

    def hbm_peak_fraction(self, gpu: GPUModel) -> float:
        """The minimum bytes over :meth:`seconds`, as a fraction of the HBM peak: what a kernel with this traffic
        and no other loss would reach."""
        return self.minimum / self.seconds(gpu) / gpu.hbm_bytes_per_s


def programs(call: CallShape, rows_per_program: int, two_pass: bool, order: str = "slice-major") -> Iterator[Program]:
    """The programs of ``call`` in launch order."""
    blocks = -(-call.len_q // rows_per_program)
    sweeps = 2 if two_pass else 1
    if order == "slice-major":
        pairs = ((s, b) for s in range(call.slices) for b in range(blocks))
    elif order == "block-major":
        pairs = ((s, b) for b in range(blocks) for s in range(call.slices))
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    for s, b in pairs:
        yield Program(s, b * rows_per_program, min(rows_per_program, call.len_q - b * rows_per_program), sweeps)


def launch_shape(call: CallShape, backend: str, config: BlockConfig | None = None) -> tuple[int, bool, int]:
    """(rows per program, whether K is swept twice, resident programs per SM) of ``backend`` for ``call``."""
    if backend == "triton":
        cfg = config or block_config(call.len_q, call.len_k, call.head_dim, call.mode, call.dtype)
        if config is None and call.profiled:
            cfg = profile_block_config(cfg, call.dtype)
        relative = call.mode == "relative"
        return cfg.block_m, relative and cfg.two_pass, max(1, min(32, 64 // cfg.num_warps))
    if backend == "cuda":  # relative mode always sweeps K first for the row max
        return CUDA_ROWS_PER_BLOCK, call.mode == "relative", CUDA_BLOCKS_PER_SM
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def simulate(call: CallShape, launch: Iterator[Program], cache_bytes: int, resident: int) -> int:
    """HBM bytes of the programs ``launch`` (in order) through an LRU cache of ``cache_bytes``, ``resident`` at a
    time (see the module docstring)."""
    slice_bytes = {"q_row": call.row_bytes(), "kv": call.len_k * call.row_bytes()}
    cache: OrderedDict[tuple[str, int], int] = OrderedDict()
    held = 0
    traffic = 0

    def read(key: tuple[str, int], nbytes: int) -> None:
        nonlocal held, traffic
        if key in cache:
            cache.move_to_end(key)
            return
        traffic += nbytes
        cache[key] = nbytes
        held += nbytes
        while held > cache_bytes and len(cache) > 1:
            held -= cache.popitem(last=False)[1]

    stats_row = 8 if call.save_stats else 0
    wave: list[Program] = []
    for program in [*launch, None]:
        if program is not None:
            wave.append(program)
            if len(wave) < resident:
                continue
        for p in wave:  # every program's first K sweep (single pass: its only one)
            read(("k", p.slice), slice_bytes["kv"])
        for p in wave:
            traffic += p.rows * slice_bytes["q_row"]  # its own query rows: read once, by it alone
            if p.k_sweeps > 1:
                read(("k", p.slice), slice_bytes["kv"])
            read(("v", p.slice), slice_bytes["kv"])
            traffic += p.rows * (slice_bytes["q_row"] + stats_row)  # its output rows (and statistics)
        wave = []
    return traffic


def model_call(call: CallShape, backend: str = "triton", gpu: GPUModel = GPUS["H100"], order: str = "slice-major",
               l2_fraction: float = 0.5, config: BlockConfig | None = None, max_slices: int | None = None) -> Traffic:
    """The modelled HBM traffic of ``call`` on ``backend``. A call of many slices is periodic in them, so only
    ``max_slices`` (default: enough to fill the modelled cache four times over plus 4 waves) are simulated
    and the traffic is scaled to the call."""
    rows, two_pass, per_sm = launch_shape(call, backend, config)
    resident = gpu.sms * per_sm
    cache = int(gpu.l2_bytes * l2_fraction)
    slice_bytes = (call.minimum_bytes() - call.table_bytes) // call.slices
    blocks = -(-call.len_q // rows)
    needed = -(-4 * cache // slice_bytes) + -(-4 * resident // blocks)
    if order == "block-major":  # a slice's blocks are `slices` programs apart: simulate the full reuse distance
        needed += 4 * resident
    simulated = min(call.slices, max_slices or needed)
    part = CallShape(simulated, call.len_q, call.len_k, call.head_dim, call.dtype, call.mode, call.save_stats)
    modelled = simulate(part, programs(part, rows, two_pass, order), cache, resident) * call.slices // simulated
    modelled += call.table_bytes
    sweeps = 3 if two_pass else 2  # QKᵀ once per K sweep, then PV
    flops = round(2 * sweeps * call.slices * call.len_q * call.len_k * call.head_dim * call.tile_share)
    tensor_cores = backend == "triton" and call.dtype != torch.float32
    return Traffic(call.minimum_bytes(), modelled, flops, tensor_cores)


def profile_call(slices: int, len_q: int, len_k: int, head_dim: int, params: TARParams,
                 dtype: torch.dtype = torch.float16) -> CallShape:
    """The :class:`CallShape` of a Triton call with a frame-distance profile (``params.profile``): its fp32 tables
    (read once) and the share of key tiles its window visits with the launcher's tiles (those of a profile call,
    ``triton_tar.partial_block_config``)."""
    profile = params.profile
    tables = [] if profile is None else [t for t in (profile.bias, profile.positive_scale) if t is not None]
    width = max([t.shape[1] for t in tables], default=0)
    config = partial_block_config(block_config(len_q, len_k, head_dim, params.mode, dtype, framed=runs_framed(params)),
                                  params, dtype, False, False)
    share = 1.0 - profile_tiles_skipped(params, len_q, len_k, config) if profile is not None else 1.0
    return CallShape(slices, len_q, len_k, head_dim, dtype, params.mode, table_bytes=4 * width * sum(
        t.shape[0] for t in tables), tile_share=share, profiled=profile is not None)


# ------------------------------------------------------------------------------------------------------ table
# batch·heads of a realistic call: 2 videos (classifier-free guidance) x a 64x64 latent (512x512 pixels) x 8 heads.
REALISTIC_SLICES = 2 * 64 * 64 * 8
TABLE_HEAD_DIMS: tuple[int, ...] = (40, 64, 80, 160)
TABLE_FRAMES: tuple[int, ...] = (16, 24, 64, 128, 256)


def table(gpu: GPUModel, dtype: torch.dtype = torch.float16, mode: str = "relative") -> list[list[str]]:
    """Rows (head_dim, frames, minimum MB, then per backend the modelled ratio and fraction of HBM peak, then the
    Triton ratio in the block-major order of before issue 15) at REALISTIC_SLICES for README.md."""
    out = []
    for head_dim, frames in itertools.product(TABLE_HEAD_DIMS, TABLE_FRAMES):
        call = CallShape(REALISTIC_SLICES, frames, frames, head_dim, dtype, mode)
        row = [str(head_dim), str(frames), f"{call.minimum_bytes() / 1e6:.0f}"]
        for backend in BACKENDS:
            t = model_call(call, backend, gpu)
            row += [f"{t.ratio:.2f}", f"{t.hbm_peak_fraction(gpu):.0%}"]
        row.append(f"{model_call(call, 'triton', gpu, order='block-major').ratio:.2f}")
        out.append(row)
    return out


HEADER = ("head_dim", "frames", "min MB", "triton ratio", "triton HBM peak", "cuda ratio", "cuda HBM peak",
          "triton ratio, block-major (before)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vstar_kernels.checks.traffic_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100")
    parser.add_argument("--mode", choices=("relative", "absolute"), default="relative")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (README.md)")
    args = parser.parse_args(argv)
    gpu = GPUS[args.gpu]
    print(f"MODEL (not a measurement): {gpu.name}, fp16, {args.mode} mode, batch·heads = {REALISTIC_SLICES}, "
          "slice-major launch order unless marked")
    rows = [list(HEADER), *table(gpu, mode=args.mode)]
    if args.markdown:
        print("\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(HEADER), *rows[1:]]))
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    worst = max(max(float(r[3]), float(r[5])) for r in rows[1:])
    print(f"worst ratio {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
