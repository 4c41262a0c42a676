"""Reaching the parts of a diffusers model or pipeline that the integrations patch, and putting them back."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn


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


def remove_pre_hook(module: nn.Module, hook: object) -> None:
    """Unregister ``hook`` from ``module``'s forward pre-hooks by identity. The integrations keep their hooks as
    plain objects on the module rather than a RemovableHandle, which would not survive ``copy.deepcopy`` or pickling
    (it points at the original module's hook dict)."""
    for key, registered in list(module._forward_pre_hooks.items()):
        if registered is hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
