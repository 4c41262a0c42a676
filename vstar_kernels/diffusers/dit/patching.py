"""TAR on video diffusion transformers (Wan, CogVideoX, LTX-Video, HunyuanVideo): put on, taken off exactly.

TAR on a DiT is an extension beyond the paper (which evaluated UNets): the Gaussian band acts on *latent-frame*
distance inside the 3D self-attention of every chosen block, text tokens unbiased. As for UNets, everything a run
needs lives on the transformer: the processors, one forward pre-hook (:class:`DiTGate`: the step window and the
frame geometry of each call) and the handle, so deep copies, pickling and ``.to()`` carry it. The public
``apply_tar`` / ``remove_tar`` / ``tar_state`` (:mod:`vstar_kernels.diffusers.tar`) call these for a transformer.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

from torch import nn

from ...presets import StepWindow
from ...profiles import FrameProfile
from ..shared.arguments import check_tar_arguments
from ..shared.components import (
    SYNOPSIS_STATE_ATTR,
    TAR_STATE_ATTR,
    install_processor,
    prepare_checkpoints,
    set_processor_tracked,
)
from ..shared.step_window import SchedulerSource, TARGate
from .model_patch import TransformerPatch, attach_patch, attached_handle, detach_patch
from .processor import PROCESSORS, DiTState, RoutedProcessor, ShardedTextCrossAttention
from .synopsis import DiTSynopsisProcessor
from .video_transformers import (
    VideoTransformerSpec,
    bind_forward,
    find_self_attention,
    find_sharded_text_cross_attention,
    select_blocks,
    spec_of,
)


class DiTGate(TARGate):
    """The transformer's forward pre-hook: reads each call's frame geometry (input shape and patch size) into this
    thread's :class:`DiTState` and switches TAR by the call's timestep (the largest, for per-token timesteps such as
    Wan 2.2 TI2V's, whose conditioning frame is at 0)."""

    def __init__(self, window: StepWindow, state: DiTState, spec: VideoTransformerSpec,
                 scheduler: SchedulerSource | None = None) -> None:
        super().__init__(window, state.switch, scheduler)
        self.state = state
        self.spec = spec

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prepare_checkpoints(module)
        bound = bind_forward(module, args, kwargs)
        self.state.geometry = self.spec.geometry(module, bound)
        t = bound.get("timestep")
        self.update(None if t is None else t.amax() if hasattr(t, "amax") and t.numel() > 1 else t)

    def __deepcopy__(self, memo: dict) -> DiTGate:
        return DiTGate(copy.deepcopy(self.window, memo), copy.deepcopy(self.state, memo), self.spec, self.source)


@dataclass
class DiTTARHandle:
    """What one ``apply_tar`` on a video transformer (or a pipeline's transformers) patched: ``layers`` maps module
    path (prefixed by the pipeline attribute, e.g. ``transformer_2.blocks.3.attn1``) -> sigma in latent frames (None
    for a profile without a band); ``profile``: the frame-distance profile every layer runs (it holds the band), or
    None for TAR's band alone."""

    layers: dict[str, float | None]
    sigma: float | None
    strength: float
    mode: str
    window: StepWindow
    blocks: tuple[int, ...] | None
    _patches: dict[str, TransformerPatch] = field(default_factory=dict, repr=False)
    profile: FrameProfile | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        """One readable line: layers per transformer, the band, the step window and the blocks chosen."""
        where = ", ".join(f"{sum(p.startswith(f'{prefix}.') or not prefix for p in self.layers)} on "
                          f"{prefix or 'the transformer'}" for prefix in self._patches) or "none"
        blocks = "all" if self.blocks is None else list(self.blocks)
        bias = (f"profile={self.profile!r}" if self.profile is not None else
                f"sigma={self.sigma:g} latent frames, mode={self.mode!r}, strength={self.strength:g}")
        return f"DiTTARHandle({self.num_layers} layers ({where}), {bias}, window={self.window!r}, blocks={blocks})"

    def state(self, prefix: str | None = None) -> DiTState:
        """The shared state (step switch, last geometry) of the transformer at pipeline attribute ``prefix``
        ("transformer", "transformer_2"; "" for a bare transformer; default: the first one patched)."""
        return self._patches[next(iter(self._patches)) if prefix is None else prefix].state


def apply_transformer_tar(model: object, transformers: dict[str, nn.Module], *, sigma: float | None = None,
                          strength: float | None = None, mode: str | None = None, blocks: object, timesteps: object,
                          backend: str, profile: FrameProfile | None = None) -> DiTTARHandle:
    """Patch TAR into each transformer of ``transformers`` (pipeline attribute -> model; ``model`` is what
    ``apply_tar`` was given: a pipeline's scheduler gives the step window). The TAR layers are every chosen block's
    self-attention; beside them go their companions (processors TAR needs, e.g. :class:`ShardedTextCrossAttention`
    on LTX-Video's cross-attention). Validates everything before changing anything (ValueError/TypeError); applying
    again replaces the previous application. ``profile`` (a :class:`~vstar_kernels.FrameProfile`) replaces
    ``sigma``, ``strength`` and ``mode``; a profile that holds only a band runs as that band's sigma would."""
    params, window = check_tar_arguments(sigma=sigma, strength=strength, mode=mode, timesteps=timesteps,
                                         backend=backend, profile=profile)
    plans = {}
    for prefix, transformer in transformers.items():
        spec = spec_of(transformer)
        chosen = select_blocks(find_self_attention(transformer, spec), blocks)
        processor_cls = PROCESSORS[spec.class_name]
        for layer in chosen:
            _check_signature(processor_cls, layer.module.processor, layer.name)
        companions = find_sharded_text_cross_attention(transformer, spec)
        for layer in companions:
            current = layer.module.processor
            _check_signature(ShardedTextCrossAttention,
                             current.inner if isinstance(current, DiTSynopsisProcessor) else current, layer.name)
        plans[prefix] = (transformer, spec, chosen, processor_cls, companions)

    first_chosen = next(iter(plans.values()))[2]
    sigma = None if profile is not None and not profile.has_band else params.sigma
    handle = DiTTARHandle(layers={}, sigma=sigma, strength=params.strength, mode=params.mode, window=window,
                          blocks=None if blocks is None else tuple(layer.block for layer in first_chosen),
                          profile=params.profile)
    scheduler = SchedulerSource(model) if not isinstance(model, nn.Module) else None
    for prefix, (transformer, spec, chosen, processor_cls, companions) in plans.items():
        remove_transformer_tar(transformer)
        state = DiTState()
        patch = TransformerPatch({}, {}, DiTGate(window, state, spec, scheduler), state)
        for layer in chosen:
            installed = processor_cls(layer.module.processor, sigma=sigma, strength=params.strength,
                                      mode=params.mode, backend=backend, text=spec.text, state=state,
                                      profile=params.profile)
            handle.layers[f"{prefix}.{layer.name}" if prefix else layer.name] = sigma
            set_processor_tracked(layer.module, installed, layer.name, patch.originals, patch.installed)
        for layer in companions:  # beneath a synopsis' per-frame regrouping, which stays outermost
            original, companion = install_processor(layer.module, ShardedTextCrossAttention, (DiTSynopsisProcessor,))
            patch.originals[layer.name] = original
            patch.installed[layer.name] = companion
        attach_patch(transformer, TAR_STATE_ATTR, handle, prefix, patch)
    return handle


def _check_signature(processor_cls: type[RoutedProcessor], original: object, name: str) -> None:
    """TypeError when the TAR processor would not take the original's arguments (diffusers drops keyword arguments a
    processor does not name, e.g. ``image_rotary_emb``): a processor of another class than the model's default."""
    if isinstance(original, RoutedProcessor):
        original = original.original
    ours = list(inspect.signature(processor_cls.__call__).parameters)[1:]
    theirs = list(inspect.signature(type(original).__call__).parameters)[1:]
    if ours != theirs:
        raise TypeError(f"{name}: its processor {type(original).__name__} takes {theirs}, TAR's "
                        f"{processor_cls.__name__} takes {ours}; set the model's default processor before apply_tar")


def remove_transformer_tar(transformer: nn.Module) -> bool:
    """Restore the processors (a synopsis may wrap a companion since: it stays, around the original) and remove the
    hook of the TAR application on ``transformer``; False if none. A synopsis still applied keeps the checkpoint
    wrapper."""
    return detach_patch(transformer, TAR_STATE_ATTR, SYNOPSIS_STATE_ATTR)


def transformer_tar_state(transformer: nn.Module) -> DiTTARHandle | None:
    """The :class:`DiTTARHandle` of the TAR application on ``transformer``, or None."""
    return attached_handle(transformer, TAR_STATE_ATTR)
