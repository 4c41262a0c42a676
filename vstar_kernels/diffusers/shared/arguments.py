"""The ``apply_tar`` arguments a UNet and a video transformer take alike, validated once, at the door, by the op's own
rules (so a bad value raises before anything is patched, with the op's message)."""

from __future__ import annotations

from ...contract import TARParams, make_params
from ...ops import requested_backend
from ...presets import StepWindow, resolve_window


def check_tar_arguments(*, sigma: float | None = None, strength: float | None = None, mode: str | None = None,
                        timesteps: object, backend: str, profile: object = None) -> tuple[TARParams, StepWindow]:
    """Validate ``sigma``, ``strength`` and ``mode`` (as :func:`vstar_kernels.tar_attention` does), then the step
    window ``timesteps`` ("paper", "all" or a (t_lo, t_hi) range), then the ``backend`` name, in that order.

    Returns the validated parameters (``.sigma``, ``.strength`` as floats) and the :class:`StepWindow`. Raises
    ValueError (TypeError for a non-number) naming the first bad argument; changes nothing. A UNet, whose sigmas
    come per level from its preset (validated by ``resolve_levels``), passes ``sigma=1.0``. A ``profile`` (a
    :class:`~vstar_kernels.FrameProfile`) replaces ``sigma``, ``strength`` and ``mode``.
    """
    params = make_params(1, sigma=sigma, strength=strength, mode=mode, profile=profile)
    window = resolve_window(timesteps)
    requested_backend(backend)
    return params, window
