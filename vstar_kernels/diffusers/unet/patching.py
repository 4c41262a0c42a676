"""TAR on a diffusers video UNet: TAR processors on its temporal self-attention, and taken off exactly.

Everything an application needs at run time lives on the UNet itself: the processors, the forward pre-hook
(:class:`~vstar_kernels.diffusers.shared.step_window.TARGate`) that switches TAR by timestep, and the
:class:`TARHandle`. So ``copy.deepcopy`` gives a copy with its own switch, pickling (``torch.save(unet)``) works, and
``torch.compile(unet, fullgraph=True)`` traces the gate: it computes the step window as a tensor and the processors
branch with ``torch.cond``. The public ``apply_tar`` / ``remove_tar`` / ``tar_state``
(:mod:`vstar_kernels.diffusers.tar`) call these for a UNet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ...call_state import keep_state_in_checkpoints, release_checkpoints
from ...presets import StepWindow, resolve_levels
from ...profiles import FrameProfile
from ..shared.arguments import check_tar_arguments
from ..shared.components import TAR_STATE_ATTR, remove_pre_hook, restore_processors, set_processor_tracked, unet_of
from ..shared.step_window import SchedulerSource, TARGate, TARSwitch
from .discovery import TemporalLayer, find_temporal_attention
from .frame_positions import (
    DEFAULT_POSITION_MODE,
    check_positions_supported,
    extend_frame_positions,
    frame_positions_state,
    set_frame_positions,
)
from .processor import TARAttnProcessor


@dataclass
class TARHandle:
    """What one ``apply_tar`` patched: ``layers`` maps module path -> (level, sigma; None for a layer whose
    profile has no band); the step window in force; ``positions`` and ``position_tables`` (path -> rows) for the
    frame-position tables it set (AnimateDiff); ``profile``: the frame-distance profile given (each layer runs
    its level's band plus it), or None."""

    layers: dict[str, tuple[int, float | None]]
    window: StepWindow
    strength: float
    mode: str
    switch: TARSwitch = field(repr=False)
    positions: str = DEFAULT_POSITION_MODE
    position_tables: dict[str, int] = field(default_factory=dict)
    profile: FrameProfile | None = None
    _positions_before: dict[str, str | None] = field(default_factory=dict, repr=False)
    _originals: dict[str, object] = field(default_factory=dict, repr=False)
    _installed: dict[str, TARAttnProcessor] = field(default_factory=dict, repr=False)
    _gate: TARGate | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        """One readable line: layers per (level, sigma), the step window, and the frame-position tables set."""
        counts = sorted(Counter(self.layers.values()).items())
        levels = ", ".join(f"level {level}: {'no band' if sigma is None else f'sigma {sigma:g}'} ({n} layers)"
                           for (level, sigma), n in counts)
        tables = ""
        if self.position_tables:
            rows = "/".join(str(r) for r in sorted(set(self.position_tables.values())))
            tables = f", {len(self.position_tables)} position tables of {rows} rows"
        profile = "" if self.profile is None else f", profile={self.profile!r}"
        return (f"TARHandle({self.num_layers} layers {{{levels}}}, mode={self.mode!r}, strength={self.strength:g}, "
                f"window={self.window!r}, positions={self.positions!r}{tables}{profile})")


def apply_unet_tar(
    model: nn.Module,
    preset: str | Mapping[int, float] | None,
    *,
    sigma: float | None,
    strength: float | None,
    mode: str | None,
    levels: tuple[int, ...] | list[int] | None,
    timesteps: str | tuple[float, float],
    backend: str,
    processor: type[TARAttnProcessor],
    positions: str,
    profile: FrameProfile | None = None,
) -> TARHandle:
    """``apply_tar`` on a video UNet or a pipeline with ``.unet``; the arguments as
    :func:`vstar_kernels.diffusers.apply_tar` documents them.

    Validates everything before changing anything (ValueError for a model without temporal attention, a level it
    does not have, or a positions mode its tables cannot serve; TypeError for a processor class that is not a
    :class:`TARAttnProcessor`); applying again replaces the previous application. The mid block and the temporal
    layer right after conv_in are never patched. The step window reads ``model.scheduler`` when ``model`` is a
    pipeline.
    """
    unet = unet_of(model)
    mapping = _level_bands(preset, sigma, levels, profile, strength, mode)
    params, window = check_tar_arguments(sigma=1.0, strength=strength, mode=mode, timesteps=timesteps,
                                         backend=backend)  # the sigmas, per level, resolve_levels validated
    strength, mode = params.strength, params.mode
    if not (isinstance(processor, type) and issubclass(processor, TARAttnProcessor)):
        raise TypeError(f"processor must be TARAttnProcessor or a subclass, got {processor!r}")
    layers = find_temporal_attention(unet)
    check_positions_supported(unet, positions)
    present = {layer.level for layer in layers if isinstance(layer.level, int)}
    missing = sorted(set(mapping) - present)
    if missing:
        raise ValueError(f"{type(unet).__name__} has temporal attention at levels {sorted(present)}, not {missing}")
    remove_unet_tar(unet)

    switch = TARSwitch()
    chosen: list[TemporalLayer] = [layer for layer in layers if layer.level in mapping]
    handle = TARHandle(layers={}, window=window, strength=float(strength), mode=mode, switch=switch,
                       positions=positions, _positions_before=frame_positions_state(unet))
    handle.position_tables = extend_frame_positions(unet, positions)
    handle.profile = profile
    for layer in chosen:
        level_sigma = mapping[layer.level]
        installed = processor(sigma=level_sigma, strength=strength, mode=mode, backend=backend, switch=switch,
                              profile=_layer_profile(level_sigma, strength, mode, profile))
        handle.layers[layer.name] = (layer.level, level_sigma)
        set_processor_tracked(layer.module, installed, layer.name, handle._originals, handle._installed)

    handle._gate = TARGate(window, switch, SchedulerSource(model) if model is not unet else None)
    unet.register_forward_pre_hook(handle._gate, with_kwargs=True)
    keep_state_in_checkpoints(unet)
    setattr(unet, TAR_STATE_ATTR, handle)
    return handle


def _level_bands(preset, sigma, levels, profile, strength, mode) -> dict[int, float | None]:
    """{level: sigma or None} of one application. With a ``profile`` and neither ``preset`` nor ``sigma`` the
    profile alone runs on ``levels`` (default level 0; ``strength`` and ``mode`` belong in its band then); a profile
    beside a preset or a sigma adds to each level's band (and must hold no band of its own)."""
    if profile is None:
        return resolve_levels(preset, sigma, levels)
    if not isinstance(profile, FrameProfile):
        raise TypeError(f"profile must be a vstar_kernels.FrameProfile, got {type(profile).__name__}")
    if preset is not None or sigma is not None:
        if profile.has_band:
            raise ValueError("the profile holds a Gaussian band and the preset or sigma gives one per level: a "
                             "layer takes at most one band (drop one of them)")
        return resolve_levels(preset, sigma, levels)
    if strength is not None or mode is not None:
        raise ValueError("strength= and mode= shape the band of a preset or sigma; a profile holds its own band "
                         "(FrameProfile.gaussian(sigma, strength, mode))")
    chosen = tuple(levels) if levels is not None else (0,)
    if not chosen or any(isinstance(level, bool) or not isinstance(level, int) or level < 0 for level in chosen):
        raise ValueError(f"levels must be integers >= 0 (0 = highest resolution), got {levels!r}")
    return dict.fromkeys(chosen)


def _layer_profile(sigma: float | None, strength: float, mode: str,
                   profile: FrameProfile | None) -> FrameProfile | None:
    """The profile a layer runs: its level's band plus ``profile``, the profile alone without a band, or None for
    plain TAR."""
    if profile is None or sigma is None:
        return profile
    return FrameProfile.gaussian(sigma, strength, mode) + profile


def remove_unet_tar(model: nn.Module) -> bool:
    """Undo :func:`apply_unet_tar` on a UNet or a pipeline with ``.unet``; False if TAR was not applied.

    Restores exactly the processors it replaced, the frame-position tables' previous behaviour (on the tables still
    in the mode it set), and removes its hook. A layer whose processor was replaced since (``fuse_qkv_projections``,
    attention slicing, ...) keeps the newer processor: only layers still running this application's TAR processor
    are restored, or a plain ``TARAttnProcessor()`` re-created from it without arguments (what ``load_ip_adapter``
    does), which gets the original back too.
    """
    unet = unet_of(model)
    handle: TARHandle | None = unet.__dict__.pop(TAR_STATE_ATTR, None)
    if handle is None:
        return False

    def still_ours(name: str, current: object) -> bool:
        installed = handle._installed[name]
        recreated = type(current) is type(installed) and not current.configured
        return current is installed or recreated

    restore_processors(unet, handle._originals, still_ours)
    current = frame_positions_state(unet)  # tables set otherwise since (restored, another mode) keep that choice
    set_frame_positions(unet, {name: mode for name, mode in handle._positions_before.items()
                               if current.get(name) == handle.positions})
    if handle._gate is not None:
        remove_pre_hook(unet, handle._gate)
    release_checkpoints(unet)
    return True


def unet_tar_state(model: nn.Module) -> TARHandle | None:
    """The :class:`TARHandle` of the TAR application in force on a UNet (or a pipeline's ``.unet``), or None."""
    handle = unet_of(model).__dict__.get(TAR_STATE_ATTR)
    return handle if isinstance(handle, TARHandle) else None
