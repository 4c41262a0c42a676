"""Backends of ``tar_attention``: one module each, all honouring the op contract and the :class:`~.base.Backend`
interface (``NAME``, ``DTYPES``, ``MAX_HEAD_DIM``, ``unavailable_reason``, ``unsupported_reason``, ``note_fallback``,
``forward``, ``backward``). :mod:`vstar_kernels.ops` chooses among them and makes the forward differentiable.
"""

from __future__ import annotations

from typing import cast

from . import extension, torch_tar, triton_tar
from .base import Backend, InputSpec

BACKENDS: dict[str, Backend] = {
    module.NAME: cast(Backend, module) for module in (triton_tar, extension, torch_tar)
}
# "auto" tries these in order, per device type
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": (triton_tar.NAME, extension.NAME, torch_tar.NAME),
    "cpu": (extension.NAME, torch_tar.NAME),
}
DEFAULT_AUTO_ORDER: tuple[str, ...] = (torch_tar.NAME,)

__all__ = ["AUTO_ORDER", "BACKENDS", "DEFAULT_AUTO_ORDER", "Backend", "InputSpec"]
