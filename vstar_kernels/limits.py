"""The op contract's modes and numeric limits: the few constants that both :mod:`vstar_kernels.contract` (the call's
arguments) and :mod:`vstar_kernels.profiles` (a frame-distance profile's values) check against. Imports nothing of
the package, so both can import it."""

from __future__ import annotations

from typing import Literal

Mode = Literal["relative", "absolute"]
MODES: tuple[str, ...] = ("relative", "absolute")
FLOAT32_MAX = 3.4028234663852886e38  # strength must fit the kernels' float32 accumulation
MAX_OFFSET = 2**53  # frame indices stay exact in float64 up to here
MAX_TOKENS = 2**53  # token counts of the layout, exact in float64 like the offsets
