"""Side-by-side timing: providers interleaved round by round in one process, so machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the measured rounds."""

    median: float
    p20: float
    p80: float
    rounds: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_ms: list[float], q: float) -> float:
    return statistics.quantiles(sorted_ms, n=100, method="inclusive")[int(q * 100) - 1] if len(sorted_ms) > 1 \
        else sorted_ms[0]


def time_side_by_side(thunks: Mapping[str, Callable[[], object]], *, device: torch.device, rounds: int = 15,
                      warmup: int = 2) -> dict[str, Timing]:
    """Call every thunk ``warmup`` times, then ``rounds`` rounds of one call each, in rotating order."""
    names = list(thunks)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                thunks[name]()
        _sync(device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                start = time.perf_counter()
                thunks[name]()
                _sync(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ms in samples.items():
        ms.sort()
        out[name] = Timing(median=statistics.median(ms), p20=_quantile(ms, 0.2), p80=_quantile(ms, 0.8), rounds=rounds)
    return out
