"""Per-call state of the patched models: one place that every integration keeps what a forward decides.

A patched model decides things per forward call: whether TAR is on at this call's timestep, the frame geometry of
this call's input (video transformers), which frames this rank holds (frame parallelism). Keeping such a decision in
an attribute of the model is wrong as soon as the model is used the way pipelines use it:

- two threads serving one model overwrite each other's decision (one call at t=900 switches TAR off for another);
- gradient checkpointing recomputes a block during the *backward*, long after the forward that set the decision,
  so the recompute would read whatever the last forward left (another geometry, TAR switched the other way).

So every such decision is a :class:`Scoped` value: one value per thread (``threading.local``, which
``torch.compile`` traces, unlike ``ContextVar.get``), set by the model's forward pre-hook and read by the processors
of that forward. Checkpointed blocks take a :func:`snapshot` of every live Scoped value when their forward runs and
run their recompute inside :func:`restored` (see :class:`StatefulCheckpoint`), so the recompute sees the state of
its own forward, on whichever thread the backward runs.

A Scoped value belongs to one patch of one model: ``copy.deepcopy`` and unpickling give a fresh, empty one (the
copy's own forwards fill it), and it holds nothing that would keep a model alive.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_LIVE: weakref.WeakSet[Scoped] = weakref.WeakSet()  # every Scoped value that exists, for snapshots
_UNSET = object()


class Scoped(Generic[T]):
    """A value per thread, set for the duration of a call: ``token = v.set(x)`` ... ``v.reset(token)``, read with
    ``v.get()`` (None when this thread never set it). The ContextVar interface, backed by ``threading.local`` so that
    ``torch.compile(fullgraph=True)`` traces reads and writes."""

    def __init__(self, name: str = "value") -> None:
        self.name = name
        self._local = threading.local()
        _LIVE.add(self)

    def get(self) -> T | None:
        return getattr(self._local, "value", None)

    def put(self, value: T | None) -> None:
        """Set this thread's value for the call in progress, without reading the previous one (a traced read of it
        would guard the compiled code on what the last call left)."""
        self._local.value = value

    def set(self, value: T | None) -> T | None:
        """Set this thread's value; returns the previous one, to pass to :meth:`reset`."""
        previous = getattr(self._local, "value", None)
        self._local.value = value
        return previous

    def reset(self, token: T | None) -> None:
        self._local.value = token

    def __repr__(self) -> str:
        return f"Scoped({self.name!r}, {self.get()!r})"

    # A copy is a new patch: its own, empty per-thread state (a threading.local cannot be copied or pickled anyway).
    def __deepcopy__(self, memo: dict) -> Scoped[T]:
        return Scoped(self.name)

    def __reduce__(self):
        return Scoped, (self.name,)


Snapshot = dict  # Scoped -> value, for the values set on the thread that took it


def snapshot() -> Snapshot:
    """Every Scoped value set on this thread (what a checkpointed forward must see again when it is recomputed)."""
    taken = {}
    for scoped in list(_LIVE):
        value = getattr(scoped._local, "value", _UNSET)
        if value is not _UNSET:
            taken[scoped] = value
    return taken


@contextlib.contextmanager
def restored(taken: Snapshot) -> Iterator[None]:
    """Run with the values of ``taken`` set on this thread; the thread's own values come back after."""
    tokens = [(scoped, scoped.set(value)) for scoped, value in taken.items()]
    try:
        yield
    finally:
        for scoped, token in reversed(tokens):
            scoped.reset(token)


# ------------------------------------------------------------------------------------------ gradient checkpointing
class _StatefulCall:
    """The callable a checkpoint function runs (and re-runs for the recompute): ``module(*args)`` under the per-call
    state of the forward that made it. Attribute access falls through to the module, for checkpoint functions that
    look at it."""

    def __init__(self, module: Callable, taken: Snapshot) -> None:
        self._module = module
        self._taken = taken

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with restored(self._taken):
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class StatefulCheckpoint:
    """Wraps a diffusers model's ``_gradient_checkpointing_func`` (``func(block, *args)``) so that the block's
    recompute runs under the per-call state of its own forward. Under ``torch.compile`` it passes through: the traced
    graph holds the state it was traced with, recompute included."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner

    def __call__(self, module: Callable, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.inner(module, *args, **kwargs)
        return self.inner(_StatefulCall(module, snapshot()), *args, **kwargs)

    def __repr__(self) -> str:
        return f"StatefulCheckpoint({self.inner!r})"


_CHECKPOINT_ATTR = "_gradient_checkpointing_func"


def keep_state_in_checkpoints(model: nn.Module) -> None:
    """Wrap the checkpoint function of every module of ``model`` that has one (diffusers sets it on each module with
    a ``gradient_checkpointing`` flag) in :class:`StatefulCheckpoint`; idempotent. The integrations call it when they
    patch a model and from their forward pre-hooks (eagerly), so ``enable_gradient_checkpointing()`` after patching,
    which installs a new function, is covered from the next forward on."""
    for module in model.modules():
        func = module.__dict__.get(_CHECKPOINT_ATTR)
        if func is not None and not isinstance(func, StatefulCheckpoint):
            module.__dict__[_CHECKPOINT_ATTR] = StatefulCheckpoint(func)


def release_checkpoints(model: nn.Module) -> None:
    """Undo :func:`keep_state_in_checkpoints`: every wrapped checkpoint function back as it was."""
    for module in model.modules():
        func = module.__dict__.get(_CHECKPOINT_ATTR)
        if isinstance(func, StatefulCheckpoint):
            module.__dict__[_CHECKPOINT_ATTR] = func.inner
