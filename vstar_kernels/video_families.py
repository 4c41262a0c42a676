"""The facts about diffusers' video transformer families that the core needs, without importing diffusers: each
class's VAE temporal compression and the video length it was trained at, and where a pipeline keeps its
transformers. The integration (:mod:`vstar_kernels.diffusers.dit.video_transformers`) builds its per-class specs on
these; :meth:`vstar_kernels.FrameProfile.ultravico` reads the training lengths.

Training lengths, from each family's release notes and model cards: Wan 2.1 and Wan 2.2 A14B, 81 frames (5 s at
16 fps); Wan 2.2 TI2V-5B, whose VAE has 48 latent channels, 121 (5 s at 24 fps); CogVideoX 1.0, 49 (6 s at 8 fps);
CogVideoX 1.5, the one with a temporal patch, 81 (5 s at 16 fps); LTX-Video, 121 (5 s at 24 fps); HunyuanVideo, 129
(5 s at 24 fps, plus one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The pipeline attributes that hold video transformers (Wan 2.2 A14B has two experts)
PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")


def _wan_training_frames(config) -> int:
    return 121 if config.in_channels == 48 else 81


def _cogvideox_training_frames(config) -> int:
    return 49 if config.patch_size_t is None else 81


def _ltx_training_frames(config) -> int:
    return 121


def _hunyuan_training_frames(config) -> int:
    return 129


@dataclass(frozen=True)
class VideoFamily:
    """One diffusers video transformer class: ``temporal_compression`` video frames per latent frame after the first
    (its VAE: 4n+1 -> n+1), and ``training_frames(config)``, the video frames it was trained at."""

    class_name: str
    temporal_compression: int
    training_frames: Callable[[object], int]


FAMILIES: dict[str, VideoFamily] = {
    family.class_name: family
    for family in (
        VideoFamily("WanTransformer3DModel", 4, _wan_training_frames),
        VideoFamily("CogVideoXTransformer3DModel", 4, _cogvideox_training_frames),
        VideoFamily("LTXVideoTransformer3DModel", 8, _ltx_training_frames),
        VideoFamily("HunyuanVideoTransformer3DModel", 4, _hunyuan_training_frames),
    )
}


def family_of(model: object) -> VideoFamily | None:
    """The family of a diffusers video transformer (by class, subclasses included), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("diffusers."):
            return FAMILIES[cls.__name__]
    return None


def transformers_of(model: object) -> dict[str, object]:
    """The video transformers of ``model``: {"": model} for a transformer itself, {"transformer": ...,
    "transformer_2": ...} for a pipeline; empty when there is none (a UNet, a UNet pipeline)."""
    if family_of(model) is not None:
        return {"": model}
    return {name: candidate for name in PIPELINE_TRANSFORMERS
            if family_of(candidate := getattr(model, name, None)) is not None}


def temporal_patch(config) -> int:
    """Latent frames per token frame: the patch embedding's temporal patch (1 for most models)."""
    patch = getattr(config, "patch_size_t", None)
    if patch is None and isinstance(getattr(config, "patch_size", None), (tuple, list)):
        patch = config.patch_size[0]  # Wan: (p_t, p_h, p_w)
    return patch or 1


def trained_latent_frames(transformer: object) -> int:
    """The frames of the attention sequence (latent frames after the temporal patch) at the video length the model
    was trained at: ``(frames - 1) // temporal_compression + 1`` latent frames, floor-divided by the temporal patch
    as the patch embedding does (Wan 2.1: 81 frames -> 21)."""
    family = family_of(transformer)
    if family is None:
        raise ValueError(f"{type(transformer).__name__} is not a supported video transformer")
    frames = family.training_frames(transformer.config)
    return ((frames - 1) // family.temporal_compression + 1) // temporal_patch(transformer.config)
