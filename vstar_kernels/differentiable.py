"""The differentiable gradients of TAR attention: the backward of a call differentiated with ``create_graph=True``.

No fused backward kernel is differentiable, so a backward that must be differentiated again (double backward,
Hessian-vector products, gradient penalties) recomputes the gradients of the materialised reference under grad
mode. :mod:`vstar_kernels.ops` and the extension backend's own autograd formula both call it; it depends on the
contract and the reference only.
"""

from __future__ import annotations

import dataclasses

import torch

from .contract import TARParams
from .reference import tar_attention_reference


def differentiable_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, params: TARParams,
    needs: tuple[bool, bool, bool] = (True, True, True), k_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) of TAR attention for the output gradient ``grad_out``, recorded by autograd: the backward of a
    call differentiated with ``create_graph=True`` (double backward, Hessian-vector products, gradient penalties).

    The gradients are those of the materialised reference (:func:`~vstar_kernels.reference.tar_attention_reference`,
    plain torch ops, float32 math for float16/bfloat16 inputs), recomputed from q, k, v under grad mode and taken
    with ``torch.autograd.grad(..., create_graph=True)``. They are differentiable functions of q, k, v and
    ``grad_out``, joined to the graph those came from, so the second order is exact on every backend. Costs the
    reference's memory: (batch, heads, Lq, Lk) score tensors, kept for the second backward.

    Each input gets its own gradient even when q, k and v are one tensor (self-attention). None where ``needs`` is
    False; zeros for an input the output does not depend on. Each gradient is shaped and typed like its input.
    """
    with torch.enable_grad():
        leaves = tuple(_graph_alias(t) if need else t.detach() for t, need in zip((q, k, v), needs, strict=True))
        out = tar_attention_reference(*leaves, **_reference_kwargs(params), k_lengths=k_lengths)
        wanted = tuple(t for t, need in zip(leaves, needs, strict=True) if need)
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    dq, dk, dv = (_or_zeros(next(found), t) if need else None for t, need in zip(leaves, needs, strict=True))
    return dq, dk, dv


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _graph_alias(t: torch.Tensor) -> torch.Tensor:
    """A distinct autograd node standing for ``t``: gradients taken with respect to it are this argument's alone
    (q, k and v may be one tensor), and flow on into ``t``'s graph."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()


def _reference_kwargs(params: TARParams) -> dict[str, object]:
    """``params`` as :func:`~vstar_kernels.reference.tar_attention_reference` keyword arguments (same names; a call
    with a frame-distance profile passes the profile, which holds its band, instead of sigma, strength and mode)."""
    skip = {"chunked"} | ({"sigma", "strength", "mode"} if params.profile is not None else {"profile"})
    return {field.name: getattr(params, field.name) for field in dataclasses.fields(params) if field.name not in skip}
