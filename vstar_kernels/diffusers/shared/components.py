"""Reaching the parts of a diffusers model or pipeline that the integrations patch, installing processors and hooks
there, and putting them back: the mechanics both the UNet and the transformer integrations use."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping

import torch
from torch import nn

from ...call_state import keep_state_in_checkpoints

# Where an application keeps its record on the model it patched (one of each kind per model). A UNet holds its handle
# there; a video transformer holds (handle, pipeline attribute), since one handle may patch a pipeline's two experts.
TAR_STATE_ATTR = "_vstar_tar_state"
SYNOPSIS_STATE_ATTR = "_vstar_synopsis_state"


def unet_of(model: object) -> nn.Module:
    """The UNet of a pipeline (its ``.unet``), or ``model`` itself when it is a model."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a diffusers UNet or a pipeline with .unet, got {type(model).__name__}")
    return unet


def restore_processors(unet: nn.Module, originals: Mapping[str, object],
                       still_ours: Callable[[str, object], bool]) -> None:
    """Put ``originals[name]`` back on each layer whose current processor ``still_ours(name, current)`` accepts;
    a layer whose processor something else replaced since keeps that newer choice."""
    modules = dict(unet.named_modules())
    for name, original in originals.items():
        module = modules.get(name)
        if module is not None and still_ours(name, module.processor):
            module.set_processor(original)


def set_processor_tracked(module: nn.Module, processor: object, name: str, originals: MutableMapping[str, object],
                          installed: MutableMapping[str, object]) -> None:
    """``processor`` as ``module``'s processor, noting the one it replaces as ``originals[name]`` and itself as
    ``installed[name]`` (what :func:`restore_processors` and :func:`replace_processors` undo)."""
    originals[name] = module.processor
    installed[name] = processor
    module.set_processor(processor)


def prepare_checkpoints(module: nn.Module) -> None:
    """A forward pre-hook's first step: before a forward that records gradients (eager, not traced), checkpointed
    blocks of ``module`` keep this call's per-thread state for their recompute (``enable_gradient_checkpointing`` may
    have come after the patch)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        keep_state_in_checkpoints(module)


def remove_pre_hook(module: nn.Module, hook: object) -> None:
    """Unregister ``hook`` from ``module``'s forward pre-hooks by identity. The integrations keep their hooks as
    plain objects on the module rather than a RemovableHandle, which would not survive ``copy.deepcopy`` or pickling
    (it points at the original module's hook dict)."""
    for key, registered in list(module._forward_pre_hooks.items()):
        if registered is hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def wrapped_processor(processor: object) -> object | None:
    """The processor ``processor`` wraps (its ``inner`` or ``original``: the link below it in a chain of wrapping
    processors), or None."""
    return getattr(processor, "inner", None) or getattr(processor, "original", None)


def replace_processor(module: nn.Module, ours: object, original: object) -> bool:
    """Put ``original`` where ``ours`` is: the module's processor itself, or a link of a chain of wrapping
    processors (each holding the next as ``inner`` or ``original``). False when ``ours`` is not there (something
    replaced it since: that newer choice stays)."""
    current = module.processor
    if current is ours:
        module.set_processor(original)
        return True
    while current is not None:
        for attribute in ("inner", "original"):
            if getattr(current, attribute, None) is ours:
                setattr(current, attribute, original)
                return True
        current = wrapped_processor(current)
    return False


def install_processor(module: nn.Module, make: Callable[[object], object],
                      beneath: tuple[type, ...] = ()) -> tuple[object, object]:
    """``make(current)`` as ``module``'s processor, or, when the current processor is a wrapper of a class in
    ``beneath`` (one that must stay outermost), as that wrapper's ``inner``. Returns (what it replaced, what it
    installed), for :func:`replace_processor` to undo."""
    current = module.processor
    if isinstance(current, beneath):
        original = current.inner
        current.inner = installed = make(original)
        return original, installed
    installed = make(current)
    module.set_processor(installed)
    return current, installed


def replace_processors(model: nn.Module, originals: Mapping[str, object], installed: Mapping[str, object]) -> None:
    """:func:`replace_processor` for each module path of ``originals``: ``installed[name]`` back to
    ``originals[name]``, wherever it sits in a chain of wrappers."""
    modules = dict(model.named_modules())
    for name, original in originals.items():
        if name in modules:
            replace_processor(modules[name], installed[name], original)


class WrappedSettings:
    """Mixin for a processor that wraps another (the attribute named by ``_WRAPPED``): diffusers'
    ``set_attention_backend`` and context parallelism set ``_attention_backend`` / ``_parallel_config`` on every
    processor, and they belong to the wrapped one, whose code reads them."""

    _WRAPPED = "original"

    @property
    def _attention_backend(self):
        return getattr(getattr(self, self._WRAPPED), "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:
        getattr(self, self._WRAPPED)._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(getattr(self, self._WRAPPED), "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:
        getattr(self, self._WRAPPED)._parallel_config = value
