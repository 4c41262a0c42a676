"""The interface every backend of ``tar_attention`` implements, and the input description they judge.

A backend is a module (one per kernel family) that satisfies :class:`Backend`; :mod:`vstar_kernels.ops` chooses among
them and calls ``forward`` with validated :class:`~vstar_kernels.contract.TARParams`. Whether a backend can run a
call depends on an :class:`InputSpec`, not on tensors, so the CLI and the demo ask without building probe tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..contract import TARParams


@dataclass(frozen=True)
class InputSpec:
    """What a backend needs to know to accept a call: device, dtype, head_dim, and batch·heads (grid limits)."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    batch_heads: int = 1
    varlen: bool = False  # a per-sequence key count (``k_lengths``) is given

    @classmethod
    def of(cls, q: torch.Tensor, varlen: bool = False) -> InputSpec:
        """The spec of a (batch, frames, heads, head_dim) query tensor (``varlen``: the call gives ``k_lengths``)."""
        return cls(q.device, q.dtype, q.shape[3], q.shape[0] * q.shape[2], varlen)


@runtime_checkable
class Backend(Protocol):
    """One backend: a name, what it supports, why it cannot run, the forward and its backward."""

    NAME: str
    DTYPES: tuple[torch.dtype, ...]  # input dtypes it computes
    MAX_HEAD_DIM: int | None  # None: any head_dim

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device`` at all, else why not."""

    def unsupported_reason(self, spec: InputSpec, params: TARParams) -> str | None:
        """None when it can run inputs like ``spec`` with ``params``, else why not."""

    def note_fallback(self, reason: str) -> None:
        """Called when "auto" passes this backend over for ``reason`` (e.g. to warn once about a failed build)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams) -> torch.Tensor:
        """(batch, Lq, heads, head_dim) output of the op contract (no autograd: ops wraps it). Keyword arguments,
        given only when the call has them: ``row_max``, ``return_lse`` and ``k_lengths`` (a validated contiguous
        int64 (batch,) tensor on q's device, each in [1, Lk]: keys at or past it do not attend)."""

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                 params: TARParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) for the output gradient ``grad_out``, shaped and typed like q, k, v. A backend that defines
        ``forward_with_residuals(q, k, v, params) -> (out, residuals)`` (optional: the forward of a call whose
        inputs require grad, saving what its backward needs beyond q, k, v) also takes
        ``backward(..., residuals=residuals)``. A call with ``k_lengths`` passes it to both, as a keyword; the
        gradients of the keys at or past it are zero."""
