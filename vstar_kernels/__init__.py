"""vstar-kernels: fused Temporal Attention Regularization (VSTAR) for long video generation.

Data flows one way: a diffusers attention processor -> :func:`tar_attention` (validation, dispatch) -> a
backend (Triton kernel, memory-bounded torch fallback). :func:`tar_attention_reference` is the definition.
"""

from ._version import __version__
from .contract import MODES, TARParams
from .ops import tar_attention
from .reference import gaussian_delta, tar_attention_reference

__all__ = [
    "MODES",
    "TARParams",
    "__version__",
    "gaussian_delta",
    "tar_attention",
    "tar_attention_reference",
]
