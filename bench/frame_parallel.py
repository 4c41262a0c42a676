"""Frame parallelism: per-rank peak memory and time of one UNet forward against frames, at P = 1, 2, 4 processes
(torchrun, gloo on CPU), with the communication volume per step from the model.

    python -m bench.frame_parallel [--model unet3d] [--frames 64 128 256] [--world 1 2 4] [--latent 32]
                                   [--out bench/results]
    python -m bench.frame_parallel --nccl-model   # the communication model of the full-size UNet3D, 2-8 GPUs

Each cell is one ``torchrun --standalone --nproc-per-node P`` run of this module's child: every rank builds the same
UNet as ``bench.e2e`` (TAR on, preset 64D1_32D8), enables frame parallelism and measures its own forward (peak
resident-set growth over the call, and wall time); the cell reports the largest rank's peak and time. P = 1 is
one process (``enable_frame_parallel`` is a no-op there). The communication model: every temporal module call
moves its input to the position layout and its output back, so (P - 1) / P of each of the two tensors crosses the
wire; the output gather moves (P - 1) copies of the output; bytes are summed over ranks from the temporal modules'
input shapes recorded in the P = 1 run. Rows go to ``frame_parallel.csv``; ``frame_parallel_cpu.png`` plots them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed

from vstar_kernels.bench.measure import peak_in_process, run_torchrun
from vstar_kernels.bench.records import append_csv

CSV_FIELDS = ("run_id", "timestamp", "model", "latent", "frames", "world", "status", "peak_mib_max_rank",
              "seconds_max_rank", "temporal_bytes", "alltoall_bytes_model", "gather_bytes_model")


def _child(payload: dict) -> None:
    """One rank: build, enable, measure; write rank<r>.json into payload["report_dir"]."""
    from bench.e2e import build_model
    from vstar_kernels.diffusers import apply_tar
    from vstar_kernels.distributed import enable_frame_parallel
    from vstar_kernels.distributed.frame_parallel import TEMPORAL_CLASSES

    unet = build_model(payload["model"])
    apply_tar(unet, "64D1_32D8", timesteps="all")
    state = enable_frame_parallel(unet)
    frames, latent = payload["frames"], payload["latent"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, latent, latent, generator=gen)
    ehs = torch.randn(1, 7, 32, generator=gen)
    if payload["model"] == "animatediff":
        ehs = ehs.repeat_interleave(frames, dim=0)
    temporal_bytes = []
    if state.rg.world == 1:  # the model's traffic: what every temporal module takes in, full frames
        for module in unet.modules():
            if type(module) in TEMPORAL_CLASSES.values():
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs: temporal_bytes.append(
                        (args[0] if args else kwargs["hidden_states"]).nbytes), with_kwargs=True)
    start = time.perf_counter()
    peak = peak_in_process(lambda: unet(x, 900, ehs), torch.device("cpu"))
    report = {"rank": state.rg.rank, "peak_mib": round(peak, 1), "seconds": round(time.perf_counter() - start, 2),
              "temporal_bytes": sum(temporal_bytes), "output_bytes": x.nbytes}
    Path(payload["report_dir"], f"rank{state.rg.rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def run_cell(model: str, frames: int, world: int, latent: int, timeout: float = 1800) -> dict:
    """One torchrun run; the reports of every rank, or a status."""
    return run_torchrun("bench.frame_parallel", {"model": model, "frames": frames, "latent": latent}, world, timeout)


def communication_model(temporal_bytes: int, output_bytes: int, world: int) -> tuple[int, int]:
    """Bytes on the wire per UNet forward, summed over ranks: (layout switches, output gather)."""
    return 2 * temporal_bytes * (world - 1) // world, output_bytes * (world - 1)


def full_size_temporal_bytes_per_frame(latent: int = 64, batch: int = 2) -> int:
    """Bytes every temporal module of the full-size ModelScope-layout UNet3DConditionModel (diffusers' default
    config: 320/640/1280/1280 channels) takes in per frame, fp16, a CFG batch of 2, 512x512 pixels (64x64 latents):
    from one forward on the meta device (no memory, no weights)."""
    from diffusers import UNet3DConditionModel

    from vstar_kernels.distributed.frame_parallel import TEMPORAL_CLASSES

    frames, recorded = 8, []
    with torch.device("meta"):
        unet = UNet3DConditionModel().half()
    for module in unet.modules():
        if type(module) in TEMPORAL_CLASSES:
            module.register_forward_pre_hook(lambda _m, args, kwargs: recorded.append(
                (args[0] if args else kwargs["hidden_states"]).nbytes), with_kwargs=True)
    x = torch.empty(batch, 4, frames, latent, latent, device="meta", dtype=torch.float16)
    with torch.no_grad():
        unet(x, 500, torch.empty(batch, 77, 1024, device="meta", dtype=torch.float16))
    return sum(recorded) // frames


def nccl_model(frames_list=(256, 512, 1024), worlds=(2, 4, 8), bandwidths_gbs=(150.0, 300.0)) -> list[str]:
    """A model, not a measurement: all-to-all bytes each rank sends per UNet call (2 switches per temporal module,
    (P - 1) / P of its share leaves it) and the seconds they take at assumed per-GPU all-to-all bandwidths."""
    per_frame = full_size_temporal_bytes_per_frame()
    lines = [f"full-size UNet3D, fp16, CFG batch 2, 512x512: temporal inputs {per_frame / 2**20:.1f} MiB per frame",
             "frames  P  GiB sent per rank per UNet call  " + "  ".join(f"s at {b:.0f} GB/s" for b in bandwidths_gbs)]
    for frames in frames_list:
        for world in worlds:
            sent = 2 * per_frame * frames * (world - 1) / world / world
            lines.append(f"{frames:>6} {world:>2} {sent / 2**30:>31.2f}  "
                         + "  ".join(f"{sent / (b * 1e9):>14.3f}" for b in bandwidths_gbs))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for world in sorted({r["world"] for r in rows}):
        pts = sorted((r["frames"], r["peak_mib_max_rank"], r["seconds_max_rank"]) for r in rows
                     if r["world"] == world and r["status"] == "ok")
        if not pts:
            continue
        frames, peak, secs = zip(*pts, strict=True)
        axes[0].plot(frames, peak, marker="o", label=f"P = {world}")
        axes[1].plot(frames, secs, marker="o", label=f"P = {world}")
    axes[0].set(xlabel="frames", ylabel="peak forward memory of the largest rank (MiB)", xscale="log", yscale="log")
    axes[1].set(xlabel="frames", ylabel="forward time of the slowest rank (s)", xscale="log", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"frame parallelism on this CPU (gloo, {os.cpu_count()} cores shared by all ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="unet3d", choices=("unet3d", "animatediff"))
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--nccl-model", action="store_true",
                        help="print the communication model of the full-size UNet3D on 2-8 GPUs and exit")
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    if args.nccl_model:
        print("\n".join(nccl_model()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id, rows = os.urandom(4).hex(), []
    for frames in args.frames:
        model_bytes = None
        for world in args.world:
            cell = run_cell(args.model, frames, world, args.latent)
            row = {"run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model,
                   "latent": args.latent, "frames": frames, "world": world, "status": cell["status"]}
            if cell["status"] == "ok":
                reports = cell["reports"]
                row["peak_mib_max_rank"] = max(r["peak_mib"] for r in reports)
                row["seconds_max_rank"] = max(r["seconds"] for r in reports)
                if world == 1:
                    model_bytes = (reports[0]["temporal_bytes"], reports[0]["output_bytes"])
            if model_bytes is not None:
                row["temporal_bytes"] = model_bytes[0]
                row["alltoall_bytes_model"], row["gather_bytes_model"] = communication_model(*model_bytes, world)
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = out / "frame_parallel.csv"
    append_csv(path, rows, {}, CSV_FIELDS)
    plot(rows, out / "frame_parallel_cpu.png")
    print(f"wrote {path} and {out / 'frame_parallel_cpu.png'} (run {run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
