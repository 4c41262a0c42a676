"""The public synopsis entry points: ``apply_synopsis`` / ``remove_synopsis`` (per-frame text, for every supported
model: :mod:`.dit.synopsis` for a video transformer or a pipeline holding one, :mod:`.unet.synopsis` otherwise),
and ``synopsis_prompt_embeds``, which builds the per-frame prompts from a pipeline of either kind.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from ..synopsis import keyframe_indices, keyframe_weights, latent_keyframes, synopsis_embeddings
from .dit.synopsis import DiTSynopsisHandle, apply_transformer_synopsis, remove_transformer_synopsis
from .dit.video_transformers import temporal_compression, video_transformers_of
from .unet.synopsis import SynopsisHandle, apply_unet_synopsis, remove_unet_synopsis


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
      unchanged (see :mod:`vstar_kernels.diffusers.dit.synopsis`). CogVideoX and HunyuanVideo (text inside the
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
    return apply_unet_synopsis(model, frame_embeds)


def remove_synopsis(model: nn.Module) -> bool:
    """Restore the processors ``apply_synopsis`` wrapped (and on a transformer its hook); False if no synopsis was
    applied."""
    transformers = video_transformers_of(model)
    if transformers:
        return any([remove_transformer_synopsis(transformer) for transformer in transformers.values()])
    return remove_unet_synopsis(model)


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
