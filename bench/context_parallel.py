"""TAR under diffusers' context parallelism: per-rank peak memory and time of one Wan transformer forward at P = 1,
2, 4 processes (torchrun, gloo on CPU), and the communication model of full-size Wan 14B.

    python -m bench.context_parallel [--frames 9 17] [--world 1 2 4] [--schemes ulysses ring] [--out bench/results]
    python -m bench.context_parallel --model-only     # the model of Wan 14B: bytes per rank per layer, P = 2, 4, 8

Each cell is one ``torchrun --standalone --nproc-per-node P`` run of this module's child: every rank builds the
same Wan 2.1 layout transformer (patch (1, 2, 2), QK RMSNorm across heads, RoPE; 12 heads x 32, 2 blocks: narrower
than the released 1.3B's 12 x 128), applies TAR (sigma 2 latent frames, for every step) in the given mode, enables
diffusers' context parallelism (Ulysses or Ring of degree P) and measures its own forward: peak resident-set
growth over the call and wall time (the median of 3 calls after one warm-up). The cell reports the largest rank's
peak and the slowest rank's time. P = 1 is one process without context parallelism. On one 2-core machine the
ranks share the cores, so times show overheads, not speed-ups; memory per rank is what falls with P.

Rows go to ``context_parallel.csv``; ``context_parallel_cpu.png`` plots them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.distributed

from vstar_kernels.bench.measure import peak_in_process, run_torchrun
from vstar_kernels.bench.records import append_csv

CSV_FIELDS = ("run_id", "timestamp", "scheme", "mode", "frames", "tokens", "world", "status", "peak_mib_max_rank",
              "seconds_max_rank")
LATENT = 16  # latent height and width: 8 x 8 = 64 tokens per latent frame after Wan's 2 x 2 patches


def _child(payload: dict) -> None:
    """One rank: build, TAR, context parallelism, measure; write rank<r>.json into payload["report_dir"]."""
    from vstar_kernels import apply_tar
    from vstar_kernels.diffusers.tiny import tiny_wan_transformer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = tiny_wan_transformer(num_layers=2, heads=12, head_dim=32).eval()
    apply_tar(model, sigma=2.0, strength=1.0, mode=payload["mode"], timesteps="all")
    if world > 1:
        from diffusers import ContextParallelConfig

        degree = {"ulysses_degree": world} if payload["scheme"] == "ulysses" else {"ring_degree": world}
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):  # no accelerator on a CPU
            model.enable_parallelism(config=ContextParallelConfig(**degree))
    gen = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, payload["frames"], LATENT, LATENT, generator=gen),
              timestep=torch.tensor([700]), encoder_hidden_states=torch.randn(1, 7, 32, generator=gen))

    def call() -> None:
        model(**kw, return_dict=False)

    peak = peak_in_process(call, torch.device("cpu"))
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    rank = torch.distributed.get_rank() if world > 1 else 0
    report = {"rank": rank, "peak_mib": round(peak, 1), "seconds": round(statistics.median(times), 3)}
    Path(payload["report_dir"], f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class WanShape:
    """One self-attention layer of a Wan run: the sequence, heads, head_dim; bf16 activations."""

    name: str
    tokens: int
    heads: int = 40  # Wan 2.1 14B: 40 heads x 128, 40 blocks
    head_dim: int = 128
    layers: int = 40
    bytes_per_element: int = 2


def wan14b_shape(width: int, height: int, frames: int) -> WanShape:
    """Wan 14B at ``width`` x ``height`` pixels and ``frames`` frames: VAE 8x spatial, 4x temporal (+1), patch
    (1, 2, 2)."""
    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames * (height // 16) * (width // 16)
    return WanShape(f"{width}x{height}, {frames} frames", tokens)


def bytes_per_rank_per_layer(shape: WanShape, world: int, scheme: str, mode: str = "relative") -> int:
    """Bytes one rank sends in one self-attention layer (received is the same), a model:

    - Ulysses: q, k, v to the head layout and the output back: 4 tensors of the rank's shard, (P - 1) / P of each
      leaves the rank.
    - Ring: the key/value span travels P - 1 hops (K and V: 2 shards per hop); the relative mode first sends K
      alone round the ring for the row max (1 more shard per hop).
    """
    shard = shape.tokens * shape.heads * shape.head_dim * shape.bytes_per_element // world
    if scheme == "ulysses":
        return 4 * shard * (world - 1) // world
    hops = world - 1
    return (2 + (mode == "relative")) * shard * hops


def model_lines(worlds=(2, 4, 8), link_gbs: float = 150.0, tflops: float = 400.0) -> list[str]:
    """The model's table (markdown): bytes per rank per layer for Ulysses and Ring at 480p/720p, 81/161 frames,
    and the Ring row-max pass's cost at assumed per-GPU link bandwidth and attention throughput."""
    shapes = [wan14b_shape(832, 480, 81), wan14b_shape(832, 480, 161), wan14b_shape(1280, 720, 81),
              wan14b_shape(1280, 720, 161)]
    lines = ["| Wan 14B, bf16 | tokens | P | Ulysses MiB | Ring abs. MiB | Ring rel. MiB | attention ms | "
             "row-max pass ms | K round ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for world in worlds:
            mib = [bytes_per_rank_per_layer(shape, world, s, m) / 2**20
                   for s, m in (("ulysses", "relative"), ("ring", "absolute"), ("ring", "relative"))]
            # per rank: its queries against every key, QK^T and PV (4 S^2 D H / P flops), the row-max pass QK^T only
            flops = 4 * shape.tokens**2 * shape.head_dim * shape.heads / world
            attention_ms = flops / (tflops * 1e12) * 1e3
            row_max_ms = attention_ms / 2
            k_round_ms = (mib[2] - mib[1]) * 2**20 / (link_gbs * 1e9) * 1e3
            lines.append(f"| {shape.name} | {shape.tokens} | {world} | {mib[0]:.0f} | {mib[1]:.0f} | {mib[2]:.0f} | "
                         f"{attention_ms:.1f} | {row_max_ms:.1f} | {k_round_ms:.1f} |")
    lines.append(f"\nA model, not a measurement: {link_gbs:.0f} GB/s per GPU link, {tflops:.0f} TFLOP/s of attention "
                 "matmuls. The row-max pass is QK^T alone (half the forward's matmuls; the single-GPU relative kernel "
                 "runs the same pass for rows longer than one tile), the K round its extra transfer, which overlaps "
                 "the pass.")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["scheme"], r["mode"]) for r in rows}):
        for frames in sorted({r["frames"] for r in rows}):
            pts = sorted((r["world"], r["peak_mib_max_rank"], r["seconds_max_rank"]) for r in rows
                         if (r["scheme"], r["mode"]) == key and r["frames"] == frames and r["status"] == "ok")
            if not pts:
                continue
            worlds, peak, secs = zip(*pts, strict=True)
            label = f"{key[0]} {key[1]}, {frames} latent frames"
            axes[0].plot(worlds, peak, marker="o", label=label)
            axes[1].plot(worlds, secs, marker="o", label=label)
    axes[0].set(xlabel="processes P", ylabel="peak forward memory of the largest rank (MiB)")
    axes[1].set(xlabel="processes P", ylabel="forward time of the slowest rank (s)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"TAR under diffusers' context parallelism on this CPU (gloo, {os.cpu_count()} cores shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17], help="latent frames (default: 9 17)")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="processes (default: 1 2 4)")
    parser.add_argument("--schemes", nargs="+", default=["ulysses", "ring"], choices=("ulysses", "ring"))
    parser.add_argument("--modes", nargs="+", default=["relative", "absolute"], choices=("relative", "absolute"))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--model-only", action="store_true", help="print the Wan 14B model (markdown) and exit")
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    if args.model_only:
        print("\n".join(model_lines()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id, rows = os.urandom(4).hex(), []
    for scheme in args.schemes:
        for mode in args.modes:
            for frames in args.frames:
                for world in args.world:
                    cell = run_torchrun("bench.context_parallel", {"scheme": scheme, "mode": mode, "frames": frames},
                                        world)
                    row = {"run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "scheme": scheme,
                           "mode": mode, "frames": frames, "tokens": frames * (LATENT // 2) ** 2, "world": world,
                           "status": cell["status"]}
                    if cell["status"] == "ok":
                        row["peak_mib_max_rank"] = max(r["peak_mib"] for r in cell["reports"])
                        row["seconds_max_rank"] = max(r["seconds"] for r in cell["reports"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    path = out / "context_parallel.csv"
    append_csv(path, rows, {}, CSV_FIELDS)
    plot(rows, out / "context_parallel_cpu.png")
    print(f"wrote {path} and {out / 'context_parallel_cpu.png'} (run {run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
