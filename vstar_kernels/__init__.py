"""vstar-kernels: fused Temporal Attention Regularization (VSTAR) for long video generation.

Data flows one way: a diffusers attention processor -> :func:`tar_attention` (validation, dispatch) -> a
backend (Triton kernel, C++/CUDA extension, memory-bounded torch fallback). :func:`tar_attention_reference` is the
definition.
"""

from ._version import __version__
from .contract import MODES, TARParams, TokenFrames
from .ops import merge_partials, tar_attention, tar_row_max
from .profiles import FrameProfile
from .reference import gaussian_delta, tar_attention_probs, tar_attention_reference
from .synopsis import SYNOPSIS_TEMPLATE, generate_synopsis, parse_synopsis, synopsis_embeddings

_DIFFUSERS_EXPORTS = ("POSITION_MODES", "PRESETS", "DiTTARHandle", "TARAttnProcessor", "TARHandle", "apply_synopsis",
                      "apply_tar",
                      "extend_frame_positions", "plot_temporal_attention", "record_temporal_attention",
                      "remove_synopsis", "remove_tar", "restore_frame_positions", "synopsis_prompt_embeds")


def __getattr__(name: str):
    """The diffusers integration loads on first use, so the op works without diffusers installed."""
    if name in _DIFFUSERS_EXPORTS:
        from . import diffusers as integration

        return getattr(integration, name)
    raise AttributeError(f"module 'vstar_kernels' has no attribute {name!r}")


__all__ = [
    *_DIFFUSERS_EXPORTS,
    "FrameProfile",
    "MODES",
    "SYNOPSIS_TEMPLATE",
    "TARParams",
    "TokenFrames",
    "__version__",
    "gaussian_delta",
    "generate_synopsis",
    "merge_partials",
    "parse_synopsis",
    "synopsis_embeddings",
    "tar_attention",
    "tar_attention_probs",
    "tar_attention_reference",
    "tar_row_max",
]
