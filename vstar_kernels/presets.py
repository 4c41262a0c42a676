"""VSTAR's presets and the TAR step window, independent of diffusers.

A preset name lists ``<latent size>D<sigma>`` terms joined by ``_``: "64" is the highest-resolution latent level
of the UNet (level 0), "32" the next (level 1). "64D1_32D8" means sigma 1 at level 0 and sigma 8 at level 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .contract import make_params

PRESETS: dict[str, dict[int, float]] = {
    "64D1": {0: 1.0},
    "64D4": {0: 4.0},
    "64D8": {0: 8.0},
    "64D1_32D1": {0: 1.0, 1: 1.0},
    "64D1_32D8": {0: 1.0, 1: 8.0},
    "64D1_32D12": {0: 1.0, 1: 12.0},
    "64D4_32D8": {0: 4.0, 1: 8.0},
    "64D4_32D12": {0: 4.0, 1: 12.0},
}
DEFAULT_PRESET = "64D1_32D8"  # the authors' choice for longer videos
# The official schedule: TAR on for the first 14 of 25 DDIM steps, the noisiest 14/25 of the 1000 training steps.
PAPER_FRACTION = 14 / 25
NUM_TRAIN_TIMESTEPS = 1000


def resolve_levels(
    preset: str | Mapping[int, float] | None, sigma: float | None, levels: tuple[int, ...] | list[int] | None
) -> dict[int, float]:
    """The {level: sigma} mapping of one ``apply_tar`` call.

    ``preset`` (a name from PRESETS or a mapping) and ``sigma`` exclude each other; ``sigma`` applies to ``levels``
    (default level 0); with neither, DEFAULT_PRESET. ``levels`` filters a preset's levels.
    """
    if preset is not None and sigma is not None:
        raise ValueError("give either preset or sigma, not both")
    if sigma is not None:
        mapping = {int(level): float(sigma) for level in (levels if levels is not None else (0,))}
    else:
        preset = DEFAULT_PRESET if preset is None else preset
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
            mapping = dict(PRESETS[preset])
        elif isinstance(preset, Mapping):
            mapping = {int(level): float(s) for level, s in preset.items()}
        else:
            raise TypeError(f"preset must be a name or a {{level: sigma}} mapping, got {type(preset).__name__}")
        if levels is not None:
            mapping = {level: s for level, s in mapping.items() if level in set(levels)}
    if not mapping:
        raise ValueError("no level selected: the preset and levels leave nothing to patch")
    for level, s in mapping.items():
        if level < 0:
            raise ValueError(f"levels are >= 0 (0 = highest resolution), got {level}")
        make_params(1, sigma=s)  # validates sigma with the op's own rules
    return mapping


_TIMESTEP_TOLERANCE = 1e-6  # relative and absolute: locating a timestep in the scheduler's schedule


@dataclass(frozen=True)
class StepWindow:
    """When TAR is on. ``fraction``: on for the first ``fraction`` of the scheduler's steps, when the timestep can be
    located in the scheduler's schedule; otherwise (a bare UNet, an unknown timestep) on for ``lo <= t <= hi``."""

    lo: float
    hi: float
    fraction: float | None = None

    def __repr__(self) -> str:
        """Readable: ``StepWindow(first 56% of steps, else t >= 440)``; bounds rounded to 6 significant digits."""
        if self.lo == -math.inf and self.hi == math.inf:
            bounds = "every t"
        elif self.hi == math.inf:
            bounds = f"t >= {self.lo:g}"
        elif self.lo == -math.inf:
            bounds = f"t <= {self.hi:g}"
        else:
            bounds = f"{self.lo:g} <= t <= {self.hi:g}"
        if self.fraction is None:
            return f"StepWindow({bounds})"
        return f"StepWindow(first {self.fraction:.0%} of steps, else {bounds})"

    def active(self, t: float | None, schedule: Sequence[float] | torch.Tensor | None = None) -> bool:
        """Whether TAR is on at timestep ``t`` (None: no timestep given, on)."""
        if t is None:
            return True
        steps = None if schedule is None else torch.as_tensor(schedule, dtype=torch.float64)
        return bool(self.active_tensor(torch.tensor(float(t), dtype=torch.float64), steps))

    def active_tensor(self, t: torch.Tensor, schedule: torch.Tensor | None = None) -> torch.Tensor:
        """The rule as a 0-d bool tensor on ``t``'s device, with no data-dependent Python branch, so a forward
        pre-hook traced by ``torch.compile(fullgraph=True)`` computes it in the graph. ``t`` may be batched (CFG):
        its first element is the timestep."""
        t = t.detach().reshape(-1)[0].to(torch.float64)
        in_range = (t >= self.lo) & (t <= self.hi)
        if self.fraction is None or schedule is None or schedule.numel() == 0:
            return in_range
        steps = schedule.detach().reshape(-1).to(device=t.device, dtype=torch.float64)
        tolerance = torch.clamp(_TIMESTEP_TOLERANCE * torch.maximum(steps.abs(), t.abs()), min=_TIMESTEP_TOLERANCE)
        close = (steps - t).abs() <= tolerance
        first_steps = round(self.fraction * steps.numel())  # the first match lies among them iff one of them matches
        return torch.where(close.any(), close[:first_steps].any(), in_range)


def _window_bound(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timesteps {name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"timesteps {name} must not be NaN")
    return out


def resolve_window(timesteps: str | tuple[float, float]) -> StepWindow:
    """The step window: "paper" (first 14/25 of the schedule; t >= 440 of 1000 without a scheduler), "all", or an
    inclusive (t_lo, t_hi) timestep range of real numbers (±inf for an open end)."""
    if isinstance(timesteps, str):
        if timesteps == "paper":
            return StepWindow(NUM_TRAIN_TIMESTEPS * (1 - PAPER_FRACTION), math.inf, PAPER_FRACTION)
        if timesteps == "all":
            return StepWindow(-math.inf, math.inf)
    elif isinstance(timesteps, tuple | list) and len(timesteps) == 2:
        lo, hi = _window_bound("t_lo", timesteps[0]), _window_bound("t_hi", timesteps[1])
        if not lo <= hi:
            raise ValueError(f"timesteps range must have t_lo <= t_hi, got {tuple(timesteps)}")
        return StepWindow(lo, hi)
    raise ValueError(f'timesteps must be "paper", "all" or a (t_lo, t_hi) pair, got {timesteps!r}')
