"""``vstar-kernels demo``: one long single-pass video with TAR, and the picture that explains TAR.

Without ``--model`` it builds a small random pipeline offline (:mod:`vstar_kernels.diffusers.tiny`: real diffusers
classes, random weights, so the video is noise but memory and time behave like the real thing) of ``--family``:
"modelscope" (TextToVideoSDPipeline, the default), "animatediff" (AnimateDiffPipeline whose motion adapter has the
released 32-row position tables, interpolated to the frame count) or "wan" (WanPipeline: a video transformer with a
tiny UMT5 encoder and the Wan VAE; TAR with ``--sigma`` in latent frames, default 2, and per-frame prompts over its
latent frames with ``--synopsis``; no attention figure, which records UNet temporal attention); with
``--model PATH`` it loads a local diffusers pipeline folder. It applies TAR, records the temporal attention
maps of one denoising call with and without TAR on the same noisy latents, generates the video (one pass, a
progress bar per step; with ``--synopsis`` each frame is conditioned on its interpolated state), and writes
``video.gif`` (``video.mp4`` too when imageio is installed) and
``attention.png``. It prints the backend, peak memory and time.

Under ``torchrun --nproc-per-node P`` (``WORLD_SIZE`` > 1) the pipeline runs frame-parallel
(:func:`vstar_kernels.distributed.enable_frame_parallel`: each rank computes its share of the frames; NCCL on CUDA,
gloo on CPU); rank 0 prints and writes the video once, every rank reports its own peak memory, and the attention
figure is skipped (its maps are recorded in one process).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

from .ops import backend_for


class DemoError(Exception):
    """A bad argument or environment: reported as one line, exit status 2."""


# the demo extra: the pipeline (diffusers, transformers for its text encoder) and the figure (matplotlib)
DEMO_MODULES = ("diffusers", "transformers", "matplotlib")
FAMILIES = ("modelscope", "animatediff", "wan")
TRANSFORMER_FAMILIES = ("wan",)
DEFAULT_FRAMES = {"wan": 33}  # a valid Wan length (4n + 1); the UNets' default is 128
DEFAULT_TRANSFORMER_SIGMA = 2.0  # latent frames
DEFAULT_FAMILY = "modelscope"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import DEFAULT_PRESET, PRESETS

    parser.add_argument("--model", help="a local diffusers text-to-video pipeline folder (default: tiny, offline)")
    parser.add_argument("--family", choices=FAMILIES,
                        help=f"the tiny offline pipeline: {', '.join(FAMILIES)} (default {DEFAULT_FAMILY}; "
                             "animatediff has the released 32-position motion adapter; wan is a video "
                             "transformer, frames 4n + 1)")
    parser.add_argument("--prompt", default="a red balloon drifting over a city at sunset")
    parser.add_argument("--frames", type=int, help="frames generated in one pass (default 128; wan: 33)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"TAR preset: {', '.join(PRESETS)}")
    parser.add_argument("--sigma", type=float,
                        help="one sigma at level 0 instead of a preset (wan: the band in latent frames, default 2)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--size", type=int, default=32, help="height = width in pixels (default 32, tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="vstar-demo", help="output folder (default ./vstar-demo)")
    parser.add_argument("--synopsis", nargs="+", metavar="STATE",
                        help="video synopsis prompting: visual states, interpolated over the frames (first to last)")


def _validate(args: argparse.Namespace) -> Path:
    from .presets import PRESETS

    if args.frames is None:
        args.frames = DEFAULT_FRAMES.get(args.family, 128)
    if args.frames < 1:
        raise DemoError(f"--frames must be >= 1, got {args.frames}")
    if args.steps < 1 or args.size < 8:
        raise DemoError("--steps must be >= 1 and --size >= 8")
    if args.sigma is None and args.preset not in PRESETS:
        raise DemoError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)} or pass --sigma")
    if args.sigma is not None and not args.sigma > 0:
        raise DemoError(f"--sigma must be > 0, got {args.sigma}")
    if args.model is not None and not (Path(args.model) / "model_index.json").is_file():
        raise DemoError(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
    if args.model is not None and args.family is not None:
        raise DemoError("--family picks the tiny offline pipeline; it cannot be combined with --model")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError("--device cuda but CUDA is not available")
    if args.family in TRANSFORMER_FAMILIES:
        if (args.frames - 1) % 4:
            lower = (args.frames - 1) // 4 * 4 + 1
            raise DemoError(f"--family {args.family}: --frames must be 4n + 1 (its VAE), e.g. {lower} or {lower + 4}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DemoError(f"--family {args.family}: the demo runs a video transformer in one process (frame "
                            "parallelism is for UNets; transformers use diffusers' context parallelism)")
    if args.synopsis is not None:
        if any(not state.strip() for state in args.synopsis):
            raise DemoError("--synopsis states must be non-empty")
        if len(args.synopsis) > args.frames:
            raise DemoError(f"--synopsis has {len(args.synopsis)} states for {args.frames} frames")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vstar-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DemoError(f"--out {out}: not writable ({exc.strerror or exc})") from None
    return out


def _pipeline(args: argparse.Namespace):
    if args.model is None:
        from .diffusers import tiny

        if (args.family or DEFAULT_FAMILY) == "animatediff":
            return tiny.animatediff_pipeline(*tiny.tiny_animatediff_unet("animatediff"))
        if args.family == "wan":
            return tiny.wan_pipeline()
        return tiny.text_to_video_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.model)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_video(frames: torch.Tensor, out: Path) -> list[Path]:
    """frames: (F, C, H, W) in [0, 1]. GIF always (Pillow, a diffusers dependency); MP4 when imageio can."""
    from PIL import Image

    images = [Image.fromarray((f.permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()) for f in frames]
    gif = out / "video.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=125, loop=0)
    written = [gif]
    try:
        import imageio.v3 as iio

        mp4 = out / "video.mp4"
        iio.imwrite(mp4, [(f.permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy() for f in frames], fps=8)
        written.append(mp4)
    except Exception:  # imageio or its ffmpeg plugin missing: the GIF is the video
        pass
    return written


def _attention_maps(pipe, args: argparse.Namespace, tar_kwargs: dict, device: torch.device):
    """Maps of one UNet call at the noisiest step on the same latents and prompt embedding, without and with TAR.
    Both calls see the same frame positions (AnimateDiff's tables interpolated past their rows)."""
    from .diffusers import (
        apply_tar,
        extend_frame_positions,
        record_temporal_attention,
        remove_tar,
        restore_frame_positions,
    )

    unet = pipe.unet
    latent = args.size // pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, unet.config.in_channels, args.frames, latent, latent, generator=gen).to(device, unet.dtype)
    prompt_embeds, _ = pipe.encode_prompt(args.prompt, device, 1, False)
    if type(unet).__name__ == "UNetMotionModel":  # AnimateDiff's UNet takes the embedding repeated per frame
        prompt_embeds = prompt_embeds.repeat_interleave(args.frames, dim=0)
    t = pipe.scheduler.config.num_train_timesteps - 1
    extend_frame_positions(unet)  # what apply_tar does by default, kept for the call without TAR too
    layers = list(apply_tar(pipe, **tar_kwargs, timesteps="all").layers)

    def record():
        with torch.no_grad(), record_temporal_attention(unet, positions=16, layers=layers, seed=args.seed) as maps:
            unet(x, t, encoder_hidden_states=prompt_embeds)
        return maps

    with_tar = record()
    remove_tar(pipe)
    without_tar = record()
    restore_frame_positions(unet)
    return {"without TAR": without_tar, "with TAR": with_tar}


def _apply_synopsis(pipe, states: list[str], num_frames: int, device: torch.device) -> None:
    """Encode each state like the prompt, interpolate to one embedding per frame, condition frame f on it."""
    from .diffusers import apply_synopsis
    from .synopsis import synopsis_embeddings

    keyframes = torch.cat([pipe.encode_prompt(state, device, 1, False)[0] for state in states])
    apply_synopsis(pipe, synopsis_embeddings(keyframes, num_frames))


def run_demo(args: argparse.Namespace) -> int:
    """The demo; raises DemoError for bad arguments (the CLI prints it as one line)."""
    from .extras import missing_modules

    missing = missing_modules(DEMO_MODULES)
    if missing:  # before any work: the figure is drawn after the pipeline has run
        raise DemoError(f"the demo needs {' and '.join(missing)}, not installed: pip install 'vstar-kernels[demo]'")
    from .diffusers.tiny import known_noise_silenced

    out = _validate(args)
    with known_noise_silenced():
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    from .diffusers import apply_tar, plot_temporal_attention

    device = torch.device(args.device)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe = _pipeline(args).to(device)
    if args.family in TRANSFORMER_FAMILIES:
        return _run_transformer(pipe, args, out, device, start)
    if not hasattr(pipe, "unet"):
        raise DemoError(f"--model {args.model}: the pipeline has no UNet")
    tar_kwargs = {"sigma": args.sigma} if args.sigma is not None else {"preset": args.preset}
    figure = None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        maps = _attention_maps(pipe, args, tar_kwargs, device)
        figure = plot_temporal_attention(
            maps, out / "attention.png", title=f"temporal attention at the noisiest step, {args.frames} frames "
                                               "(mean over TAR layers, heads, positions)")

    handle = apply_tar(pipe, **tar_kwargs)
    rank, world = 0, 1
    if figure is None:
        from .distributed import enable_frame_parallel

        state = enable_frame_parallel(pipe)
        rank, world = state.rg.rank, state.rg.world
    say = print if rank == 0 else _quiet
    layer = pipe.unet.get_submodule(next(iter(handle.layers)))
    backend = backend_for(device, pipe.unet.dtype, layer.inner_dim // layer.heads)
    say(f"vstar-kernels demo: {args.frames} frames, {args.size}x{args.size}, {args.steps} steps, "
          f"{handle.num_layers} TAR layers ({args.preset if args.sigma is None else f'sigma={args.sigma}'}), "
          f"backend {backend} on {device.type}", flush=True)
    if handle.position_tables:
        rows = sorted(set(handle.position_tables.values()))
        fit = "within them" if args.frames <= max(rows) else f"positions={handle.positions!r} beyond them"
        say(f"frame positions: {len(handle.position_tables)} motion tables of {'/'.join(map(str, rows))} rows, "
              f"{args.frames} frames: {fit}", flush=True)
    prompt = args.prompt
    if args.synopsis:
        _apply_synopsis(pipe, args.synopsis, args.frames, device)
        prompt = args.synopsis[0]  # its conditional embedding is replaced per frame; the negative one is kept
        say(f"synopsis: {len(args.synopsis)} states over {args.frames} frames: " + " -> ".join(args.synopsis))
    generator = torch.Generator().manual_seed(args.seed)
    frames = pipe(prompt, num_frames=args.frames, num_inference_steps=args.steps, height=args.size,
                  width=args.size, generator=generator, output_type="pt").frames[0]
    written = _write_video(frames, out) if rank == 0 else []
    elapsed = time.perf_counter() - start
    for path in [*written, *([figure] if figure else [])]:
        say(f"wrote {path}")
    if world > 1:
        say(f"frame parallel over {world} ranks: attention.png skipped (maps are recorded in one process)")
    print(f"{f'rank {rank}: ' if world > 1 else ''}peak memory {_peak_mib(device):.0f} MiB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process RSS'}), time {elapsed:.1f} s, "
          f"backend {backend}", flush=True)
    if world > 1:  # the group closed on every rank together, the pipeline's hold on it released first
        from .distributed import disable_frame_parallel
        from .distributed.layout import close_process_group

        disable_frame_parallel(pipe)
        del state
        close_process_group()
    return 0


def _run_transformer(pipe, args: argparse.Namespace, out: Path, device: torch.device, start: float) -> int:
    """The demo on a video-transformer pipeline: TAR (sigma in latent frames) and, with ``--synopsis``, per-frame
    prompts from :func:`vstar_kernels.diffusers.synopsis_prompt_embeds` over its latent frames."""
    from .diffusers import apply_synopsis, apply_tar, synopsis_prompt_embeds

    sigma = DEFAULT_TRANSFORMER_SIGMA if args.sigma is None else args.sigma
    handle = apply_tar(pipe, sigma=sigma)
    attention = pipe.transformer.get_submodule(next(iter(handle.layers)).removeprefix("transformer."))
    backend = backend_for(device, pipe.transformer.dtype, attention.inner_dim // attention.heads)
    print(f"vstar-kernels demo: {args.frames} frames, {args.size}x{args.size}, {args.steps} steps, "
          f"{handle.num_layers} TAR layers (sigma={sigma} latent frames), backend {backend} on {device.type}",
          flush=True)
    prompt = args.prompt
    if args.synopsis:
        prompts = synopsis_prompt_embeds(pipe, args.synopsis, args.frames)
        apply_synopsis(pipe, prompts)
        prompt = args.synopsis[0]  # the conditional call carries the first state; its rows are replaced per frame
        print(f"synopsis: {len(args.synopsis)} states over {args.frames} frames ({prompts.embeds.shape[0]} latent "
              "frames): " + " -> ".join(args.synopsis), flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    frames = pipe(prompt, num_frames=args.frames, num_inference_steps=args.steps, height=args.size,
                  width=args.size, generator=generator, output_type="pt").frames[0]
    written = _write_video(frames, out)
    for path in written:
        print(f"wrote {path}")
    print("attention.png skipped: the figure records a UNet's temporal attention")
    print(f"peak memory {_peak_mib(device):.0f} MiB ({'CUDA allocator' if device.type == 'cuda' else 'process RSS'})"
          f", time {time.perf_counter() - start:.1f} s, backend {backend}", flush=True)
    return 0


def _quiet(*args, **kwargs) -> None:
    """print() for ranks other than 0."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vstar-kernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run_demo(parser.parse_args(argv))
    except DemoError as exc:
        print(f"vstar-kernels demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    raise SystemExit(main())
