"""Find the temporal self-attention layers of a diffusers video UNet and their latent level.

A layer is temporal self-attention when it is an ``Attention`` that is not cross-attention and sits inside one
of the temporal containers below (matched by diffusers class name along the class's MRO, stable across diffusers
releases and through subclasses such as frame parallelism's). Its level comes
from its block path: ``down_blocks.i`` is level i, ``up_blocks.j`` is level ``len(up_blocks) - 1 - j``,
``mid_block`` is "mid"; anything else (``transformer_in`` right after conv_in, I2VGen-XL's image-latents
encoder) is "outer". Nothing depends on batch size, aspect ratio or resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TEMPORAL_CONTAINERS = frozenset({
    "TransformerTemporalModel",  # UNet3DConditionModel, I2VGenXLUNet
    "AnimateDiffTransformer3D",  # UNetMotionModel (AnimateDiff, AnimateDiff-SDXL, PIA)
    "TemporalBasicTransformerBlock",  # UNetSpatioTemporalConditionModel (SVD)
    "I2VGenXLTransformerTemporalEncoder",  # I2VGenXLUNet's image_latents_temporal_encoder
})


@dataclass(frozen=True)
class TemporalLayer:
    """One temporal self-attention layer: its module path, level (int, "mid" or "outer") and the module."""

    name: str
    level: int | str
    module: nn.Module


def _level(name: str, num_up_blocks: int) -> int | str:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_up_blocks - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return "mid"
    return "outer"


def is_temporal_container(module: nn.Module) -> bool:
    """Whether ``module`` is one of diffusers' TEMPORAL_CONTAINERS, or a subclass of one (this package's frame
    parallelism switches them to subclasses; so may other libraries)."""
    return any(cls.__name__ in TEMPORAL_CONTAINERS and cls.__module__.startswith("diffusers.")
               for cls in type(module).__mro__)


def temporal_container_paths(unet: nn.Module) -> list[str]:
    """Module paths (with a trailing dot) of the temporal containers of ``unet``."""
    return [name + "." for name, module in unet.named_modules() if is_temporal_container(module)]


def find_temporal_attention(unet: nn.Module) -> list[TemporalLayer]:
    """Every temporal self-attention layer of ``unet`` in module order.

    Raises ValueError naming what was looked for when there is none (e.g. an image UNet or a 3D-attention
    transformer such as CogVideoX).
    """
    from diffusers.models.attention_processor import Attention

    num_up = len(getattr(unet, "up_blocks", ()))
    temporal_prefixes = tuple(temporal_container_paths(unet))
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        if name.startswith(temporal_prefixes):
            layers.append(TemporalLayer(name, _level(name, num_up), module))
    if not layers:
        raise ValueError(
            f"{type(unet).__name__} has no temporal self-attention: looked for diffusers Attention layers that are "
            f"not cross-attention inside {', '.join(sorted(TEMPORAL_CONTAINERS))}"
        )
    return layers
