"""One rank of a frame-parallel check, launched by tests/test_frame_parallel.py under torchrun (gloo, CPU).

Every rank builds the same tiny released-layout UNet (or pipeline) and inputs, computes the single-process output
itself, then the frame-parallel output, and writes ``rank<r>.json`` into ``--report-dir``: the largest difference
and what it checked. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from vstar_kernels import apply_tar, remove_tar
from vstar_kernels.diffusers import apply_synopsis
from vstar_kernels.diffusers.tiny import tiny_animatediff_unet, tiny_i2vgen_unet, tiny_svd_unet, tiny_unet3d
from vstar_kernels.distributed import disable_frame_parallel, enable_frame_parallel


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=("unet3d", "animatediff", "i2vgen", "svd"), default="unet3d")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(16, 16), help="latent height and width")
    parser.add_argument("--tar", action="store_true")
    parser.add_argument("--synopsis", action="store_true", help="per-frame text conditioning (apply_synopsis)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: a CFG pair)")
    parser.add_argument("--pipeline", action="store_true", help="run the family's pipeline (CFG, VAE decode)")
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises inside the UNet")
    args = parser.parse_args()
    if args.pipeline:
        return run_pipeline(args)
    torch.manual_seed(0)
    unet, call = build(args)
    original = type(unet)
    if args.tar:
        apply_tar(unet, "64D1_32D8", timesteps="all")
    if args.synopsis:  # a different embedding per frame: each rank must condition its frames on theirs
        apply_synopsis(unet, torch.randn(args.frames, 7, 32, generator=torch.Generator().manual_seed(2)))
    processors = dict(unet.attn_processors)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = call().sample
        state = enable_frame_parallel(unet)
        if args.fail_rank == state.rg.rank:
            unet.conv_in.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("rank fails")))
        out = call().sample
        again = call(return_dict=False)[0]
        disable_frame_parallel(unet)
        after = call().sample
    diff = (out - ref).abs().max().item()
    report = dict(rank=state.rg.rank, world=state.rg.world, frames=args.frames, max_abs_diff=diff,
                  scale=ref.abs().max().item(), repeat_equal=torch.equal(out, again),
                  restored=type(unet) is original and torch.equal(after, ref)
                  and dict(unet.attn_processors) == processors
                  and all(torch.equal(v, state_before[k]) for k, v in unet.state_dict().items()))
    if args.tar:
        remove_tar(unet)
    write_report(args, report)
    dist.destroy_process_group()
    ok = diff <= 1e-4 * max(1.0, report["scale"]) and report["repeat_equal"] and report["restored"]
    return 0 if ok else 1


def build(args):
    """(unet, call): the family's tiny released-layout UNet and a call on fixed inputs (``--batch``)."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(args.batch, 4, args.frames, *args.size, generator=gen)
    ehs = torch.randn(args.batch, 7, 32, generator=gen)
    if args.family == "unet3d":
        unet = tiny_unet3d((32, 64))
        return unet, lambda **kw: unet(sample, 500, ehs, **kw)
    if args.family == "animatediff":  # AnimateDiff pipelines pass the prompt once per frame
        unet = tiny_animatediff_unet("animatediff")[0]
        return unet, lambda **kw: unet(sample, 500, ehs.repeat_interleave(args.frames, dim=0), **kw)
    if args.family == "svd":  # frames on dim 1, 8 input channels, image embedding per sample
        unet = tiny_svd_unet((32, 64))
        video = torch.randn(args.batch, args.frames, 8, *args.size, generator=gen)
        context = torch.randn(args.batch, 1, 32, generator=gen)
        time_ids = torch.tensor([[6.0, 127.0, 0.02]] * args.batch)
        return unet, lambda **kw: unet(video, 500, context, time_ids, **kw)
    unet = tiny_i2vgen_unet((32, 64))
    image = torch.randn(args.batch, 4, args.frames, *args.size, generator=gen)
    image_embeddings = torch.randn(args.batch, 32, generator=gen)
    fps = torch.tensor([16] * args.batch)
    return unet, lambda **kw: unet(sample, 500, fps, image, image_embeddings=image_embeddings,
                                   encoder_hidden_states=ehs, **kw)


def write_report(args, report: dict) -> None:
    with open(f"{args.report_dir}/rank{report['rank']}.json", "w") as f:
        json.dump(report, f)


def run_pipeline(args) -> int:
    """The family's tiny offline pipeline end to end (2 DDIM steps with CFG, VAE decode), single-process output vs
    frame-parallel output, on every rank."""
    from vstar_kernels.diffusers.tiny import animatediff_pipeline, svd_pipeline, text_to_video_pipeline

    kwargs = dict(num_inference_steps=2, num_frames=args.frames, height=8 * args.size[0], width=8 * args.size[1],
                  output_type="pt")
    if args.family == "unet3d":
        pipe, prompt = text_to_video_pipeline(), "a cat"
    elif args.family == "animatediff":
        unet, adapter = tiny_animatediff_unet("animatediff")
        pipe, prompt = animatediff_pipeline(unet, adapter), "a cat"
    else:  # SVD: an image in, its temporal VAE decoder (chunks of decode_chunk_size frames) not split
        pipe, prompt = svd_pipeline(tiny_svd_unet((32, 64))), torch.rand(1, 3, kwargs["height"], kwargs["width"])
        kwargs["decode_chunk_size"] = 4
    if args.tar:
        apply_tar(pipe, "64D1_32D8")
    vae_class = type(pipe.vae)
    with torch.no_grad():
        ref = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
        state = enable_frame_parallel(pipe)
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
        vae_switched = type(pipe.vae).__name__ == "FrameParallelAutoencoderKL" or args.family == "svd"
        disable_frame_parallel(pipe)
    report = dict(rank=state.rg.rank, world=state.rg.world, frames=args.frames, shape=list(out.shape),
                  max_abs_diff=(out - ref).abs().max().item(), scale=ref.abs().max().item(), repeat_equal=True,
                  restored=type(pipe.vae) is vae_class and vae_switched)
    write_report(args, report)
    dist.destroy_process_group()
    return 0 if report["max_abs_diff"] <= 1e-4 * max(1.0, report["scale"]) and report["restored"] else 1


if __name__ == "__main__":
    sys.exit(main())
