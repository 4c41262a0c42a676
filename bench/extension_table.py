"""The C++ extension on this CPU against every CPU peer, side by side: a markdown table of medians and ratios.

    python -m bench.extension_table [--frames 16 64 128 256] [--head-dims 40 64] [--tokens 8192] [--heads 8]

Shapes follow temporal attention in a video UNet: ``tokens`` = batch·frames (B·H·W·F of a latent) of ``heads``
heads, as (batch, frames, heads, head_dim) views of one fused projection. Ratios are to plain SDPA without a bias,
measured in the same rounds.
"""

from __future__ import annotations

import argparse

import torch

from vstar_kernels.bench.providers import PROVIDERS, make_case
from vstar_kernels.bench.timing import time_side_by_side

COLUMNS = ("sdpa", "naive", "sdpa_bias", "torch", "extension")


def run(frames: list[int], head_dims: list[int], tokens: int, heads: int, rounds: int) -> list[str]:
    header = "| mode | F | d | " + " | ".join(PROVIDERS[c].label for c in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (3 + len(COLUMNS))]
    for mode in ("relative", "absolute"):
        for f in frames:
            for d in head_dims:
                case = make_case(tokens, f, heads, d, mode)
                thunks = {c: PROVIDERS[c].build(case) for c in COLUMNS if PROVIDERS[c].unavailable(case) is None}
                times = time_side_by_side(thunks, device=case.q.device, rounds=rounds)
                floor = times["sdpa"].median
                cells = [f"{times[c].median:.1f} ms ({times[c].median / floor:.2f}x)" if c in times else "n/a"
                         for c in COLUMNS]
                lines.append(f"| {mode} | {f} | {d} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ISA "
          f"{torch.backends.cpu.get_cpu_capability()}, fp32, {args.tokens} tokens x {args.heads} heads")
    lines = run(args.frames, args.head_dims, args.tokens, args.heads, args.rounds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
