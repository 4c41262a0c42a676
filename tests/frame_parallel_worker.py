"""One rank of a frame-parallel check, launched by tests/test_frame_parallel.py under torchrun (gloo, CPU).

Every rank builds the same tiny released-layout UNet (or pipeline) and inputs, computes the single-process output
itself, then the frame-parallel output, and writes ``rank<r>.json`` into ``--report-dir``: the largest difference
and what it checked. Exit status 1 on any mismatch. ``--backward``: gradients through the split instead
(:func:`run_backward`); ``--functions``: gradcheck of the differentiable collectives (:func:`run_functions`).
The library initialises the process group; every rank closes it through ``helpers.run_rank`` once ``main`` has
returned.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from helpers import run_rank

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
    parser.add_argument("--backward", action="store_true", help="gradients, without and with TAR")
    parser.add_argument("--functions", action="store_true", help="gradcheck of the differentiable collectives")
    parser.add_argument("--double", action="store_true", help="--backward in float64 (tolerances to match)")
    args = parser.parse_args()
    if args.pipeline:
        return run_pipeline(args)
    if args.backward:
        return run_backward(args)
    if args.functions:
        return run_functions(args)
    torch.manual_seed(0)
    unet, call, _ = build(args)
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
    ok = diff <= 1e-4 * max(1.0, report["scale"]) and report["repeat_equal"] and report["restored"]
    return 0 if ok else 1


def build(args, grad: bool = False, dtype: torch.dtype = torch.float32):
    """(unet, call, leaves): the family's tiny released-layout UNet in ``dtype``, a call on fixed inputs
    (``--batch``) and the inputs made to require grad (``grad``: the sample, the prompt or image context and the
    image latents)."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    sample, ehs = randn(args.batch, 4, args.frames, *args.size), randn(args.batch, 7, 32)
    leaves = [sample, ehs] if grad else []
    if args.family == "unet3d":
        unet = tiny_unet3d((32, 64)).to(dtype)
        return unet, lambda **kw: unet(sample, 500, ehs, **kw), leaves
    if args.family == "animatediff":  # AnimateDiff pipelines pass the prompt once per frame
        unet = tiny_animatediff_unet("animatediff")[0].to(dtype)
        return unet, lambda **kw: unet(sample, 500, ehs.repeat_interleave(args.frames, dim=0), **kw), leaves
    if args.family == "svd":  # frames on dim 1, 8 input channels, image embedding per sample
        unet = tiny_svd_unet((32, 64)).to(dtype)
        video, context = randn(args.batch, args.frames, 8, *args.size), randn(args.batch, 1, 32)
        time_ids = torch.tensor([[6.0, 127.0, 0.02]] * args.batch, dtype=dtype)
        return unet, lambda **kw: unet(video, 500, context, time_ids, **kw), [video, context] if grad else []
    unet = tiny_i2vgen_unet((32, 64)).to(dtype)
    image = randn(args.batch, 4, args.frames, *args.size)
    image_embeddings = torch.randn(args.batch, 32, generator=gen).to(dtype)
    fps = torch.tensor([16] * args.batch)
    return unet, lambda **kw: unet(sample, 500, fps, image, image_embeddings=image_embeddings,
                                   encoder_hidden_states=ehs, **kw), [*leaves, image] if grad else []


def write_report(args, report: dict) -> None:
    with open(f"{args.report_dir}/rank{report['rank']}.json", "w") as f:
        json.dump(report, f)


# Per tensor: |difference| <= rtol · its largest |gradient| + atol · the largest gradient of all (the noise floor of
# gradients that cancel to ~0 by structure: a conv bias before a GroupNorm of one channel per group). fp32: the
# ranks' contributions are summed in another order than one process sums them; at levels of few positions (a
# GroupNorm over 2 elements per frame) fp32 is too ill-conditioned for a tight check, so they run in float64.
GRAD_TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-10)}


def gradients(unet, call, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """(output, gradients of the parameters and the inputs) of ``output.pow(2).mean()``, from None."""
    unet.zero_grad(set_to_none=True)
    for leaf in leaves:
        leaf.grad = None
    out = call().sample
    out.pow(2).mean().backward()
    grads = {f"param {name}": p.grad for name, p in unet.named_parameters()}
    grads.update({f"input {i}": leaf.grad for i, leaf in enumerate(leaves)})
    return out.detach(), grads


def compare_gradients(got: dict, ref: dict, rtol: float, atol: float) -> dict:
    """How far ``got`` is from ``ref``: per tensor, the difference over rtol · its largest |ref| + atol · the largest
    of all (``worst_ratio`` <= 1 passes); the worst relative difference among tensors whose largest |ref| is at
    least 1e-3 of the largest of all; the names whose None-ness differs."""
    scale = max(t.abs().max().item() for t in ref.values() if t is not None)
    worst = dict(worst_ratio=0.0, worst_abs=0.0, worst_rel_significant=0.0, worst_name="", none_mismatch=[],
                 compared=0, scale=scale)
    for name, expected in ref.items():
        actual = got[name]
        if (actual is None) != (expected is None):
            worst["none_mismatch"].append(name)
            continue
        if expected is None:
            continue
        worst["compared"] += 1
        err, size = (actual - expected).abs().max().item(), expected.abs().max().item()
        ratio = err / (rtol * size + atol * scale)
        worst["worst_abs"] = max(worst["worst_abs"], err)
        if size >= 1e-3 * scale:
            worst["worst_rel_significant"] = max(worst["worst_rel_significant"], err / size)
        if ratio > worst["worst_ratio"]:
            worst["worst_ratio"], worst["worst_name"] = ratio, name
    return worst


def run_backward(args) -> int:
    """Every rank: loss = output.pow(2).mean() and backward, one process vs frame-parallel, without and with TAR; the
    parameter and input gradients must agree, the recording forward must equal the no_grad forward bit for bit, and
    (AnimateDiff, whose UNet supports it) gradient checkpointing is refused while training split, not while
    inferring."""
    torch.manual_seed(0)
    dtype = torch.float64 if args.double else torch.float32
    unet, call, leaves = build(args, grad=True, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # zero-initialised layers (UNet3D's temporal convs' last conv) would hide what precedes them
        for param in unet.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    report: dict = dict(frames=args.frames, dtype=str(dtype))
    ok = True
    for tar in (False, True):
        if tar:
            apply_tar(unet, "64D1_32D8", timesteps="all")
        ref_out, ref = gradients(unet, call, leaves)
        state = enable_frame_parallel(unet)
        out, got = gradients(unet, call, leaves)
        with torch.no_grad():
            inference = call().sample
        disable_frame_parallel(unet)
        case = compare_gradients(got, ref, *GRAD_TOLERANCES[dtype])
        case.update(output_diff=(out - ref_out).abs().max().item(), recording_equals_no_grad=torch.equal(out,
                                                                                                        inference))
        report["tar" if tar else "plain"] = case
        ok &= (case["worst_ratio"] <= 1.0 and not case["none_mismatch"] and case["compared"] > 0
               and case["recording_equals_no_grad"]
               and case["output_diff"] <= 1e-4 * max(1.0, ref_out.abs().max().item()))
    report.update(rank=state.rg.rank, world=state.rg.world)
    if unet._supports_gradient_checkpointing:  # UNetMotionModel (diffusers' UNet3DConditionModel refuses it)
        unet.enable_gradient_checkpointing()
        enable_frame_parallel(unet)
        try:
            call()
            report["checkpointing_error"] = ""
        except NotImplementedError as exc:
            report["checkpointing_error"] = str(exc)
        with torch.no_grad():
            inference_ok = bool(torch.isfinite(call().sample).all())
        unet.requires_grad_(False)  # grad enabled, nothing requiring it: autograd does not record, so it runs
        for leaf in leaves:
            leaf.requires_grad_(False)
        report["checkpointing_inference_ok"] = inference_ok and bool(torch.isfinite(call().sample).all())
        disable_frame_parallel(unet)
        message = report["checkpointing_error"]
        ok &= "frame parallelism" in message and "gradient checkpointing" in message
        ok &= report["checkpointing_inference_ok"]
    remove_tar(unet)
    write_report(args, report)
    return 0 if ok else 1


def run_functions(args) -> int:
    """gradcheck (float64) of each differentiable collective, every rank in lockstep: the checked function takes
    the replicated global tensor, enters it (:func:`enter_replicated`, whose adjoint sums over the ranks), takes
    this rank's frames, applies the collective inside a frame-mixing computation and returns the replicated
    output (:func:`gather_output`). Every rank perturbs the same element at the same time, so each rank's
    numerical Jacobian is the global one; the analytical one comes from the adjoints. The forward is also held to
    one process's."""
    from vstar_kernels.distributed.frame_parallel import _NORM_GROUP, SplitGroupNorm
    from vstar_kernels.distributed.layout import (
        all_reduce_sum,
        enter_replicated,
        frames_to_positions,
        gather_frames,
        gather_output,
        positions_to_frames,
        resolve_group,
        split_sizes,
    )

    rg = resolve_group(None, torch.device("cpu"))
    frames, height, width = args.frames, 1, 5  # --frames 3: uneven frames (2 + 1) and positions (3 + 2) on 2 ranks
    sizes = split_sizes(frames, rg.world)
    start, count = sum(sizes[:rg.rank]), sizes[rg.rank]
    gen = torch.Generator().manual_seed(3)
    checks: dict[str, bool] = {}

    def mine(x: torch.Tensor) -> torch.Tensor:  # (B, F, C, H, W) -> this rank's frames
        return x[:, start:start + count]

    def switch(x: torch.Tensor) -> torch.Tensor:  # the layout switch both ways, a frame-mixing op between
        (x,) = enter_replicated([x], rg)
        batch, channels = x.shape[0], x.shape[2]
        pos = frames_to_positions(mine(x).flatten(0, 1), sizes, rg)  # (B·F, C, 1, P_rank)
        grid = pos.reshape(batch, frames, channels, 1, -1)
        mixed = (grid * grid.cumsum(1)).flatten(0, 1)
        back = positions_to_frames(mixed, sizes, height, width, rg)
        return gather_output(back.reshape(batch, count, channels, height, width), sizes, 1, rg)

    def gather(x: torch.Tensor) -> torch.Tensor:  # every frame gathered inside, this rank's part kept
        (x,) = enter_replicated([x], rg)
        full = gather_frames(mine(x), sizes, 1, rg)
        return gather_output(mine((full * full.flip(1)).cumsum(1)), sizes, 1, rg)

    def reduce(x: torch.Tensor) -> torch.Tensor:  # a per-sample sum over every rank's frames
        (x,) = enter_replicated([x], rg)
        total = all_reduce_sum(mine(x).pow(2).sum(dim=(1, 2, 3, 4)), rg)
        return gather_output(mine(x) * total.reshape(-1, 1, 1, 1, 1), sizes, 1, rg)

    norm = SplitGroupNorm(2, 4, eps=1e-5).double()
    weight, bias = norm.weight, norm.bias

    def group_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # in the position layout
        x, norm._parameters["weight"], norm._parameters["bias"] = enter_replicated([x, w, b], rg)
        batch, channels = x.shape[0], x.shape[2]
        pos = frames_to_positions(mine(x).flatten(0, 1), sizes, rg)
        video = pos.reshape(batch, frames, channels, 1, -1).transpose(1, 2)  # (B, C, F, 1, P_rank)
        token = _NORM_GROUP.set(rg)
        try:
            normed = norm(video)
        finally:
            _NORM_GROUP.reset(token)
        back = positions_to_frames(normed.transpose(1, 2).flatten(0, 1), sizes, height, width, rg)
        return gather_output(back.reshape(batch, count, channels, height, width), sizes, 1, rg)

    def reference_norm(x, w, b):
        return torch.nn.functional.group_norm(x.transpose(1, 2), 2, w, b, 1e-5).transpose(1, 2)

    def video(batch: int, channels: int) -> torch.Tensor:
        return torch.randn(batch, frames, channels, height, width, generator=gen, dtype=torch.float64,
                           requires_grad=True)

    affine = ((torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(),
              torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True))
    cases = [("switch, batch 1", switch, (video(1, 2),), lambda x: x * x.cumsum(1)),  # shares received in place
             ("switch, batch 2", switch, (video(2, 2),), lambda x: x * x.cumsum(1)),
             ("gather", gather, (video(2, 2),), lambda x: (x * x.flip(1)).cumsum(1)),
             ("all_reduce", reduce, (video(2, 2),),
              lambda x: x * x.pow(2).sum(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)),
             ("group_norm", group_norm, (video(2, 4), *affine), reference_norm)]
    for name, fn, inputs, reference in cases:
        forward_ok = torch.allclose(fn(*inputs), reference(*inputs), rtol=1e-12, atol=1e-12)
        checks[name] = forward_ok and torch.autograd.gradcheck(fn, inputs)
    norm._parameters["weight"], norm._parameters["bias"] = weight, bias

    # the sum over ranks and None where no rank used a tensor
    a, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    a_in, _unused_in = enter_replicated([a, unused], rg)
    (a_in * (rg.rank + 1)).sum().backward()
    checks["sum over ranks, None kept"] = (torch.equal(a.grad, torch.full((3,), rg.world * (rg.world + 1) / 2))
                                           and unused.grad is None)
    x = torch.randn(2, frames, 2, height, width, generator=gen)
    with torch.no_grad():  # not recording: the plain collectives, the same numbers
        plain = switch(x)
    checks["no_grad equals recording"] = torch.equal(plain, switch(x.requires_grad_()).detach())
    write_report(args, dict(rank=rg.rank, world=rg.world, checks=checks))
    return 0 if all(checks.values()) else 1


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
    return 0 if report["max_abs_diff"] <= 1e-4 * max(1.0, report["scale"]) and report["restored"] else 1


if __name__ == "__main__":
    sys.exit(run_rank(main))
