"""Achieved HBM bandwidth of the GPU kernels at F = 128 and 256 frames (needs CUDA; no CPU fallback).

    python -m bench.bandwidth [--out bench/results] [--repeats 20] [--slices 16384]

For each backend (triton, extension), head_dim (40, 64, 80, 160), frame count (128, 256) and mode, one fp16 call of
``--slices`` = batch·heads (>= 10^4: 2 videos x a 32x32 latent x 8 heads by default) in diffusers' projection
layout is timed with CUDA events (median of ``--repeats``) and checked against the float64 reference on a few
slices. Bandwidth = the minimum bytes (Q + K + V + O once, :mod:`vstar_kernels.checks.traffic_model`) over the
median time; the reference peak is a device-to-device copy of the same size, measured in the same run. The model's
prediction for the same call is printed beside it. Rows go to ``bandwidth.csv``; exit status 2 without CUDA.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
from pathlib import Path

import torch

from vstar_kernels import tar_attention, tar_attention_reference
from vstar_kernels.checks.traffic_model import CallShape, model_call

HEAD_DIMS = (40, 64, 80, 160)
FRAMES = (128, 256)
HEADS = 8
COLUMNS = ("backend", "mode", "head_dim", "frames", "batch_heads", "median_ms", "gb_per_s", "copy_gb_per_s",
           "fraction_of_copy", "model_ratio", "correct")


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` CUDA-event-timed calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of a device-to-device copy moving ``nbytes`` in all (half read, half written), the practical HBM
    peak."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), repeats) / 1e6


def correct(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> bool:
    """The first, middle and last batch entries against the float64 reference (fp16 tolerance)."""
    idx = torch.tensor([0, q.shape[0] // 2, q.shape[0] - 1], device=q.device)
    ref = tar_attention_reference(*(t[idx].double() for t in (q, k, v)), sigma=2.0, mode=mode)
    return bool(torch.allclose(out[idx].double(), ref, rtol=2e-2, atol=2e-2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--slices", type=int, default=2 * 32 * 32 * HEADS, help="batch·heads per call (>= 10^4)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.bandwidth needs a CUDA device", file=sys.stderr)
        return 2
    batch = args.slices // HEADS
    rows = []
    for backend, mode, head_dim, frames in itertools.product(("triton", "extension"), ("relative", "absolute"),
                                                             HEAD_DIMS, FRAMES):
        q, k, v = (torch.randn(batch, frames, HEADS * head_dim, device="cuda", dtype=torch.float16)
                   .unflatten(-1, (HEADS, head_dim)) for _ in range(3))
        call = CallShape(batch * HEADS, frames, frames, head_dim, torch.float16, mode)
        ms = median_ms(lambda: tar_attention(q, k, v, sigma=2.0, mode=mode, backend=backend), args.repeats)  # noqa: B023
        gbps = call.minimum_bytes() / ms / 1e6
        peak = copy_bandwidth(call.minimum_bytes(), args.repeats)
        out = tar_attention(q, k, v, sigma=2.0, mode=mode, backend=backend)
        ratio = model_call(call, "cuda" if backend == "extension" else "triton").ratio
        rows.append((backend, mode, head_dim, frames, batch * HEADS, f"{ms:.3f}", f"{gbps:.0f}", f"{peak:.0f}",
                     f"{gbps / peak:.2f}", f"{ratio:.2f}", correct(out, q, k, v, mode)))
        print("  ".join(map(str, rows[-1])), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bandwidth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    print(f"device: {torch.cuda.get_device_name()}; rows in {args.out / 'bandwidth.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
