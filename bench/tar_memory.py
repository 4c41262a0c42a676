"""Peak memory of one UNet3D forward with TAR: the fused processor (apply_tar) vs the materialised one.

    python -m bench.tar_memory [--frames 64 128 256] [--latent 32]

Each (frames, processor) runs in its own subprocess; peak memory is the growth of the resident set (ru_maxrss)
over the forward, on the CPU. This is a measurement, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROCESSORS = ("none", "fused", "materialised")


def build_unet():
    """A small UNet3D with temporal attention at two latent levels (heads = channels / 8)."""
    import torch
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    return UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=32,
    ).eval()


def measure(frames: int, latent: int, processor: str) -> dict[str, float]:
    """One forward in this process: peak RSS growth (MiB) and wall time (s)."""
    import torch

    from vstar_kernels.diffusers import MaterialisedTARProcessor, TARAttnProcessor, apply_tar

    unet = build_unet()
    if processor != "none":
        cls = TARAttnProcessor if processor == "fused" else MaterialisedTARProcessor
        apply_tar(unet, "64D1_32D8", timesteps="all", processor=cls)
    x = torch.randn(1, 4, frames, latent, latent)
    ehs = torch.randn(1, 7, 32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        unet(x, 900, ehs)
    elapsed = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"frames": frames, "processor": processor, "peak_mib": round(peak, 1), "seconds": round(elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--child", nargs=2, metavar=("FRAMES", "PROCESSOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.latent, args.child[1])))
        return 0
    rows = []
    for frames in args.frames:
        for processor in PROCESSORS:
            cmd = [sys.executable, "-m", "bench.tar_memory", "--latent", str(args.latent), "--child", str(frames),
                   processor]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                rows.append({"frames": frames, "processor": processor, "peak_mib": float("nan"), "seconds": tail[0]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"UNet3D forward, latent {args.latent}x{args.latent}, batch 1, CPU; peak = RSS growth over the forward")
    header = ("frames", "no TAR MiB", "apply_tar MiB", "materialised MiB", "s (none/fused/mat)")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (6, 10, 13, 16, 20), strict=True)))
    for frames in args.frames:
        by = {r["processor"]: r for r in rows if r["frames"] == frames}
        secs = "/".join(str(by[p]["seconds"]) for p in PROCESSORS)
        print(f"{frames:>6}  {by['none']['peak_mib']:>10}  {by['fused']['peak_mib']:>13}  "
              f"{by['materialised']['peak_mib']:>16}  {secs:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
