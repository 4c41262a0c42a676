"""The forward pre-hooks of ``apply_tar``: each call's step window (UNets and transformers) and frame geometry
(transformers), decided per call and kept per call (:mod:`vstar_kernels.call_state`).

A gate reads everything at call time: the call's timestep, the schedule of the pipeline's scheduler *now* (a
scheduler swapped after ``apply_tar``, or a new ``set_timesteps``, is the one in force), and the call's input shape.
What it decides goes into the patch's per-thread :class:`~vstar_kernels.call_state.Scoped` values, so concurrent
calls from several threads and checkpoint recomputes each see their own call's decision.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from ..call_state import keep_state_in_checkpoints
from ..presets import StepWindow
from .dit_processor import DiTState
from .processor import TARSwitch
from .video_transformers import VideoTransformerSpec, bind_forward


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
    """The UNet forward pre-hook of one ``apply_tar``: switches TAR on or off for this call's timestep.

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
        self.prepare(module)
        self.update(kwargs.get("timestep", args[1] if len(args) > 1 else None))

    @staticmethod
    def prepare(module: nn.Module) -> None:
        """Before a forward that records gradients: checkpointed blocks keep this call's state for their recompute
        (``enable_gradient_checkpointing`` may have come after ``apply_tar``)."""
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            keep_state_in_checkpoints(module)

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
        self.prepare(module)
        bound = bind_forward(module, args, kwargs)
        self.state.geometry = self.spec.geometry(module, bound)
        t = bound.get("timestep")
        self.update(None if t is None else t.amax() if hasattr(t, "amax") and t.numel() > 1 else t)

    def __deepcopy__(self, memo: dict) -> DiTGate:
        return DiTGate(copy.deepcopy(self.window, memo), copy.deepcopy(self.state, memo), self.spec, self.source)
