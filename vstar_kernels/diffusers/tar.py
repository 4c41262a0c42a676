"""The public TAR entry points ``apply_tar`` / ``remove_tar`` / ``tar_state``: one call for every supported model, which
goes to the video-transformer integration (:mod:`.dit.patching`) for a transformer or a pipeline holding one, and to
the UNet integration (:mod:`.unet.patching`) otherwise. Arguments that belong to the other kind of model raise here,
before either is reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .dit.patching import DiTTARHandle, apply_transformer_tar, remove_transformer_tar, transformer_tar_state
from .dit.video_transformers import SPECS, is_video_transformer_like, video_transformers_of
from .unet.frame_positions import DEFAULT_POSITION_MODE
from .unet.patching import TARHandle, apply_unet_tar, remove_unet_tar, unet_tar_state
from .unet.processor import TARAttnProcessor

_UNET_ONLY = {"preset": None, "levels": None, "positions": DEFAULT_POSITION_MODE}  # apply_tar's defaults


def apply_tar(
    model: nn.Module,
    preset: str | Mapping[int, float] | None = None,
    *,
    sigma: float | None = None,
    strength: float = 1.0,
    mode: str = "relative",
    levels: tuple[int, ...] | list[int] | None = None,
    timesteps: str | tuple[float, float] = "paper",
    backend: str = "auto",
    processor: type[TARAttnProcessor] = TARAttnProcessor,
    positions: str = DEFAULT_POSITION_MODE,
    blocks: Sequence[int] | None = None,
) -> TARHandle | DiTTARHandle:
    """Patch TAR into ``model``; returns a handle.

    ``model`` is a diffusers video UNet or a pipeline with ``.unet`` (:class:`TARHandle`), or a video diffusion
    transformer (``WanTransformer3DModel``, ``CogVideoXTransformer3DModel``, ``LTXVideoTransformer3DModel``,
    ``HunyuanVideoTransformer3DModel``) or a pipeline holding one or two (``transformer``, ``transformer_2``), which
    gets the band over latent-frame distance on every chosen block's 3D self-attention
    (:class:`~vstar_kernels.diffusers.DiTTARHandle`; an extension beyond the paper). A transformer takes
    ``sigma`` (latent frames, required), ``strength``, ``mode``, ``blocks``, ``timesteps`` and ``backend``; ``preset``,
    ``levels``, ``processor`` and ``positions`` are UNet arguments and raise ValueError there.

    Args:
        preset: an official preset ("64D1_32D8", ...; see PRESETS) or a ``{level: sigma}`` mapping; default
            "64D1_32D8" unless ``sigma`` is given. Level 0 is the highest-resolution latent level ("64").
        sigma: one sigma for ``levels`` (default level 0) instead of a preset.
        strength: the band's strength, as in :func:`vstar_kernels.tar_attention`.
        mode: "relative" (VSTAR's, scaled by each row's max logit) or "absolute", as in
            :func:`vstar_kernels.tar_attention`.
        levels: restrict to these levels.
        timesteps: "paper" (TAR on for the first, noisiest 14/25 of the denoising steps), "all", or an inclusive
            (t_lo, t_hi) range, read by a forward pre-hook on the UNet at every call. With a pipeline, "paper"
            locates each timestep in ``pipe.scheduler.timesteps`` (so it works for any scheduler, SVD's continuous
            timesteps included); with a bare UNet it means t >= 440 of 1000 training steps.
        backend: passed to ``tar_attention``.
        processor: the processor class installed; ``MaterialisedTARProcessor`` reproduces the official method's
            memory use (benchmarks).
        blocks: video transformers only: indices of the blocks to patch, in forward order (HunyuanVideo: its
            double-stream blocks, then its single-stream blocks); default all.
        positions: how frame-position tables (AnimateDiff's 32-row motion tables) serve calls with more frames
            than they hold: "interpolate" (default: stretch the stored table), "extrapolate" (continue diffusers'
            sinusoid; only for tables that are that sinusoid) or "keep" (diffusers' limit, with a clear error).
            Calls within a table are bit-identical to diffusers. See :func:`extend_frame_positions`.

    Applying again replaces the previous application. The mid block and the temporal layer right after conv_in
    are never patched. Raises ValueError for a model without temporal attention or a level it does not have,
    and for a positions mode its tables cannot serve; nothing is changed then. ``remove_tar`` undoes all of it.
    """
    transformers = video_transformers_of(model)
    if transformers:
        _check_transformer_arguments(sigma, preset=preset, levels=levels, positions=positions)
        if processor is not TARAttnProcessor:
            raise ValueError("processor= applies to video UNets; a video transformer keeps its own processor code")
        return apply_transformer_tar(model, transformers, sigma=sigma, strength=strength, mode=mode, blocks=blocks,
                                     timesteps=timesteps, backend=backend)
    if blocks is not None:
        raise ValueError("blocks= selects a video transformer's blocks; a UNet takes levels= (or a preset)")
    _check_unet(model)
    return apply_unet_tar(model, preset, sigma=sigma, strength=strength, mode=mode, levels=levels,
                          timesteps=timesteps, backend=backend, processor=processor, positions=positions)


def remove_tar(model: nn.Module) -> bool:
    """Restore exactly the processors ``apply_tar`` replaced, the frame-position tables' previous behaviour (on the
    tables still in the mode it set), and remove its hook; False if TAR was not applied.

    A layer whose processor was replaced since (``fuse_qkv_projections``, attention slicing, ...) keeps the
    newer processor: only layers still running this application's TAR processor are restored, or a plain
    ``TARAttnProcessor()`` re-created from it without arguments (what ``load_ip_adapter`` does), which gets the
    original back too.
    """
    transformers = video_transformers_of(model)
    if transformers:
        return any([remove_transformer_tar(transformer) for transformer in transformers.values()])
    return remove_unet_tar(model)


def tar_state(model: nn.Module) -> TARHandle | DiTTARHandle | None:
    """The handle of the TAR application in force on ``model`` (a UNet's :class:`TARHandle`, a video transformer's
    ``DiTTARHandle``; for a pipeline, that of its first transformer), or None."""
    transformers = video_transformers_of(model)
    if transformers:
        return transformer_tar_state(next(iter(transformers.values())))
    return unet_tar_state(model)


def _check_transformer_arguments(sigma: float | None, **unet_only: object) -> None:
    """ValueError for a UNet-only argument of apply_tar given a value other than its default (presets name UNet
    levels) and for a missing sigma."""
    for name, value in unet_only.items():
        if value != _UNET_ONLY[name]:
            raise ValueError(f"{name}= applies to video UNets; a video transformer takes sigma= (in latent frames), "
                             "strength=, mode=, blocks= and timesteps=")
    if sigma is None:
        raise ValueError("apply_tar on a video transformer needs sigma= (the band's width in latent frames; the "
                         "paper's presets name UNet levels and do not apply)")


def _check_unet(model: object) -> None:
    """ValueError for a transformer class TAR does not know, naming the ones it does."""
    if getattr(model, "unet", None) is None and is_video_transformer_like(model):
        raise ValueError(f"{type(model).__name__} is not a video model TAR supports: video UNets, or the transformers "
                         f"{', '.join(sorted(SPECS))}")
