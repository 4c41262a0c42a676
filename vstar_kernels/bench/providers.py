"""Everything a TAR benchmark compares, as providers with one calling convention.

A provider turns (q, k, v) of shape (batch, frames, heads, head_dim) — diffusers' projection views — plus the TAR
arguments into a zero-argument callable that computes the output. ``unavailable`` says why a provider cannot run
on a device or a mode (FlexAttention's score_mod never sees the row max, so its relative mode is two calls:
``flex_two_pass``, the row max from the first, CUDA only).

FlexAttention runs under ``torch.compile`` (a compile per shape: minutes on a CPU). ``VSTAR_BENCH_FLEX_COMPILE=0``
runs it eagerly instead (PyTorch's unfused reference, which materialises the scores): same results, no compile, for
smoke tests; its times are then not FlexAttention's.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vstar_kernels import tar_attention, tar_attention_reference
from vstar_kernels.contract import make_params
from vstar_kernels.ops import why_not
from vstar_kernels.reference import gaussian_delta

Thunk = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One benchmark point: the inputs and the TAR arguments."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mode: str
    sigma: float = 8.0
    strength: float = 1.0
    tokens_per_frame: int = 1  # > 1: a video transformer's 3D attention, the band over latent-frame distance

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    @property
    def layout(self) -> dict[str, int]:
        """The op's token layout arguments of this case."""
        return {"tokens_per_frame": self.tokens_per_frame}


def make_case(tokens: int, frames: int, heads: int, head_dim: int, mode: str, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", sigma: float = 8.0, strength: float = 1.0,
              requires_grad: bool = False, tokens_per_frame: int = 1) -> Case:
    """``tokens // frames`` sequences (B·H·W of a latent) of ``frames`` frames, as views of one fused QKV projection
    (a leaf that requires grad with ``requires_grad``, as in training). With ``tokens_per_frame`` > 1 a sequence is a
    video transformer's: ``frames`` tokens in frames of ``tokens_per_frame`` (pass ``tokens == frames`` for one
    sequence)."""
    batch = max(1, tokens // frames)
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(batch, frames, 3 * heads * head_dim, generator=gen).to(device=device, dtype=dtype)
    fused.requires_grad_(requires_grad)
    q, k, v = (t.view(batch, frames, heads, head_dim) for t in fused.split(heads * head_dim, dim=-1))
    return Case(q, k, v, mode=mode, sigma=sigma, strength=strength, tokens_per_frame=tokens_per_frame)


def forward_backward(forward: Thunk, case: Case) -> Thunk:
    """A thunk that runs ``forward`` and the backward to the fused QKV projection (dq, dk, dv at once), for a case
    made with ``requires_grad=True``."""
    leaf = case.q._base if case.q._base is not None else case.q
    if not leaf.requires_grad:
        raise ValueError("forward_backward needs a case made with requires_grad=True")
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn((*case.q.shape[:3], case.v.shape[3]), generator=gen).to(case.q.device, case.q.dtype)

    def run() -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():  # the harness times inside inference_mode
            return torch.autograd.grad(forward(), leaf, grad_out)[0]

    return run


@dataclass(frozen=True)
class Provider:
    """A named way to compute a benchmark point: ``build(case)`` gives the thunk, ``unavailable(case)`` why it cannot
    (None: it can). The case is a :class:`Case`, or a profile sweep's
    :class:`~vstar_kernels.bench.profile_providers.ProfileCase`."""

    name: str
    label: str
    build: Callable[[Case], Thunk]
    unavailable: Callable[[Case], str | None] = lambda case: None


def _heads_first(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in tensors)


def _sdpa(case: Case) -> Thunk:
    q, k, v = _heads_first(case.q, case.k, case.v)
    return lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _naive(case: Case) -> Thunk:
    """The official method's order of operations: S, ΔA and the biased scores all materialised."""
    return lambda: tar_attention_reference(case.q, case.k, case.v, sigma=case.sigma, strength=case.strength,
                                           mode=case.mode, upcast=False, **case.layout)


def _sdpa_bias(case: Case) -> Thunk:
    """SDPA with a materialised bias: per row (batch·heads·F·F, needs S first) in relative mode, one F×F in absolute."""
    q, k, v = _heads_first(case.q, case.k, case.v)
    lq, lk = q.shape[-2], k.shape[-2]
    gauss = gaussian_delta(lq, lk, sigma=case.sigma, dtype=q.dtype, device=q.device, **case.layout)

    def relative() -> torch.Tensor:
        row_max = (q @ k.transpose(-1, -2)).amax(dim=-1, keepdim=True) * case.scale
        return F.scaled_dot_product_attention(q, k, v, attn_mask=case.strength * row_max * gauss).transpose(1, 2)

    bias = case.strength * gauss
    return relative if case.mode == "relative" else (
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2))


FLEX_COMPILE_ENV = "VSTAR_BENCH_FLEX_COMPILE"


def flex_compiled() -> bool:
    """Whether FlexAttention runs compiled (the default) or eagerly (``VSTAR_BENCH_FLEX_COMPILE=0``)."""
    return os.environ.get(FLEX_COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        return torch.compile(flex_attention, dynamic=False)
    # asked for (VSTAR_BENCH_FLEX_COMPILE=0): PyTorch's notice that this is the unfused reference says nothing new
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
    return flex_attention


def _flex(case: Case) -> Thunk:
    q, k, v = _heads_first(case.q, case.k, case.v)
    coeff = 1.0 / (2.0 * case.sigma * case.sigma)
    strength = case.strength
    per_frame = case.tokens_per_frame

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx // per_frame - kv_idx // per_frame).to(torch.float32)
        return score + strength * torch.exp(-dist * dist * coeff)

    flex = _flex_attention(flex_compiled())
    return lambda: flex(q, k, v, score_mod=score_mod).transpose(1, 2)


def _flex_unavailable(case: Case) -> str | None:
    if case.mode == "relative":
        return "relative mode needs the row max of S, which score_mod never sees (flex_two_pass reads it)"
    return None


def _flex_two_pass(case: Case) -> Thunk:
    """VSTAR's relative form with FlexAttention alone: a first call returns the row max of the unbiased logits
    (``return_aux=AuxRequest(max_scores=True)``), a second adds ``strength * row_max * G`` in a ``score_mod`` that
    reads it. The first pass is a whole attention (FlexAttention has no row-max-only call)."""
    from torch.nn.attention.flex_attention import AuxRequest

    q, k, v = _heads_first(case.q, case.k, case.v)
    coeff = 1.0 / (2.0 * case.sigma * case.sigma)
    strength = case.strength
    per_frame = case.tokens_per_frame
    flex = _flex_attention(flex_compiled())

    def run() -> torch.Tensor:
        _, aux = flex(q, k, v, return_aux=AuxRequest(max_scores=True))
        row_max = aux.max_scores  # (batch, heads, Lq), natural units: the scaled logits' max

        def score_mod(score, b, h, q_idx, kv_idx):
            dist = (q_idx // per_frame - kv_idx // per_frame).to(torch.float32)
            return score + strength * row_max[b, h, q_idx] * torch.exp(-dist * dist * coeff)

        return flex(q, k, v, score_mod=score_mod).transpose(1, 2)

    return run


def _flex_two_pass_unavailable(case: Case) -> str | None:
    if case.mode != "relative":
        return "the two-pass form is the relative mode's (absolute: flex)"
    if case.q.device.type != "cuda":
        return "FlexAttention returns max scores on CUDA only (PyTorch: not supported on CPU/MPS)"
    return None


def _backend(name: str) -> Callable[[Case], Thunk]:
    def build(case: Case) -> Thunk:
        return lambda: tar_attention(case.q, case.k, case.v, sigma=case.sigma, strength=case.strength,
                                     mode=case.mode, backend=name, **case.layout)

    return build


def _backend_unavailable(name: str) -> Callable[[Case], str | None]:
    def unavailable(case: Case) -> str | None:
        return why_not(name, case.q, make_params(case.q.shape[-1], sigma=case.sigma, strength=case.strength,
                                                   mode=case.mode, **case.layout))

    return unavailable


def _xformers(case: Case) -> Thunk:
    import xformers.ops as xops

    q, k, v = case.q, case.k, case.v  # xformers takes (batch, frames, heads, dim) directly
    gauss = gaussian_delta(q.shape[1], k.shape[1], sigma=case.sigma, dtype=q.dtype, device=q.device, **case.layout)

    def run() -> torch.Tensor:
        if case.mode == "relative":
            row_max = torch.einsum("bqhd,bkhd->bhqk", q, k).amax(-1, keepdim=True) * case.scale
            bias = case.strength * row_max * gauss
        else:
            bias = (case.strength * gauss).expand(q.shape[0], q.shape[2], -1, -1)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    return run


def _xformers_unavailable(case: Case) -> str | None:
    if case.q.device.type != "cuda":
        return "xformers' fused kernels need CUDA"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "xformers is not installed"
    return None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("sdpa", "plain SDPA, no bias (floor)", _sdpa),
        Provider("naive", "naive materialised TAR (official order)", _naive),
        Provider("sdpa_bias", "SDPA + materialised bias", _sdpa_bias),
        Provider("flex", "FlexAttention (compiled)", _flex, _flex_unavailable),
        Provider("flex_two_pass", "FlexAttention, row max then bias (two calls)", _flex_two_pass,
                 _flex_two_pass_unavailable),
        Provider("xformers", "xformers + bias tensor", _xformers, _xformers_unavailable),
        Provider("triton", "vstar triton kernel", _backend("triton"), _backend_unavailable("triton")),
        Provider("extension", "vstar C++/CUDA extension", _backend("extension"), _backend_unavailable("extension")),
        Provider("torch", "vstar torch fallback", _backend("torch"), _backend_unavailable("torch")),
    )
}
