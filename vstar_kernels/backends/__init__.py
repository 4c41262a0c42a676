"""Backends of ``tar_attention``: one module each, all honouring the op contract.

Each backend module provides ``NAME``, ``unavailable_reason(device) -> str | None`` (can it run at all),
``unsupported_reason(q, params) -> str | None`` (can it run these inputs) and
``forward(q, k, v, params) -> Tensor``; optionally ``note_fallback(reason)``, called when "auto" passes it over.
:mod:`vstar_kernels.ops` chooses among them.
"""

from __future__ import annotations

from types import ModuleType

from . import extension, torch_tar, triton_tar

BACKENDS: dict[str, ModuleType] = {
    triton_tar.NAME: triton_tar,
    extension.NAME: extension,
    torch_tar.NAME: torch_tar,
}
# "auto" tries these in order, per device type
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": (triton_tar.NAME, extension.NAME, torch_tar.NAME),
    "cpu": (extension.NAME, torch_tar.NAME),
}
DEFAULT_AUTO_ORDER: tuple[str, ...] = (torch_tar.NAME,)

__all__ = ["AUTO_ORDER", "BACKENDS", "DEFAULT_AUTO_ORDER"]
