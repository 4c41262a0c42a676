"""Which frames this rank holds in the frame-parallel UNet call in progress (none outside one).

Kept free of diffusers so that other integrations (per-frame conditioning) can ask without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..call_state import Scoped
from .layout import RankGroup

__all__ = ["CALL", "FrameCall", "Scoped", "frame_window"]


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


CALL: Scoped[FrameCall] = Scoped("frame-parallel call")  # per thread; restored in checkpoint recomputes


def frame_window() -> tuple[int, int] | None:
    """(first frame, frame count) of this rank inside a frame-parallel UNet call, else None."""
    call = CALL.get()
    return None if call is None else (call.start, call.count)
