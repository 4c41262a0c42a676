"""End to end: one single-pass UNet forward at 16-512 frames, without TAR, with the official (materialised) TAR
processor, and with ``apply_tar``; peak memory and time.

    python -m bench.e2e [--models unet3d animatediff] [--frames 16 64 128 256 512] [--latent 16] [--out bench/results]

Models: a small but deep UNet3DConditionModel (4 levels, ModelScope/zeroscope layout) and an AnimateDiff
UNetMotionModel (a 4-level SD1.5-layout UNet2D plus a MotionAdapter with the released 32-row position tables,
stretched to each frame count by ``positions="interpolate"``; the baseline gets the same through
``extend_frame_positions``), random weights, preset 64D1_32D8 with TAR on at every step. Each cell runs in a fresh
subprocess (CPU: peak = resident-set growth over the forward; CUDA: allocator peak); an out-of-memory is recorded
as ``oom``. Rows are appended to ``e2e.csv``; ``e2e_<device>.png`` plots memory and time against frames.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vstar_kernels.bench.measure import failure_status, peak_in_process, run_child

MODELS = ("unet3d", "animatediff")
PROCESSORS = ("none", "naive", "apply_tar")
CHANNELS = (32, 64, 64, 64)
CSV_FIELDS = ("run_id", "timestamp", "device", "device_name", "vstar_kernels", "torch", "triton", "model", "latent",
              "frames", "processor", "status", "peak_mib", "seconds")


def build_model(name: str):
    """The benchmark UNets (random weights, eval mode)."""
    from vstar_kernels.diffusers.tiny import tiny_animatediff_unet, tiny_unet3d

    if name == "unet3d":
        return tiny_unet3d(CHANNELS)
    if name == "animatediff":
        return tiny_animatediff_unet("animatediff", CHANNELS, layers_per_block=1)[0]
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _child(payload: dict) -> dict:
    from vstar_kernels.diffusers import MaterialisedTARProcessor, TARAttnProcessor, apply_tar, extend_frame_positions

    device = torch.device(payload["device"])
    unet = build_model(payload["model"]).to(device)
    if payload["processor"] == "none":
        extend_frame_positions(unet)  # the same positions as apply_tar's default, without TAR
    else:
        cls = MaterialisedTARProcessor if payload["processor"] == "naive" else TARAttnProcessor
        apply_tar(unet, "64D1_32D8", timesteps="all", processor=cls)
    latent, frames = payload["latent"], payload["frames"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, latent, latent, generator=gen).to(device)
    ehs = torch.randn(1, 7, 32, generator=gen).to(device)
    if payload["model"] == "animatediff":  # UNetMotionModel takes the text embedding repeated per frame
        ehs = ehs.repeat_interleave(frames, dim=0)
    start = time.perf_counter()
    try:
        peak = peak_in_process(lambda: unet(x, 900, ehs), device)
    except Exception as exc:  # reported to the parent
        return {"status": failure_status(exc)}
    return {"status": "ok", "peak_mib": round(peak, 1), "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    from vstar_kernels.bench.plots import plot_e2e
    from vstar_kernels.bench.records import append_csv, run_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    parser.add_argument("--processors", nargs="+", choices=PROCESSORS, default=list(PROCESSORS))
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    meta = run_metadata(torch.device(args.device))
    out = Path(args.out)
    csv_path = out / "e2e.csv"
    for model in args.models:
        for frames in args.frames:
            for processor in args.processors:
                payload = {"model": model, "frames": frames, "processor": processor, "latent": args.latent,
                           "device": args.device}
                result = run_child("bench.e2e", payload)
                row = {"model": model, "latent": args.latent, "frames": frames, "processor": processor, **result}
                append_csv(csv_path, [row], meta, CSV_FIELDS)
                print(f"{model:<12} F={frames:<4} {processor:<10} {result['status']:<6} "
                      f"{result.get('peak_mib', '-'):>9} MiB {result.get('seconds', '-'):>8} s", flush=True)
    if not args.no_plot:
        for png in plot_e2e(csv_path, meta["run_id"], out):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
