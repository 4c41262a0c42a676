"""What one application (TAR, or a synopsis) changed on one video transformer, and how it is attached to the model and
detached from it: the same steps for both, so TAR and a synopsis compose on one model in either order.

An application's handle may span a pipeline's transformers (Wan 2.2's two experts): it keeps one
:class:`TransformerPatch` per pipeline attribute, and each transformer holds ``(handle, pipeline attribute)`` at the
application's state attribute (:data:`~vstar_kernels.diffusers.shared.components.TAR_STATE_ATTR` or
``SYNOPSIS_STATE_ATTR``), so a deep copy, pickle or ``.to()`` of the model carries it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...call_state import keep_state_in_checkpoints, release_checkpoints
from ..shared.components import remove_pre_hook, replace_processors
from .video_transformers import cache_forward_signature


@dataclass
class TransformerPatch:
    """What one application changed on one transformer: the processors it replaced (``originals``) and those it
    installed (``installed``), by module path; its forward pre-hook (``gate``); and the state its processors share
    (TAR's :class:`~vstar_kernels.diffusers.dit.processor.DiTState`; None where the gate holds it)."""

    originals: dict[str, object]
    installed: dict[str, object]
    gate: object
    state: object | None = None


def attach_patch(transformer: nn.Module, attribute: str, handle: object, prefix: str, patch: TransformerPatch) -> None:
    """Make ``patch`` (whose processors are already set) live on ``transformer``: its gate as a forward pre-hook with
    keyword arguments, checkpointed blocks keeping each call's state, the forward signature the gate binds cached
    before any traced call, ``handle._patches[prefix] = patch`` and ``(handle, prefix)`` at ``attribute``."""
    transformer.register_forward_pre_hook(patch.gate, with_kwargs=True)
    keep_state_in_checkpoints(transformer)
    cache_forward_signature(type(transformer))
    handle._patches[prefix] = patch
    setattr(transformer, attribute, (handle, prefix))


def detach_patch(transformer: nn.Module, attribute: str, other_attribute: str) -> bool:
    """Undo :func:`attach_patch` of the application at ``attribute``: each installed processor replaced by the one
    it replaced, wherever it sits now in a chain of wrappers (another patch may wrap it since: that wrapper stays,
    around the original); the hook removed; the checkpoint wrapper released unless the application at
    ``other_attribute`` (the other kind) stays and needs it. False when none is at ``attribute``."""
    entry = transformer.__dict__.pop(attribute, None)
    if entry is None:
        return False
    handle, prefix = entry
    patch = handle._patches[prefix]
    replace_processors(transformer, patch.originals, patch.installed)
    remove_pre_hook(transformer, patch.gate)
    if other_attribute not in transformer.__dict__:
        release_checkpoints(transformer)
    return True


def attached_handle(transformer: nn.Module, attribute: str) -> object | None:
    """The handle of the application at ``attribute`` on ``transformer``, or None."""
    entry = transformer.__dict__.get(attribute)
    return None if entry is None else entry[0]
