"""One rank of a context-parallel TAR check, launched by tests/test_context_parallel.py under torchrun (gloo, CPU).

Every rank builds the same tiny released-layout transformer (Wan 2.1 or LTX-Video) and inputs, computes the
single-process TAR output itself, then runs diffusers' own context parallelism
(``enable_parallelism(config=ContextParallelConfig(...))``) with TAR, and writes ``rank<r>.json`` into
``--report-dir``: the largest difference and what it checked. Exit status 1 on any mismatch. ``--ring-error``: the
Ring's compute raises after a step's transfer was posted (:func:`run_ring_error`). Every rank closes the process
group through ``helpers.run_rank`` once ``main`` has returned.

diffusers picks the device as ``rank % torch.accelerator.device_count()``, which divides by zero on a machine
without an accelerator; the only thing patched here is that count, to 1, around ``enable_parallelism``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from helpers import run_rank

from vstar_kernels import FrameProfile, apply_tar, remove_tar
from vstar_kernels.diffusers import tiny
from vstar_kernels.diffusers.dit.context_parallel import enable_context_parallelism
from vstar_kernels.distributed import sequence_parallel

TOLERANCE = 1e-4


def build(model: str):
    if model == "wan":
        transformer = tiny.tiny_wan_transformer(heads=4, head_dim=12)
    elif model == "wan-i2v":
        transformer = tiny.tiny_wan_i2v_transformer(heads=4, head_dim=12)
    elif model == "hunyuan":
        transformer = tiny.tiny_hunyuan_transformer(heads=4)
    else:
        transformer = tiny.tiny_ltx_transformer(heads=4, head_dim=8)
    return transformer.eval()


def inputs(model: str, frames: int, height: int, width: int, batch: int = 1, text_mask: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    if model == "wan-i2v":  # 257 CLIP image tokens, unsplit by Wan's _cp_plan (they reach the cross-attention only)
        return dict(hidden_states=torch.randn(batch, 36, frames, height, width, generator=gen),
                    timestep=torch.tensor([700] * batch),
                    encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen),
                    encoder_hidden_states_image=torch.randn(batch, 257, 16, generator=gen))
    if model == "hunyuan":  # 8 text tokens; with text_mask the last 3 padding (5 for a second batch element)
        mask = torch.ones(batch, 8)
        if text_mask:
            mask[0, 5:] = 0
            mask[1:, 3:] = 0
        return dict(hidden_states=torch.randn(batch, 16, frames, height, width, generator=gen),
                    timestep=torch.tensor([700] * batch),
                    encoder_hidden_states=torch.randn(batch, 8, 32, generator=gen),
                    encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=gen),
                    guidance=torch.tensor([3.0] * batch))
    if model == "wan":
        return dict(hidden_states=torch.randn(batch, 16, frames, height, width, generator=gen),
                    timestep=torch.tensor([700] * batch),
                    encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen))
    # text_mask: the last 3 of the 8 text tokens are padding. diffusers' own CP cannot run LTX's masked
    # cross-attention (Ulysses: the gathered mask keeps every head; Ring: the native backend has no LSE); TAR's patch
    # gathers the text there (ShardedTextCrossAttention)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3] * batch) if text_mask else None
    return dict(hidden_states=torch.randn(batch, frames * height * width, 128, generator=gen),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=gen), timestep=torch.tensor([700] * batch),
                encoder_attention_mask=mask, num_frames=frames, height=height, width=width)


def enable_cp(transformer, args) -> None:
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=args.ulysses, ring_degree=args.ring,
                                   ulysses_anything=args.anything and args.ulysses > 1,
                                   ring_anything=args.anything and args.ring > 1)
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        enable_context_parallelism(transformer, config)  # diffusers' enable_parallelism; HunyuanVideo: our plan


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("wan", "wan-i2v", "ltx", "hunyuan"), default="wan")
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--anything", action="store_true", help="ulysses_anything / ring_anything (uneven shards)")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=2, default=(8, 8), help="latent height and width")
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--order", choices=("tar-first", "cp-first"), default="tar-first")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--text-mask", action="store_true", help="ltx: padded text (a key mask in attn2)")
    parser.add_argument("--backward", action="store_true", help="gradients of the input through CP + TAR")
    parser.add_argument("--outside-window", action="store_true",
                        help="TAR's window closed: bit-identical to diffusers' own CP")
    parser.add_argument("--remove", action="store_true", help="remove_tar afterwards: diffusers' CP as before")
    parser.add_argument("--plain-cp", action="store_true",
                        help="also the model's CP without TAR against one process (checks a plan we ship)")
    parser.add_argument("--pipeline", action="store_true", help="a WanPipeline end to end (2 steps, CFG)")
    parser.add_argument("--experts", type=int, choices=(1, 2), default=1, help="--pipeline: Wan 2.2's two experts")
    parser.add_argument("--plan-without-hook", action="store_true",
                        help="hunyuan: our plan passed to enable_parallelism alone must raise, not mask wrongly")
    parser.add_argument("--synopsis", action="store_true",
                        help="per-frame prompts and TAR under CP against one process")
    parser.add_argument("--ring-error", type=int, default=-1, metavar="STEP",
                        help="the Ring's op raises at this step on every rank, after the step's transfer was posted")
    parser.add_argument("--ring-error-op", choices=("row_max", "attention"), default="attention",
                        help="--ring-error: which pass of the Ring raises")
    parser.add_argument("--profile", action="store_true",
                        help="a frame-distance profile (per-head bias, window with a sink, decay) instead of sigma")
    parser.add_argument("--ultravico", type=int, default=0, metavar="RATIO",
                        help="--pipeline: preset='ultravico' + TAR at RATIO x Wan's 81 training frames")
    parser.add_argument("--report-dir", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report: dict = {"rank": rank, "world": dist.get_world_size(), "checks": {}}
    if args.ring_error >= 0:
        return finish(report, run_ring_error(args, report), args)
    if args.pipeline:
        return finish(report, run_pipeline(args, report), args)
    if args.plan_without_hook:
        return finish(report, run_plan_without_hook(args, report), args)
    if args.synopsis:
        return finish(report, run_synopsis(args, report), args)
    ok = True
    kw = inputs(args.model, args.frames, *args.size, batch=args.batch, text_mask=args.text_mask)
    base = build(args.model)
    window = "all" if not args.outside_window else (0, 1)
    calls = count_ring_attention_calls(report)
    try:
        for mode in ("relative", "absolute"):
            bias = bias_arguments(args, base, mode)
            single = copy.deepcopy(base)
            apply_tar(single, timesteps=window, backend=args.backend, **bias)
            parallel = copy.deepcopy(base)
            if args.order == "cp-first":
                enable_cp(parallel, args)
                apply_tar(parallel, timesteps=window, backend=args.backend, **bias)
            else:
                apply_tar(parallel, timesteps=window, backend=args.backend, **bias)
                enable_cp(parallel, args)
            calls.clear()
            if args.backward:
                ok &= check_backward(single, parallel, kw, report, mode)
                continue
            with torch.no_grad():
                want = single(**kw, return_dict=False)[0]
                got = parallel(**kw, return_dict=False)[0]
                plain = copy.deepcopy(base)(**kw, return_dict=False)[0]
            err = (got - want).abs().max().item()
            scale = want.abs().max().item()
            report["checks"][mode] = {"max_err": err, "scale": scale,
                                      "tar_changes_output": (want - plain).abs().max().item(),
                                      "ring_attention_calls": len(calls)}
            if args.text_mask:  # the padding is seen: without the mask, one process gives another output
                with torch.no_grad():
                    unmasked = single(**{**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])},
                                      return_dict=False)[0]
                report["checks"][mode]["mask_changes_output"] = (want - unmasked).abs().max().item()
                # ten times the tolerance at least: a mask lost or misplaced under CP would fail the comparison
                ok &= report["checks"][mode]["mask_changes_output"] > 10 * TOLERANCE * max(1.0, scale)
            if args.plain_cp:
                cp_plain = copy.deepcopy(base)
                enable_cp(cp_plain, args)
                with torch.no_grad():
                    plain_cp = cp_plain(**kw, return_dict=False)[0]
                report["checks"][mode]["plain_cp_err"] = (plain_cp - plain).abs().max().item()
                ok &= report["checks"][mode]["plain_cp_err"] <= TOLERANCE * max(1.0, scale)
            if args.outside_window:
                cp_plain = copy.deepcopy(base)
                enable_cp(cp_plain, args)
                with torch.no_grad():
                    diffusers_cp = cp_plain(**kw, return_dict=False)[0]
                report["checks"][mode]["bit_identical_to_diffusers_cp"] = bool(torch.equal(got, diffusers_cp))
                ok &= torch.equal(got, diffusers_cp)
            else:
                ok &= err <= TOLERANCE * max(1.0, scale)
                ok &= report["checks"][mode]["tar_changes_output"] > 100 * TOLERANCE  # the band is visible
            if args.remove:
                remove_tar(parallel)
                cp_plain = copy.deepcopy(base)
                enable_cp(cp_plain, args)
                with torch.no_grad():
                    after = parallel(**kw, return_dict=False)[0]
                    diffusers_cp = cp_plain(**kw, return_dict=False)[0]
                report["checks"][mode]["removed_equals_diffusers_cp"] = bool(torch.equal(after, diffusers_cp))
                ok &= torch.equal(after, diffusers_cp)
    except Exception as exc:  # reported, not hung: every rank raises the same check before any collective
        report["error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    return finish(report, ok, args)


def bias_arguments(args, model, mode: str) -> dict:
    """apply_tar's bias arguments: the band of --sigma, or with --profile a band plus per-head bias tables (one
    masked distance for head 0), a window of radius 1 with one sink frame and a decay beyond 1 frame."""
    if not args.profile:
        return {"sigma": args.sigma, "strength": 1.5, "mode": mode}
    heads = next(m.heads for name, m in model.named_modules()
                 if name.endswith(("attn1", ".attn")) and hasattr(m, "heads"))
    bias = torch.randn(heads, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bias[0, 2] = float("-inf")
    return {"profile": FrameProfile.gaussian(args.sigma, 1.5, mode) + FrameProfile.table(bias=bias)
            + FrameProfile.window(1, sink_frames=1) + FrameProfile.decay_beyond(1, 0.7)}


def count_ring_attention_calls(report: dict) -> list:
    """Record each op call of the Ring's loop (sequence_parallel.tar_attention with return_lse): the key spans a
    window masks are skipped, so a windowed profile makes fewer calls."""
    calls: list = []
    real = sequence_parallel.tar_attention

    def counting(*a, **kw):
        if kw.get("return_lse"):
            calls.append(kw.get("k_token_offset"))
        return real(*a, **kw)

    sequence_parallel.tar_attention = counting
    return calls


def finish(report: dict, ok: bool, args) -> int:
    """Writes this rank's report; the process group is closed by ``run_rank`` after ``main`` returns."""
    report["ok"] = bool(ok)
    Path(args.report_dir, f"rank{report['rank']}.json").write_text(json.dumps(report))
    return 0 if ok else 1


class _Tracked:
    """A posted transfer's request that records whether it was waited."""

    def __init__(self, request) -> None:
        self.request, self.waited = request, False

    def wait(self, *args, **kwargs):
        self.waited = True
        return self.request.wait(*args, **kwargs)


def run_ring_error(args, report: dict) -> bool:
    """The Ring (inference: the ring loop of ``ring_tar_attention``) with its op raising at step ``--ring-error`` on
    every rank (``--ring-error-op``: the row-max pass or the attention pass), right after that step's transfer was
    posted: the error reaches the caller, every transfer posted was waited (none left in flight for the exit), and
    the group still works afterwards (the Ring run again equals one process)."""
    from vstar_kernels.distributed import sequence_parallel
    from vstar_kernels.distributed.layout import RankGroup, split_sizes

    rank, world = dist.get_rank(), dist.get_world_size()
    rg = RankGroup(dist.group.WORLD, rank, world, "gloo")
    gen = torch.Generator().manual_seed(5)
    tokens = 8 * world
    q, k, v = (torch.randn(1, tokens, 2, 8, generator=gen) for _ in range(3))
    spans = split_sizes(tokens, world)
    start = sum(spans[:rank])
    mine = [t[:, start:start + spans[rank]].contiguous() for t in (q, k, v)]
    tar = dict(sigma=3.0, strength=1.5, mode="relative", scale=None, tokens_per_frame=4, video_start=0,
               video_tokens=tokens, backend="torch")
    name = "tar_row_max" if args.ring_error_op == "row_max" else "tar_attention"
    real_op, real_post, calls, posted = getattr(sequence_parallel, name), dist.batch_isend_irecv, [0], []

    def failing_op(*a, **kw):
        calls[0] += 1
        if calls[0] == args.ring_error + 1:
            raise RuntimeError(f"injected failure at step {args.ring_error}")
        return real_op(*a, **kw)

    def post(ops):
        requests = [_Tracked(request) for request in real_post(ops)]
        posted.extend(requests)
        return requests

    error = ""
    with mock.patch.object(sequence_parallel, name, failing_op), mock.patch.object(dist, "batch_isend_irecv", post):
        try:
            with torch.no_grad():
                sequence_parallel.ring_tar_attention(*mine, spans, rg, tar)
        except RuntimeError as exc:
            error = str(exc)
    unwaited = sum(not request.waited for request in posted)
    with torch.no_grad():
        again = sequence_parallel.ring_tar_attention(*mine, spans, rg, tar)
        want = sequence_parallel.tar_attention(mine[0], k, v, q_token_offset=start, k_token_offset=0, **tar)
    err = (again - want).abs().max().item()
    report["checks"]["ring_error"] = {"error": error, "posted": len(posted), "unwaited": unwaited, "max_err": err}
    return (error == f"injected failure at step {args.ring_error}" and len(posted) > 0 and unwaited == 0
            and err <= TOLERANCE)


def run_plan_without_hook(args, report: dict) -> bool:
    """HunyuanVideo with hunyuan_video_cp_plan() given straight to enable_parallelism (no refiner-mask hook): the
    token refiner gets a split mask for the whole text, and the forward raises instead of masking wrongly."""
    from diffusers import ContextParallelConfig

    from vstar_kernels.diffusers.dit.context_parallel import hunyuan_video_cp_plan

    transformer = build("hunyuan")
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=args.ulysses),
                                       cp_plan=hunyuan_video_cp_plan())
    try:
        with torch.no_grad():
            transformer(**inputs("hunyuan", args.frames, *args.size, text_mask=True), return_dict=False)
    except RuntimeError as exc:
        report["checks"]["raised"] = f"{type(exc).__name__}: {exc}"[:300]
        return True
    return False


def run_synopsis(args, report: dict) -> bool:
    """Per-frame prompts (and TAR) under diffusers' CP against one process: every rank's shard of the video, which
    may begin inside a frame, attends to the text of each token's global frame."""
    from vstar_kernels.diffusers import apply_synopsis

    base = build(args.model)
    kw = inputs(args.model, args.frames, *args.size, text_mask=args.text_mask)
    context = kw["encoder_hidden_states"]
    embeds = torch.randn(args.frames, *context.shape[1:], generator=torch.Generator().manual_seed(3))
    embeds[0] = context[0]  # the call's prompt is the first state
    mask = None
    if args.model == "ltx" and args.text_mask:
        mask = torch.ones(args.frames, context.shape[1])
        mask[0] = kw["encoder_attention_mask"][0]
        mask[-1, 3:] = 0
    outputs = {}
    for name in ("single", "parallel", "tar-only"):
        model = copy.deepcopy(base)
        if name == "parallel" and args.order == "cp-first":
            enable_cp(model, args)
        apply_tar(model, sigma=args.sigma, strength=1.5, timesteps="all", backend=args.backend)
        if name != "tar-only":
            apply_synopsis(model, embeds, mask)
        if name == "parallel" and args.order == "tar-first":
            enable_cp(model, args)
        with torch.no_grad():
            outputs[name] = model(**kw, return_dict=False)[0]
    want = outputs["single"]
    check = {"max_err": (outputs["parallel"] - want).abs().max().item(), "scale": want.abs().max().item(),
             "synopsis_changes_output": (want - outputs["tar-only"]).abs().max().item()}
    report["checks"]["synopsis"] = check
    return (check["max_err"] <= TOLERANCE * max(1.0, check["scale"])
            and check["synopsis_changes_output"] > 100 * TOLERANCE)


def run_pipeline(args, report: dict) -> bool:
    """WanPipeline (tiny UMT5, Wan VAE, a 4-head transformer) with TAR: one process, then diffusers' CP."""
    latents = []
    for parallel in (False, True):
        pipe = tiny.wan_pipeline(tiny.tiny_wan_transformer(heads=4, head_dim=12))
        experts = [pipe.transformer]
        if args.experts == 2:  # Wan 2.2 A14B: the low-noise expert takes the steps below the boundary
            from diffusers import WanPipeline

            second = tiny.tiny_wan_transformer(heads=4, head_dim=12)
            with torch.no_grad():
                for param in second.parameters():
                    param.mul_(0.9)  # another expert: other weights
            pipe = WanPipeline(**{**pipe.components, "transformer_2": second}, boundary_ratio=0.5)
            experts.append(second)
        if parallel and args.order == "cp-first":
            for expert in experts:
                enable_cp(expert, args)
        if args.ultravico:  # UltraViCo's preset composed with TAR's band
            handle = apply_tar(pipe, preset="ultravico", sigma=args.sigma, timesteps="all", backend=args.backend)
        else:
            handle = apply_tar(pipe, sigma=args.sigma, strength=1.5, timesteps="all", backend=args.backend)
        report["checks"]["patched_layers"] = handle.num_layers
        if parallel and args.order == "tar-first":
            for expert in experts:
                enable_cp(expert, args)
        calls = [0] * len(experts)
        for index, expert in enumerate(experts):
            expert.register_forward_pre_hook(lambda *_, i=index, c=calls: c.__setitem__(i, c[i] + 1))
        with torch.no_grad():
            frames = (21 * args.ultravico - 1) * 4 + 1 if args.ultravico else 9
            out = pipe("w3 w4 w5", negative_prompt="w6", num_frames=frames, height=32, width=32, num_inference_steps=2,
                       guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0))
        latents.append(out.frames)
        report["checks"]["calls_per_expert"] = calls
    err = (latents[1] - latents[0]).abs().max().item()
    report["checks"]["pipeline"] = {"max_err": err, "scale": latents[0].abs().max().item(),
                                    "shape": list(latents[0].shape)}
    return err <= TOLERANCE * max(1.0, latents[0].abs().max().item())


def check_backward(single, parallel, kw, report, mode) -> bool:
    """d(loss)/d(hidden_states) and one weight's gradient through CP + TAR equal one process's."""
    grads = []
    for model in (single, parallel):
        x = kw["hidden_states"].clone().requires_grad_()
        out = model(**{**kw, "hidden_states": x}, return_dict=False)[0]
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
        block = model.blocks[0] if hasattr(model, "blocks") else model.transformer_blocks[0]
        attention = getattr(block, "attn1", None) or block.attn  # HunyuanVideo's blocks name it attn
        grads.append((x.grad, attention.to_q.weight.grad))
    (gx, gw), (px, pw) = grads
    # each rank's gradients are its shard's contribution (diffusers' gather keeps a rank's own share of the output
    # gradient): summed over the ranks they are the whole computation's
    px, pw = px.clone(), pw.clone()
    dist.all_reduce(px)
    dist.all_reduce(pw)
    err_x = (px - gx).abs().max().item()
    err_w = (pw - gw).abs().max().item()
    report["checks"][mode] = {"grad_input_err": err_x, "grad_weight_err": err_w,
                              "scale": max(gx.abs().max().item(), gw.abs().max().item())}
    return err_x <= TOLERANCE * max(1.0, gx.abs().max().item()) and err_w <= TOLERANCE * max(1.0, gw.abs().max().item())


if __name__ == "__main__":
    sys.exit(run_rank(main))
