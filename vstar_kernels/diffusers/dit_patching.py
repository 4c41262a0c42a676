"""apply_tar / remove_tar for video diffusion transformers (Wan, CogVideoX, LTX-Video, HunyuanVideo).

TAR on a DiT is an extension beyond the paper (which evaluated UNets): the Gaussian band acts on *latent-frame*
distance inside the 3D self-attention of every chosen block, text tokens unbiased. As for UNets, everything a run
needs lives on the transformer: the processors, one forward pre-hook (:class:`DiTGate`: the step window and the
frame geometry of each call) and the handle, so deep copies, pickling and ``.to()`` carry it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from ..call_state import keep_state_in_checkpoints, release_checkpoints
from ..contract import MODES, make_params
from ..ops import requested_backend
from ..presets import StepWindow, resolve_window
from .components import install_processor, remove_pre_hook, replace_processors
from .dit_processor import PROCESSORS, DiTState, RoutedProcessor, ShardedTextCrossAttention
from .dit_synopsis import STATE_ATTR as SYNOPSIS_STATE_ATTR
from .dit_synopsis import DiTSynopsisProcessor
from .gates import DiTGate, SchedulerSource
from .video_transformers import (
    cache_forward_signature,
    find_self_attention,
    find_sharded_text_cross_attention,
    select_blocks,
    spec_of,
)

STATE_ATTR = "_vstar_tar_state"  # the same attribute as on UNets: one TAR application per model


@dataclass
class _ModelPatch:
    """What one apply_tar changed on one transformer: the TAR layers and their companions (processors TAR needs
    beside them, e.g. :class:`ShardedTextCrossAttention`), by module path."""

    originals: dict[str, object]
    installed: dict[str, RoutedProcessor]
    gate: DiTGate
    state: DiTState


@dataclass
class DiTTARHandle:
    """What one ``apply_tar`` on a video transformer (or a pipeline's transformers) patched: ``layers`` maps module
    path (prefixed by the pipeline attribute, e.g. ``transformer_2.blocks.3.attn1``) -> sigma in latent frames."""

    layers: dict[str, float]
    sigma: float
    strength: float
    mode: str
    window: StepWindow
    blocks: tuple[int, ...] | None
    _patches: dict[str, _ModelPatch] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def state(self, prefix: str | None = None) -> DiTState:
        """The shared state (step switch, last geometry) of the transformer at pipeline attribute ``prefix``
        ("transformer", "transformer_2"; "" for a bare transformer; default: the first one patched)."""
        return self._patches[next(iter(self._patches)) if prefix is None else prefix].state


_UNET_ONLY = {"preset": None, "levels": None, "positions": "interpolate"}


def check_transformer_arguments(sigma: float | None, **unet_only: object) -> None:
    """ValueError for the UNet-only arguments of apply_tar (presets name UNet levels) and a missing sigma."""
    for name, value in unet_only.items():
        if name == "processor":
            continue
        if value != _UNET_ONLY[name]:
            raise ValueError(f"{name}= applies to video UNets; a video transformer takes sigma= (in latent frames), "
                             "strength=, mode=, blocks= and timesteps=")
    if sigma is None:
        raise ValueError("apply_tar on a video transformer needs sigma= (the band's width in latent frames; the "
                         "paper's presets name UNet levels and do not apply)")


def apply_transformer_tar(model: object, transformers: dict[str, nn.Module], *, sigma: float, strength: float,
                          mode: str, blocks: object, timesteps: object, backend: str) -> DiTTARHandle:
    """Patch TAR into each transformer of ``transformers`` (pipeline attribute -> model). Validates everything
    before changing anything; applying again replaces the previous application."""
    params = make_params(1, sigma=sigma, strength=strength, mode=mode)  # the op's own rules, at the door
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    window = resolve_window(timesteps)
    requested_backend(backend)
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
    handle = DiTTARHandle(layers={}, sigma=params.sigma, strength=params.strength, mode=mode, window=window,
                          blocks=None if blocks is None else tuple(layer.block for layer in first_chosen))
    scheduler = SchedulerSource(model) if not isinstance(model, nn.Module) else None
    for prefix, (transformer, spec, chosen, processor_cls, companions) in plans.items():
        remove_transformer_tar(transformer)
        state = DiTState()
        patch = _ModelPatch({}, {}, DiTGate(window, state, spec, scheduler), state)
        for layer in chosen:
            installed = processor_cls(layer.module.processor, sigma=params.sigma, strength=params.strength,
                                      mode=mode, backend=backend, text=spec.text, state=state)
            patch.originals[layer.name] = layer.module.processor
            patch.installed[layer.name] = installed
            handle.layers[f"{prefix}.{layer.name}" if prefix else layer.name] = params.sigma
            layer.module.set_processor(installed)
        for layer in companions:  # beneath a synopsis' per-frame regrouping, which stays outermost
            original, companion = install_processor(layer.module, ShardedTextCrossAttention, (DiTSynopsisProcessor,))
            patch.originals[layer.name] = original
            patch.installed[layer.name] = companion
        transformer.register_forward_pre_hook(patch.gate, with_kwargs=True)
        keep_state_in_checkpoints(transformer)
        cache_forward_signature(type(transformer))  # what the gate binds, known before any traced call
        handle._patches[prefix] = patch
        setattr(transformer, STATE_ATTR, (handle, prefix))
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
    """Restore the processors and remove the hook of the TAR application on ``transformer``; False if none."""
    entry = transformer.__dict__.pop(STATE_ATTR, None)
    if entry is None:
        return False
    handle, prefix = entry
    patch = handle._patches[prefix]
    replace_processors(transformer, patch.originals, patch.installed)  # a synopsis may wrap a companion since
    for installed in patch.installed.values():
        installed.release()
    remove_pre_hook(transformer, patch.gate)
    if SYNOPSIS_STATE_ATTR not in transformer.__dict__:  # a synopsis keeps the checkpoint wrapper while it stays
        release_checkpoints(transformer)
    return True


def transformer_tar_state(transformer: nn.Module) -> DiTTARHandle | None:
    entry = transformer.__dict__.get(STATE_ATTR)
    return None if entry is None else entry[0]
