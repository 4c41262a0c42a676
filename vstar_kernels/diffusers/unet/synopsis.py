"""Per-frame text conditioning on diffusers video UNets: frame f's spatial cross-attention sees embedding f.

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

from dataclasses import dataclass, field

import torch
from torch import nn

from ...distributed.context import frame_window
from ..shared.components import (
    SYNOPSIS_STATE_ATTR,
    remove_pre_hook,
    restore_processors,
    set_processor_tracked,
    unet_of,
)
from .discovery import temporal_container_paths


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


def apply_unet_synopsis(model: nn.Module, frame_embeds: torch.Tensor) -> SynopsisHandle:
    """``apply_synopsis`` on a video UNet (UNet3DConditionModel, UNetMotionModel, or a pipeline with ``.unet``):
    frame f's spatial cross-attention on ``frame_embeds[f]`` ((frames, tokens, dim), e.g. from
    :func:`vstar_kernels.synopsis_embeddings`).

    ValueError, before anything changes, for embeddings that are not (frames, tokens, dim) or a UNet without spatial
    cross-attention. Applying again replaces the previous synopsis; composes with TAR in either order. A call with
    another frame count than ``frame_embeds`` raises ValueError naming both (:class:`SynopsisFrameCheck`).
    """
    unet = unet_of(model)
    if not isinstance(frame_embeds, torch.Tensor) or frame_embeds.dim() != 3:
        raise ValueError("frame_embeds must be a (frames, tokens, dim) tensor")
    names = spatial_cross_attention(unet)
    if not names:
        raise ValueError(f"{type(unet).__name__} has no spatial cross-attention to condition per frame")
    remove_unet_synopsis(unet)
    handle = SynopsisHandle(layers=names, frame_embeds=frame_embeds)
    modules = dict(unet.named_modules())
    for name in names:
        module = modules[name]
        installed = SynopsisCrossAttnProcessor(module.processor, frame_embeds)
        set_processor_tracked(module, installed, name, handle._originals, handle._installed)
    handle._check = SynopsisFrameCheck(frame_embeds.shape[0])
    unet.register_forward_pre_hook(handle._check, with_kwargs=True)
    setattr(unet, SYNOPSIS_STATE_ATTR, handle)
    return handle


def remove_unet_synopsis(model: nn.Module) -> bool:
    """Restore the processors :func:`apply_unet_synopsis` wrapped (those still its own) and remove its frame-count
    check; False if no synopsis was applied."""
    unet = unet_of(model)
    handle: SynopsisHandle | None = unet.__dict__.pop(SYNOPSIS_STATE_ATTR, None)
    if handle is None:
        return False
    restore_processors(unet, handle._originals, lambda name, current: current is handle._installed[name])
    if handle._check is not None:
        remove_pre_hook(unet, handle._check)
    return True
