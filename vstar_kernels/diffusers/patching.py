"""apply_tar / remove_tar: put TAR processors on a UNet's temporal self-attention, and take them off exactly.

Everything an application needs at run time lives on the UNet itself: the processors, the forward pre-hook
(:class:`TARGate`) that switches TAR by timestep, and the :class:`TARHandle`. So ``copy.deepcopy`` gives a copy with
its own switch, pickling (``torch.save(unet)``) works, and ``torch.compile(unet, fullgraph=True)`` traces the gate:
it computes the step window as a tensor and the processors branch with ``torch.cond``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..call_state import keep_state_in_checkpoints, release_checkpoints
from ..contract import MODES, make_params
from ..ops import requested_backend
from ..presets import StepWindow, resolve_levels, resolve_window
from .components import remove_pre_hook, restore_processors, unet_of
from .discovery import TemporalLayer, find_temporal_attention
from .dit_patching import (
    apply_transformer_tar,
    check_transformer_arguments,
    remove_transformer_tar,
    transformer_tar_state,
)
from .gates import SchedulerSource, TARGate
from .positions import (
    DEFAULT_POSITION_MODE,
    check_positions_supported,
    extend_frame_positions,
    frame_positions_state,
    set_frame_positions,
)
from .processor import TARAttnProcessor, TARSwitch
from .video_transformers import SPECS, is_video_transformer_like, video_transformers_of

_STATE_ATTR = "_vstar_tar_state"


@dataclass
class TARHandle:
    """What one ``apply_tar`` patched: ``layers`` maps module path -> (level, sigma); the step window in force;
    ``positions`` and ``position_tables`` (path -> rows) for the frame-position tables it set (AnimateDiff)."""

    layers: dict[str, tuple[int, float]]
    window: StepWindow
    strength: float
    mode: str
    switch: TARSwitch = field(repr=False)
    positions: str = DEFAULT_POSITION_MODE
    position_tables: dict[str, int] = field(default_factory=dict)
    _positions_before: dict[str, str | None] = field(default_factory=dict, repr=False)
    _originals: dict[str, object] = field(default_factory=dict, repr=False)
    _installed: dict[str, TARAttnProcessor] = field(default_factory=dict, repr=False)
    _gate: TARGate | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


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
):
    """Patch TAR into ``model``; returns a handle.

    ``model`` is a diffusers video UNet or a pipeline with ``.unet`` (:class:`TARHandle`), or a video diffusion
    transformer (``WanTransformer3DModel``, ``CogVideoXTransformer3DModel``, ``LTXVideoTransformer3DModel``,
    ``HunyuanVideoTransformer3DModel``) or a pipeline holding one or two (``transformer``, ``transformer_2``), which
    gets the band over latent-frame distance on every chosen block's 3D self-attention
    (:class:`~vstar_kernels.diffusers.dit_patching.DiTTARHandle`; an extension beyond the paper). A transformer takes
    ``sigma`` (latent frames, required), ``strength``, ``mode``, ``blocks``, ``timesteps`` and ``backend``; ``preset``,
    ``levels``, ``processor`` and ``positions`` are UNet arguments and raise ValueError there.

    Args:
        preset: an official preset ("64D1_32D8", ...; see PRESETS) or a ``{level: sigma}`` mapping; default
            "64D1_32D8" unless ``sigma`` is given. Level 0 is the highest-resolution latent level ("64").
        sigma: one sigma for ``levels`` (default level 0) instead of a preset.
        strength, mode: as in :func:`vstar_kernels.tar_attention`.
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
        check_transformer_arguments(sigma, preset=preset, levels=levels, positions=positions)
        if processor is not TARAttnProcessor:
            raise ValueError("processor= applies to video UNets; a video transformer keeps its own processor code")
        return apply_transformer_tar(model, transformers, sigma=sigma, strength=strength, mode=mode, blocks=blocks,
                                     timesteps=timesteps, backend=backend)
    if blocks is not None:
        raise ValueError("blocks= selects a video transformer's blocks; a UNet takes levels= (or a preset)")
    _check_unet(model)
    unet = unet_of(model)
    mapping = resolve_levels(preset, sigma, levels)
    window = resolve_window(timesteps)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    strength = make_params(1, sigma=1.0, strength=strength, mode=mode).strength  # the op's own rules, at the door
    requested_backend(backend)  # validates the name
    if not (isinstance(processor, type) and issubclass(processor, TARAttnProcessor)):
        raise TypeError(f"processor must be TARAttnProcessor or a subclass, got {processor!r}")
    layers = find_temporal_attention(unet)
    check_positions_supported(unet, positions)
    present = {layer.level for layer in layers if isinstance(layer.level, int)}
    missing = sorted(set(mapping) - present)
    if missing:
        raise ValueError(f"{type(unet).__name__} has temporal attention at levels {sorted(present)}, not {missing}")
    remove_tar(unet)

    switch = TARSwitch()
    chosen: list[TemporalLayer] = [layer for layer in layers if layer.level in mapping]
    handle = TARHandle(layers={}, window=window, strength=float(strength), mode=mode, switch=switch,
                       positions=positions, _positions_before=frame_positions_state(unet))
    handle.position_tables = extend_frame_positions(unet, positions)
    for layer in chosen:
        level_sigma = mapping[layer.level]
        installed = processor(sigma=level_sigma, strength=strength, mode=mode, backend=backend, switch=switch)
        handle._originals[layer.name] = layer.module.processor
        handle._installed[layer.name] = installed
        handle.layers[layer.name] = (layer.level, level_sigma)
        layer.module.set_processor(installed)

    handle._gate = TARGate(window, switch, SchedulerSource(model) if model is not unet else None)
    unet.register_forward_pre_hook(handle._gate, with_kwargs=True)
    keep_state_in_checkpoints(unet)
    setattr(unet, _STATE_ATTR, handle)
    return handle


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
    unet = unet_of(model)
    handle: TARHandle | None = unet.__dict__.pop(_STATE_ATTR, None)
    if handle is None:
        return False

    def still_ours(name: str, current: object) -> bool:
        installed = handle._installed[name]
        recreated = type(current) is type(installed) and current.sigma is None
        return current is installed or recreated

    restore_processors(unet, handle._originals, still_ours)
    current = frame_positions_state(unet)  # tables set otherwise since (restored, another mode) keep that choice
    set_frame_positions(unet, {name: mode for name, mode in handle._positions_before.items()
                               if current.get(name) == handle.positions})
    if handle._gate is not None:
        remove_pre_hook(unet, handle._gate)
    release_checkpoints(unet)
    return True


def tar_state(model: nn.Module):
    """The handle of the TAR application in force on ``model`` (a UNet's :class:`TARHandle`, a video transformer's
    ``DiTTARHandle``; for a pipeline, that of its first transformer), or None."""
    transformers = video_transformers_of(model)
    if transformers:
        return transformer_tar_state(next(iter(transformers.values())))
    return unet_of(model).__dict__.get(_STATE_ATTR)


def _check_unet(model: object) -> None:
    """ValueError for a transformer class TAR does not know, naming the ones it does."""
    if getattr(model, "unet", None) is None and is_video_transformer_like(model):
        raise ValueError(f"{type(model).__name__} is not a video model TAR supports: video UNets, or the transformers "
                         f"{', '.join(sorted(SPECS))}")
