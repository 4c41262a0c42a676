"""Which frames this rank holds in the frame-parallel UNet call in progress (none outside one).

Kept free of diffusers so that other integrations (per-frame conditioning) can ask without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from .layout import RankGroup

T = TypeVar("T")


@dataclass(frozen=True)
class FrameCall:
    """The frame split of the UNet call in progress on this rank: contiguous shares in rank order."""

    rg: RankGroup
    frame_sizes: list[int]

    @property
    def frames(self) -> int:
        return sum(self.frame_sizes)

    @property
    def start(self) -> int:
        """This rank's first frame."""
        return sum(self.frame_sizes[:self.rg.rank])

    @property
    def count(self) -> int:
        """How many frames this rank holds."""
        return self.frame_sizes[self.rg.rank]


class Scoped(Generic[T]):
    """A process-wide value set for the duration of a call: ``token = v.set(x)`` ... ``v.reset(token)``, read with
    ``v.get()`` (the ContextVar interface). Not a ContextVar because torch.compile cannot trace ``ContextVar.get``;
    process-wide suffices, since a frame-parallel call issues collectives that every rank must run in one order, so
    a process runs one at a time."""

    def __init__(self) -> None:
        self._value: T | None = None

    def get(self) -> T | None:
        return self._value

    def set(self, value: T | None) -> T | None:
        previous, self._value = self._value, value
        return previous

    def reset(self, token: T | None) -> None:
        self._value = token


CALL: Scoped[FrameCall] = Scoped()


def frame_window() -> tuple[int, int] | None:
    """(first frame, frame count) of this rank inside a frame-parallel UNet call, else None."""
    call = CALL.get()
    return None if call is None else (call.start, call.count)
