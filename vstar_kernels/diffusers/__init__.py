"""diffusers integration: ``apply_tar(pipe.unet)`` / ``remove_tar`` for every diffusers video UNet, and
``apply_tar(pipe.transformer, sigma=...)`` for the video diffusion transformers Wan, CogVideoX, LTX-Video and
HunyuanVideo (the band over latent-frame distance on their 3D self-attention; an extension beyond the paper).

Layout (imports point one way: ``shared`` <- ``unet``, ``shared`` <- ``dit``, entry points -> both):

- :mod:`.tar`, :mod:`.synopsis`: the public entry points (``apply_tar``, ``remove_tar``, ``tar_state``;
  ``apply_synopsis``, ``remove_synopsis``, ``synopsis_prompt_embeds``), each choosing the UNet or the transformer path.
- :mod:`.unet`: the UNet integration (discovery, processor, patching, frame positions, synopsis, attention maps).
- :mod:`.dit`: the video-transformer integration (specs, processor, patching, synopsis, context parallelism).
- :mod:`.shared`: what both use (model components, the step window, argument validation).
- :mod:`.tiny`: small random models and pipelines built offline.

Importing this package checks that the installed diffusers is in the supported range (SUPPORTED_DIFFUSERS, the
same range as the ``diffusers`` extra in pyproject.toml).
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

SUPPORTED_DIFFUSERS = (Version("0.30"), Version("0.43"))  # [min, max): keep in sync with pyproject's extra


def _check_diffusers() -> str:
    try:
        found = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "vstar_kernels.diffusers needs diffusers: pip install 'vstar-kernels[diffusers]'"
        ) from None
    lo, hi = SUPPORTED_DIFFUSERS
    if not lo <= Version(found) < hi:
        raise ImportError(f"vstar_kernels.diffusers supports diffusers >={lo},<{hi}; found {found}")
    return found


DIFFUSERS_VERSION = _check_diffusers()

from ..presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from .attention_maps import (  # noqa: E402
    TemporalAttentionMaps,
    plot_temporal_attention,
    record_temporal_attention,
)
from .dit.context_parallel import enable_context_parallelism, hunyuan_video_cp_plan  # noqa: E402
from .dit.patching import DiTTARHandle  # noqa: E402
from .dit.processor import DiTTARProcessor  # noqa: E402
from .dit.synopsis import DiTSynopsisHandle  # noqa: E402
from .dit.video_transformers import SPECS as VIDEO_TRANSFORMERS  # noqa: E402
from .shared.step_window import TARSwitch  # noqa: E402
from .synopsis import FramePrompts, apply_synopsis, remove_synopsis, synopsis_prompt_embeds  # noqa: E402
from .tar import apply_tar, remove_tar, tar_state  # noqa: E402
from .unet.discovery import TEMPORAL_CONTAINERS, TemporalLayer, find_temporal_attention  # noqa: E402
from .unet.frame_positions import (  # noqa: E402
    POSITION_MODES,
    FramePositionEmbedding,
    extend_frame_positions,
    frame_positions_state,
    restore_frame_positions,
)
from .unet.patching import TARHandle  # noqa: E402
from .unet.processor import MaterialisedTARProcessor, TARAttnProcessor  # noqa: E402
from .unet.synopsis import SynopsisCrossAttnProcessor, SynopsisHandle  # noqa: E402

__all__ = [
    "DEFAULT_PRESET",
    "POSITION_MODES",
    "PRESETS",
    "TEMPORAL_CONTAINERS",
    "VIDEO_TRANSFORMERS",
    "DiTSynopsisHandle",
    "DiTTARHandle",
    "DiTTARProcessor",
    "FramePositionEmbedding",
    "FramePrompts",
    "MaterialisedTARProcessor",
    "SynopsisCrossAttnProcessor",
    "SynopsisHandle",
    "TARAttnProcessor",
    "TARHandle",
    "TARSwitch",
    "TemporalAttentionMaps",
    "TemporalLayer",
    "apply_synopsis",
    "apply_tar",
    "enable_context_parallelism",
    "extend_frame_positions",
    "find_temporal_attention",
    "frame_positions_state",
    "hunyuan_video_cp_plan",
    "plot_temporal_attention",
    "record_temporal_attention",
    "remove_synopsis",
    "remove_tar",
    "restore_frame_positions",
    "synopsis_prompt_embeds",
    "tar_state",
]
