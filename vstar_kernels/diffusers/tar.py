"""The public TAR entry points ``apply_tar`` / ``remove_tar`` / ``tar_state``: one call for every supported model, which
goes to the video-transformer integration (:mod:`.dit.patching`) for a transformer or a pipeline holding one, and to
the UNet integration (:mod:`.unet.patching`) otherwise. Arguments that belong to the other kind of model raise here,
before either is reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..profiles import FrameProfile
from .dit.patching import DiTTARHandle, apply_transformer_tar, remove_transformer_tar, transformer_tar_state
from .dit.video_transformers import SPECS, is_video_transformer_like, video_transformers_of
from .unet.frame_positions import DEFAULT_POSITION_MODE
from .unet.patching import TARHandle, apply_unet_tar, remove_unet_tar, unet_tar_state
from .unet.processor import TARAttnProcessor

_UNET_ONLY = {"levels": None, "positions": DEFAULT_POSITION_MODE}  # apply_tar's defaults
TRANSFORMER_PRESETS = ("ultravico",)  # presets of video transformers (a UNet's name its levels' sigmas)


def apply_tar(
    model: nn.Module,
    preset: str | Mapping[int, float] | None = None,
    *,
    sigma: float | None = None,
    strength: float | None = None,
    mode: str | None = None,
    levels: tuple[int, ...] | list[int] | None = None,
    timesteps: str | tuple[float, float] = "paper",
    backend: str = "auto",
    processor: type[TARAttnProcessor] = TARAttnProcessor,
    positions: str = DEFAULT_POSITION_MODE,
    blocks: Sequence[int] | None = None,
    profile: FrameProfile | None = None,
) -> TARHandle | DiTTARHandle:
    """Patch TAR into ``model``; returns a handle.

    ``model`` is a diffusers video UNet or a pipeline with ``.unet`` (:class:`TARHandle`), or a video diffusion
    transformer (``WanTransformer3DModel``, ``CogVideoXTransformer3DModel``, ``LTXVideoTransformer3DModel``,
    ``HunyuanVideoTransformer3DModel``) or a pipeline holding one or two (``transformer``, ``transformer_2``), which
    gets the band over latent-frame distance on every chosen block's 3D self-attention
    (:class:`~vstar_kernels.diffusers.DiTTARHandle`; an extension beyond the paper). A transformer takes
    ``sigma`` (latent frames), ``strength``, ``mode``, ``profile``, ``preset="ultravico"``, ``blocks``,
    ``timesteps`` and ``backend``, and needs ``sigma``, ``profile`` or that preset; ``levels``, ``processor``,
    ``positions`` and the UNet presets are UNet arguments and raise ValueError there.

    Args:
        preset: a UNet: an official preset ("64D1_32D8", ...; see PRESETS) or a ``{level: sigma}`` mapping; default
            "64D1_32D8" unless ``sigma`` or ``profile`` is given. Level 0 is the highest-resolution latent level
            ("64"). A video transformer: "ultravico", UltraViCo's decay beyond half its training length
            (:meth:`vstar_kernels.FrameProfile.ultravico`), to which ``sigma`` and ``profile`` add.
        sigma: one sigma for ``levels`` (default level 0) instead of a preset.
        strength: the band's strength (default 1.0), as in :func:`vstar_kernels.tar_attention`.
        mode: "relative" (VSTAR's, scaled by each row's max logit; the default) or "absolute", as in
            :func:`vstar_kernels.tar_attention`.
        profile: a :class:`vstar_kernels.FrameProfile` (tables, windows with sinks, UltraViCo's decay, a band, or
            their sum): a transformer runs it on every chosen block, added to the band of ``sigma`` and the
            ``preset`` when given. A UNet adds it to each level's band of the preset or ``sigma``, or runs it alone
            on ``levels`` (default level 0) when neither is given. A profile that holds a band takes no ``sigma``,
            ``strength`` or ``mode`` beside it (the band is in the profile).
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
        _check_transformer_arguments(levels=levels, positions=positions)
        if processor is not TARAttnProcessor:
            raise ValueError("processor= applies to video UNets; a video transformer keeps its own processor code")
        total = transformer_profile(model, preset, sigma=sigma, strength=strength, mode=mode, profile=profile)
        return apply_transformer_tar(model, transformers, profile=total, blocks=blocks, timesteps=timesteps,
                                     backend=backend)
    if blocks is not None:
        raise ValueError("blocks= selects a video transformer's blocks; a UNet takes levels= (or a preset)")
    if isinstance(preset, str) and preset in TRANSFORMER_PRESETS:
        raise ValueError(f"preset {preset!r} is a video transformer preset (frames beyond its training length); a "
                         "UNet takes the paper's presets (vstar_kernels.PRESETS) or a profile=")
    _check_unet(model)
    return apply_unet_tar(model, preset, sigma=sigma, strength=strength, mode=mode, levels=levels,
                          timesteps=timesteps, backend=backend, processor=processor, positions=positions,
                          profile=profile)


def transformer_profile(model: object, preset: object, *, sigma: float | None, strength: float | None,
                        mode: str | None, profile: FrameProfile | None) -> FrameProfile:
    """The one profile a transformer's layers run: the ``preset``'s ("ultravico"), plus the band of ``sigma``
    (with ``strength`` and ``mode``), plus ``profile``. ValueError (TypeError for a wrong type) when none is given,
    for a UNet preset, for ``strength``/``mode`` without ``sigma``, and for two bands."""
    if preset is not None and not (isinstance(preset, str) and preset in TRANSFORMER_PRESETS):
        raise ValueError(f"preset= applies to video UNets (the paper's presets name UNet levels); a video "
                         f"transformer takes preset in {TRANSFORMER_PRESETS}, got {preset!r}")
    if profile is not None and not isinstance(profile, FrameProfile):
        raise TypeError(f"profile must be a vstar_kernels.FrameProfile, got {type(profile).__name__}")
    parts = [FrameProfile.ultravico(model)] if preset == "ultravico" else []
    if sigma is not None:
        parts.append(FrameProfile.gaussian(sigma, 1.0 if strength is None else strength,
                                           "relative" if mode is None else mode))
    elif strength is not None or mode is not None:
        raise ValueError("strength= and mode= shape the band of sigma=; a profile holds its own band "
                         "(FrameProfile.gaussian(sigma, strength, mode))")
    if profile is not None:
        parts.append(profile)
    if not parts:
        raise ValueError("apply_tar on a video transformer needs sigma= (the band's width in latent frames; the "
                         "paper's presets name UNet levels and do not apply), profile= or preset='ultravico'")
    return sum(parts[1:], parts[0])


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


def _check_transformer_arguments(**unet_only: object) -> None:
    """ValueError for a UNet-only argument of apply_tar given a value other than its default."""
    for name, value in unet_only.items():
        if value != _UNET_ONLY[name]:
            raise ValueError(f"{name}= applies to video UNets; a video transformer takes sigma= (in latent frames), "
                             "strength=, mode=, profile=, preset='ultravico', blocks= and timesteps=")


def _check_unet(model: object) -> None:
    """ValueError for a transformer class TAR does not know, naming the ones it does."""
    if getattr(model, "unet", None) is None and is_video_transformer_like(model):
        raise ValueError(f"{type(model).__name__} is not a video model TAR supports: video UNets, or the transformers "
                         f"{', '.join(sorted(SPECS))}")
