"""Per-frame text conditioning for diffusers video UNets: frame f's spatial cross-attention sees embedding f.

The UNets repeat one text embedding for every frame: UNet3DConditionModel repeats it internally, and
AnimateDiff's pipeline repeats it before calling UNetMotionModel. Either way each spatial cross-attention layer
receives ``encoder_hidden_states`` of shape (batch·frames, tokens, dim), frame-major within each batch item. The
synopsis processor wraps those layers' processors and swaps in the per-frame embeddings for the conditional
batch items; everything else passes through to the wrapped processor.

Classifier-free guidance: diffusers pipelines stack (unconditional, conditional). With an even batch the last half
is conditional and gets the per-frame embeddings; the unconditional half keeps its single embedding. With an odd
batch (no CFG) every item is conditional.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..distributed.context import frame_window
from ..synopsis import keyframe_indices, keyframe_weights, latent_keyframes, synopsis_embeddings
from .components import remove_pre_hook, restore_processors, unet_of
from .discovery import temporal_container_paths
from .dit_synopsis import DiTSynopsisHandle, apply_transformer_synopsis, remove_transformer_synopsis
from .video_transformers import temporal_compression, video_transformers_of

_STATE_ATTR = "_vstar_synopsis_state"


class SynopsisCrossAttnProcessor:
    """Wraps a spatial cross-attention processor; replaces the conditional rows of ``encoder_hidden_states`` with
    the per-frame embeddings (frames, tokens, dim). A plain object, like the processors it wraps."""

    def __init__(self, inner, frame_embeds: torch.Tensor) -> None:
        self.inner = inner
        self.frame_embeds = frame_embeds

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None:
            frame_embeds = self.frame_embeds
            window = frame_window()  # frame parallelism: this rank holds frames start..start+count
            if window is not None:
                frame_embeds = frame_embeds[window[0]:window[0] + window[1]]
            encoder_hidden_states = per_frame_context(encoder_hidden_states, frame_embeds)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def per_frame_context(context: torch.Tensor, frame_embeds: torch.Tensor) -> torch.Tensor:
    """(batch·frames, tokens, dim) context with the conditional batch items' rows replaced by ``frame_embeds``."""
    frames = frame_embeds.shape[0]
    rows = context.shape[0]
    if rows % frames:
        raise ValueError(f"cross-attention batch {rows} is not a multiple of the synopsis' {frames} frames: the "
                         f"video must have as many frames as the per-frame embeddings")
    if context.shape[1:] != frame_embeds.shape[1:]:
        raise ValueError(f"per-frame embeddings are (frames, {tuple(frame_embeds.shape[1:])}), the text "
                         f"embedding is (…, {tuple(context.shape[1:])}): encode the states like the prompt")
    batch = rows // frames
    first_cond = batch // 2 if batch % 2 == 0 else 0
    out = context.clone()
    view = out.view(batch, frames, *context.shape[1:])
    view[first_cond:] = frame_embeds.to(device=context.device, dtype=context.dtype)
    return out


class SynopsisFrameCheck:
    """UNet forward pre-hook: a call must have as many frames as the synopsis. The sample is (batch, channels,
    frames, height, width); a mismatch is a ValueError naming both counts, before anything runs (otherwise frames
    and CFG halves would silently be conditioned on the wrong embeddings)."""

    def __init__(self, frames: int) -> None:
        self.frames = frames

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        if isinstance(sample, torch.Tensor) and sample.dim() == 5 and sample.shape[2] != self.frames:
            raise ValueError(f"the synopsis has {self.frames} per-frame embeddings but this call has "
                             f"{sample.shape[2]} frames: build it with synopsis_embeddings(..., num_frames="
                             f"{sample.shape[2]}) and apply_synopsis again")


@dataclass
class SynopsisHandle:
    """What ``apply_synopsis`` patched: the spatial cross-attention layers and the per-frame embeddings."""

    layers: list[str]
    frame_embeds: torch.Tensor
    _originals: dict[str, object] = field(default_factory=dict, repr=False)
    _installed: dict[str, SynopsisCrossAttnProcessor] = field(default_factory=dict, repr=False)
    _check: SynopsisFrameCheck | None = field(default=None, repr=False)


def spatial_cross_attention(unet: nn.Module) -> list[str]:
    """Module paths of the cross-attention layers outside temporal containers (the spatial text conditioning)."""
    temporal = tuple(temporal_container_paths(unet))
    return [name for name, module in unet.named_modules()
            if getattr(module, "is_cross_attention", False) and hasattr(module, "processor")
            and not name.startswith(temporal)]


def apply_synopsis(model: nn.Module, frame_embeds: torch.Tensor | tuple,
                   frame_attention_mask: torch.Tensor | None = None) -> SynopsisHandle | DiTSynopsisHandle:
    """Condition each frame of ``model`` on its own text embedding.

    - A video UNet (UNet3DConditionModel, UNetMotionModel, or a pipeline with ``.unet``): frame f on
      ``frame_embeds[f]`` ((frames, tokens, dim), e.g. from :func:`vstar_kernels.synopsis_embeddings`).
    - A video transformer whose text enters through cross-attention (Wan T2V/I2V, Wan 2.2's two experts, LTX-Video;
      a bare transformer or a pipeline): latent frame f on ``frame_embeds[f]`` ((latent frames, tokens, text_dim):
      the raw text-encoder output a pipeline passes as ``encoder_hidden_states``, one row per latent frame), with
      ``frame_attention_mask`` ((latent frames, tokens), LTX-Video's text mask; without it each frame's text keeps
      the tokens the call's own ``encoder_attention_mask`` keeps). A call whose
      ``encoder_hidden_states`` is the first row is conditioned per frame; any other (a negative prompt) runs
      unchanged (see :mod:`vstar_kernels.diffusers.dit_synopsis`). CogVideoX and HunyuanVideo (text inside the
      self-attention) raise NotImplementedError.

    ``frame_embeds`` may be what :func:`synopsis_prompt_embeds` returns (embeddings and mask together). Applying
    again replaces the previous synopsis. Composes with ``apply_tar`` in either order. A call with another frame
    count than ``frame_embeds`` raises ValueError naming both.
    """
    if isinstance(frame_embeds, tuple):
        if frame_attention_mask is not None:
            raise ValueError("give the mask once: frame_embeds already holds (embeddings, mask)")
        frame_embeds, frame_attention_mask = frame_embeds
    transformers = video_transformers_of(model)
    if transformers:
        return apply_transformer_synopsis(transformers, frame_embeds, frame_attention_mask)
    if frame_attention_mask is not None:
        raise ValueError("frame_attention_mask applies to video transformers with a text mask (LTX-Video); a UNet's "
                         "text has none")
    unet = unet_of(model)
    if not isinstance(frame_embeds, torch.Tensor) or frame_embeds.dim() != 3:
        raise ValueError("frame_embeds must be a (frames, tokens, dim) tensor")
    names = spatial_cross_attention(unet)
    if not names:
        raise ValueError(f"{type(unet).__name__} has no spatial cross-attention to condition per frame")
    remove_synopsis(unet)
    handle = SynopsisHandle(layers=names, frame_embeds=frame_embeds)
    modules = dict(unet.named_modules())
    for name in names:
        module = modules[name]
        installed = SynopsisCrossAttnProcessor(module.processor, frame_embeds)
        handle._originals[name] = module.processor
        handle._installed[name] = installed
        module.set_processor(installed)
    handle._check = SynopsisFrameCheck(frame_embeds.shape[0])
    unet.register_forward_pre_hook(handle._check, with_kwargs=True)
    setattr(unet, _STATE_ATTR, handle)
    return handle


def remove_synopsis(model: nn.Module) -> bool:
    """Restore the processors ``apply_synopsis`` wrapped (and on a transformer its hook); False if no synopsis was
    applied."""
    transformers = video_transformers_of(model)
    if transformers:
        return any([remove_transformer_synopsis(transformer) for transformer in transformers.values()])
    unet = unet_of(model)
    handle: SynopsisHandle | None = unet.__dict__.pop(_STATE_ATTR, None)
    if handle is None:
        return False
    restore_processors(unet, handle._originals, lambda name, current: current is handle._installed[name])
    if handle._check is not None:
        remove_pre_hook(unet, handle._check)
    return True


# ------------------------------------------------------------------------------------------ from a pipeline
class FramePrompts(NamedTuple):
    """Per-frame prompts as :func:`apply_synopsis` takes them: the embeddings (frames, tokens, dim) and the text
    mask (frames, tokens) of a model that masks its text (LTX-Video), else None."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor | None


def encode_states(pipe: object, states: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each state encoded by the pipeline's own ``encode_prompt``, one call per state and without CFG, exactly as
    ``pipe(state, ...)`` encodes its prompt (the text encoder, max length and padding of its ``__call__``): the
    embeddings (K, tokens, dim) and, for a pipeline that masks its text (LTX-Video), the masks (K, tokens)."""
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None:
        raise TypeError(f"{type(pipe).__name__} has no encode_prompt: give synopsis_prompt_embeds a diffusers "
                        "text-to-video pipeline")
    if isinstance(states, str) or not states or not all(isinstance(s, str) and s.strip() for s in states):
        raise ValueError("states must be a non-empty list of non-empty strings")
    params = inspect.signature(encode).parameters
    kwargs: dict[str, object] = {"do_classifier_free_guidance": False}
    for name in ("num_videos_per_prompt", "num_images_per_prompt"):
        if name in params:
            kwargs[name] = 1
    if "device" in params:
        kwargs["device"] = pipe._execution_device
    call_default = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if "max_sequence_length" in params and call_default is not None:
        kwargs["max_sequence_length"] = call_default.default
    masked = "prompt_attention_mask" in params
    embeds, masks = [], []
    with torch.no_grad():
        for state in states:
            out = encode(prompt=state, **kwargs)
            embeds.append(out[0])
            if masked:
                masks.append(out[1])
    return torch.cat(embeds), torch.cat(masks) if masked else None


def synopsis_prompt_embeds(pipe: object, states: list[str], num_frames: int, mode: str = "linear") -> FramePrompts:
    """Per-frame prompts for ``pipe`` from K visual ``states`` in one call: each state encoded with the pipeline's
    own ``encode_prompt`` (:func:`encode_states`), interpolated over the frames with
    :func:`vstar_kernels.synopsis_embeddings` (``num_frames`` is the video's frame count; with a video transformer
    the rows are its latent frames). A text mask (LTX-Video) follows the embeddings: a frame at a keyframe takes
    that keyframe's mask, a frame between two keyframes keeps the tokens either keeps. Pass the result to
    :func:`apply_synopsis` as it is."""
    embeds, masks = encode_states(pipe, list(states))
    frame_embeds = synopsis_embeddings(embeds, num_frames, mode, pipe=pipe)
    if masks is None:
        return FramePrompts(frame_embeds, None)
    if masks.shape[0] == 1:
        return FramePrompts(frame_embeds, masks.expand(frame_embeds.shape[0], -1).clone())
    keys = keyframe_indices(masks.shape[0], num_frames)
    frames = num_frames
    compression = temporal_compression(pipe)
    if compression is not None:
        frames, keys = latent_keyframes(keys, num_frames, compression)
    segment, weight = keyframe_weights(keys.to(masks.device), frames, mode)
    left, right = masks[segment], masks[segment + 1]
    weight = weight.to(masks.device)[:, None]
    frame_masks = torch.where(weight == 0, left, torch.where(weight == 1, right, torch.maximum(left, right)))
    return FramePrompts(frame_embeds, frame_masks)
