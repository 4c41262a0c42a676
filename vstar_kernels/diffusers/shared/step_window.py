"""The step window at run time, for UNets and transformers alike: the per-call on/off of one ``apply_tar``
(:class:`TARSwitch`), the forward pre-hook that sets it from each call's timestep (:class:`TARGate`, reading the
schedule through :class:`SchedulerSource`), and how a processor branches on it (:func:`by_step_window`).

A gate reads everything at call time: the call's timestep and the schedule of the pipeline's scheduler *now* (a
scheduler swapped after ``apply_tar``, or a new ``set_timesteps``, is the one in force). What it decides goes into
the switch's per-thread :class:`~vstar_kernels.call_state.Scoped` values, so concurrent calls from several threads
and checkpoint recomputes each see their own call's decision. The transformers' gate, which also reads each call's
frame geometry, extends :class:`TARGate` (:class:`vstar_kernels.diffusers.dit.patching.DiTGate`).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ...call_state import Scoped
from ...presets import StepWindow
from .components import prepare_checkpoints

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> out


class TARSwitch:
    """On/off of one ``apply_tar``, decided per call: the model's forward pre-hook sets it for the call's timestep
    and the processors of that call read it. The state is per thread (:class:`~vstar_kernels.call_state.Scoped`), so
    concurrent calls and checkpoint recomputes see their own call's decision.

    ``active``: the decision as a bool (eager; True before the thread's first call). ``flag``: the same rule as a 0-d
    bool tensor (None without a timestep), which traced processors branch on with ``torch.cond``.
    """

    def __init__(self, active: bool = True) -> None:
        self._default = bool(active)
        # two values, not one tuple: a compiled block reads only the flag, so it guards on nothing the window changes
        self._active: Scoped[bool] = Scoped("TAR switch")
        self._flag: Scoped[torch.Tensor] = Scoped("TAR step flag")

    def set(self, active: bool | None, flag: torch.Tensor | None) -> None:
        """This thread's decision: ``active`` (None while tracing) and ``flag``."""
        self._active.put(active)
        self._flag.put(flag)

    @property
    def active(self) -> bool:
        active = self._active.get()
        return self._default if active is None else active

    @active.setter
    def active(self, value: bool) -> None:
        self.set(bool(value), None)

    @property
    def flag(self) -> torch.Tensor | None:
        return self._flag.get()

    def __repr__(self) -> str:
        return f"TARSwitch(active={self.active})"


def cond_on_flag(flag: torch.Tensor, on: AttentionFn, off: AttentionFn, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """``torch.cond(flag, on, off, (q, k, v))`` for traced processors (both branches in the graph, one runs: no graph
    break, no recompile per step). Each branch returns (batch, Lq, heads, v's head_dim); inside the cond it is
    flattened to 1-D and viewed back outside, because a contiguous output with symbolic sizes carries ``Max(1, n)``
    strides that torch.cond rejects (dynamic shapes, or automatic dynamic after a resolution change)."""
    shape = (*q.shape[:-1], v.shape[-1])
    out = torch.cond(flag, lambda q, k, v: on(q, k, v).reshape(-1), lambda q, k, v: off(q, k, v).reshape(-1),
                     (q, k, v))
    return out.view(shape)


def by_step_window(switch: TARSwitch | None, with_tar: AttentionFn, without_tar: AttentionFn, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``with_tar(q, k, v)`` inside the step window, ``without_tar(q, k, v)`` outside it, as this call's ``switch``
    says (None: always inside). Traced with a step flag set: both branches in the graph (:func:`cond_on_flag`);
    eager: the switch's ``active`` decides and only that branch runs."""
    flag = None if switch is None else switch.flag
    if flag is not None and torch.compiler.is_compiling():
        return cond_on_flag(flag, with_tar, without_tar, q, k, v)
    if switch is None or switch.active:
        return with_tar(q, k, v)
    return without_tar(q, k, v)


class SchedulerSource:
    """Where a gate finds the schedule in force: the ``scheduler`` attribute of the pipeline ``apply_tar`` was given,
    read at every call (None for a bare model: the timestep range decides).

    Holds the pipeline weakly where it can (a pipeline holds the model, so the model must not keep it alive); a deep
    copy of the model shares it (the copy's pipeline steps through the same schedule); pickling keeps the scheduler in
    force at that moment, since a pipeline is not part of a pickled model.
    """

    def __init__(self, owner: object | None = None) -> None:
        self._fixed = None
        self._owner = None
        if owner is not None:
            try:
                self._owner = weakref.ref(owner)
            except TypeError:  # an object without weak references (e.g. a SimpleNamespace standing in for a pipeline)
                self._owner = lambda: owner

    def scheduler(self) -> object | None:
        owner = None if self._owner is None else self._owner()
        return self._fixed if owner is None else getattr(owner, "scheduler", None)

    def schedule(self) -> torch.Tensor | None:
        """The scheduler's current ``timesteps`` as a tensor, or None."""
        timesteps = getattr(self.scheduler(), "timesteps", None)
        return None if timesteps is None else torch.as_tensor(timesteps)

    def __deepcopy__(self, memo: dict) -> SchedulerSource:
        return self

    def __getstate__(self) -> dict:
        return {"_fixed": self.scheduler(), "_owner": None}


class TARGate:
    """The forward pre-hook of one ``apply_tar`` on a UNet (and the base of a transformer's ``DiTGate``): switches TAR
    on or off for this call's timestep.

    It sets this thread's state of ``switch``: eager, ``active`` (a bool, for the processors) and ``flag`` (the
    same rule as a 0-d bool tensor, which a regionally compiled block branches on with ``torch.cond`` without
    recompiling when the window closes); under ``torch.compile`` only ``flag`` (no ``.item()``, so ``fullgraph=True``
    holds). A plain, picklable object; a deep copy gets its own switch.
    """

    def __init__(self, window: StepWindow, switch: TARSwitch, scheduler: SchedulerSource | None = None) -> None:
        self.window = window
        self.switch = switch
        self.source = scheduler if scheduler is not None else SchedulerSource()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prepare_checkpoints(module)
        self.update(kwargs.get("timestep", args[1] if len(args) > 1 else None))

    def update(self, t: object) -> None:
        """Switch TAR for the call's timestep ``t`` (a number or tensor; its first element; None: on)."""
        if t is not None:
            t = torch.as_tensor(t)
        if t is None or t.numel() == 0:
            self.switch.set(True, None)
            return
        flag = self.window.active_tensor(t, self.source.schedule())
        self.switch.set(None if torch.compiler.is_compiling() else bool(flag), flag)

    def __deepcopy__(self, memo: dict) -> TARGate:
        return TARGate(copy.deepcopy(self.window, memo), copy.deepcopy(self.switch, memo), self.source)
