"""One rank of a frame-parallel check, launched by tests/test_frame_parallel.py under torchrun (gloo, CPU).

Every rank builds the same tiny released-layout UNet and inputs, computes the single-process output itself, then the
frame-parallel output, and prints one JSON line: the largest difference and what it checked. Exit status 1 on any
mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from vstar_kernels import apply_tar, remove_tar
from vstar_kernels.diffusers.tiny import tiny_unet3d
from vstar_kernels.distributed import disable_frame_parallel, enable_frame_parallel


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(16, 16), help="latent height and width")
    parser.add_argument("--tar", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises inside the UNet")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = tiny_unet3d((32, 64))
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, args.frames, *args.size, generator=gen)  # CFG batch of 2
    ehs = torch.randn(2, 7, 32, generator=gen)
    if args.tar:
        apply_tar(unet, "64D1_32D8", timesteps="all")
    processors = dict(unet.attn_processors)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = unet(sample, 500, ehs).sample
        state = enable_frame_parallel(unet)
        if args.fail_rank == state.rg.rank:
            unet.conv_in.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("rank fails")))
        out = unet(sample, 500, ehs).sample
        again = unet(sample, 500, ehs, return_dict=False)[0]
        disable_frame_parallel(unet)
        after = unet(sample, 500, ehs).sample
    diff = (out - ref).abs().max().item()
    report = dict(rank=state.rg.rank, world=state.rg.world, frames=args.frames, max_abs_diff=diff,
                  scale=ref.abs().max().item(), repeat_equal=torch.equal(out, again),
                  restored=type(unet).__name__ == "UNet3DConditionModel" and torch.equal(after, ref)
                  and dict(unet.attn_processors) == processors
                  and all(torch.equal(v, state_before[k]) for k, v in unet.state_dict().items()))
    if args.tar:
        remove_tar(unet)
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()
    ok = diff <= 1e-4 * max(1.0, report["scale"]) and report["repeat_equal"] and report["restored"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
