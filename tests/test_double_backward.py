"""Double backward of TAR attention (create_graph=True): exact second order on every backend, never silent zeros.

The second-order quantities (the gradient of a loss that contains a first-order gradient, and a Hessian-vector
product) are held to the float64 reference's double backward through plain torch ops
(:func:`vstar_kernels.reference.tar_attention_reference`), with the precision-aware criterion of tests/helpers.py:
|x - x_ref64| <= 2 * |x_torch_same_precision - x_ref64| + atol. Triton runs under the interpreter (conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import ATOL, make_qkv

from vstar_kernels import tar_attention, tar_attention_reference
from vstar_kernels.backends import BACKENDS, extension, triton_tar

Tensors = tuple[torch.Tensor, ...]
Attention = Callable[..., torch.Tensor]

BACKEND_NAMES = ("extension", "torch", "triton")
MODES = ("relative", "absolute")
# (batch, Lq, heads, head_dim, Lk, layout/offset keywords): odd frame counts, head dims that are not powers of two
CASES = {
    "odd_frames": (2, 5, 2, 12, None, {}),
    "cross_offset": (1, 7, 2, 5, 9, {"q_offset": 3}),
    "token_layout": (1, 13, 2, 6, None, {"tokens_per_frame": 3, "video_start": 2, "video_tokens": 9}),
}


def _skip_unavailable(backend: str) -> None:
    if backend == "triton" and triton_tar.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip(triton_tar.unavailable_reason(torch.device("cpu")))


def _leaves(tensors: Tensors, dtype: torch.dtype | None = None) -> Tensors:
    return tuple(t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors)


def second_order(fn: Attention, inputs: Tensors, u: Tensors) -> Tensors:
    """The issue's reproducer on every input x, d/dx [sum(out) + sum_x |d sum(out^2)/dx|^2], then the
    Hessian-vector product H·u of sum(out^2); ``2 * len(inputs)`` tensors shaped like (*inputs, *inputs)."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    assert all(g.requires_grad for g in grads), "create_graph=True gave gradients without a graph"
    penalty = out.sum() + sum(g.pow(2).sum() for g in grads)
    second = torch.autograd.grad(penalty, inputs, retain_graph=True)
    hvp = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, u, strict=True)), inputs)
    return (*second, *hvp)


def assert_second_order_matches_reference(ours: Attention, reference: Attention, inputs: Tensors,
                                          label: object = "") -> None:
    """``second_order`` of ``ours`` against ``reference`` (tar_attention_reference's keywords) run in float64, with
    the same reference in the input precision (``upcast=False``) as the precision baseline."""
    gen = torch.Generator().manual_seed(1)
    u = tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs)
    u_same = tuple(w.to(inputs[0].dtype) for w in u)
    dtype = inputs[0].dtype
    got = second_order(ours, _leaves(inputs), u_same)
    ref = second_order(reference, _leaves(inputs, torch.float64), u)
    same = second_order(lambda *x: reference(*x, upcast=False), _leaves(inputs), u_same)
    for i, (x, r, s) in enumerate(zip(got, ref, same, strict=True)):
        name = f"{'second' if i < len(inputs) else 'hvp'}[{i % len(inputs)}]"
        assert x.dtype == dtype and torch.isfinite(x).all(), name
        err = (x.double() - r).abs().max().item()
        base = (s.double() - r).abs().max().item()
        atol = ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * base + atol, f"{name}: {err:.3e} > 2 * {base:.3e} + {atol:.3e} ({label})"


def _check_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> None:
    assert_second_order_matches_reference(lambda *x: tar_attention(*x, backend=backend, **kw),
                                          lambda *x, **extra: tar_attention_reference(*x, **kw, **extra),
                                          (q, k, v), (backend, kw))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_second_order_matches_the_float64_reference(backend, mode, case):
    _skip_unavailable(backend)
    batch, len_q, heads, dim, len_k, layout = CASES[case]
    q, k, v = make_qkv(batch, len_q, heads, dim, len_k=len_k, seed=len_q + dim)
    _check_backend(backend, q, k, v, sigma=2.0, strength=1.5, mode=mode, **layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_float64_second_order_is_exact(mode, case):
    """The torch backend computes float64: its second order equals the reference's to rounding (atol 1e-12)."""
    batch, len_q, heads, dim, len_k, layout = CASES[case]
    q, k, v = (t.double() for t in make_qkv(batch, len_q, heads, dim, len_k=len_k, seed=len_q + dim))
    _check_backend("torch", q, k, v, sigma=2.0, strength=1.5, mode=mode, **layout)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_float16_second_order(backend, mode):
    """Triton fp16 saves residuals and runs fused backward kernels whose outputs have no graph at all."""
    _skip_unavailable(backend)
    q, k, v = make_qkv(1, 9, 2, 20, dtype=torch.float16, layout="projection", seed=3)
    _check_backend(backend, q, k, v, sigma=2.0, strength=1.0, mode=mode)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_create_graph_gives_gradients_with_a_graph(backend):
    _skip_unavailable(backend)
    for dtype in (torch.float32, torch.float16):
        q, k, v = _leaves(make_qkv(1, 6, 2, 8, dtype=dtype))
        out = tar_attention(q, k, v, sigma=2.0, backend=backend)
        (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        assert g.requires_grad and g.grad_fn is not None, dtype
        (plain,) = torch.autograd.grad(tar_attention(q, k, v, sigma=2.0, backend=backend).pow(2).sum(), q)
        assert not plain.requires_grad
        torch.testing.assert_close(g.detach(), plain, rtol=2e-3 if dtype == torch.float16 else 1e-5,
                                   atol=2e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_first_order_backward_stays_on_the_backend(backend, monkeypatch):
    """A plain backward runs the backend's own (fused) backward once; create_graph=True does not use it."""
    _skip_unavailable(backend)
    calls = []
    fast = BACKENDS[backend].backward
    monkeypatch.setattr(BACKENDS[backend], "backward", lambda *a, **kw: calls.append(1) or fast(*a, **kw))
    q, k, v = _leaves(make_qkv(1, 6, 2, 8))
    torch.autograd.grad(tar_attention(q, k, v, sigma=2.0, backend=backend).sum(), (q, k, v))
    assert len(calls) == 1
    torch.autograd.grad(tar_attention(q, k, v, sigma=2.0, backend=backend).sum(), (q, k, v), create_graph=True)
    assert len(calls) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [{}, {"tokens_per_frame": 2, "video_start": 1}])
def test_gradgradcheck_float64(mode, layout):
    """The torch backend is the only one that computes float64 (extension and Triton refuse it)."""
    q, k, v = _leaves(make_qkv(1, 5, 1, 3, len_k=5, seed=7), torch.float64)

    def fn(q, k, v):
        return tar_attention(q, k, v, sigma=1.5, strength=2.0, mode=mode, backend="torch", **layout)

    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_self_attention_on_one_tensor(backend):
    """q, k and v one tensor: each argument still gets its own first-order gradient inside, and they add up."""
    _skip_unavailable(backend)
    x = make_qkv(1, 7, 2, 6, seed=5, magnitude=0.5)[0]  # q = k: peaked rows, ill-conditioned in fp32 at 1.0
    assert_second_order_matches_reference(lambda x: tar_attention(x, x, x, sigma=2.0, backend=backend),
                                          lambda x, **kw: tar_attention_reference(x, x, x, sigma=2.0, **kw),
                                          (x,), backend)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_only_some_inputs_require_grad(backend):
    _skip_unavailable(backend)
    q, k, v = make_qkv(1, 6, 2, 8, seed=4)
    assert_second_order_matches_reference(
        lambda k: tar_attention(q, k, v, sigma=2.0, backend=backend),
        lambda k, **kw: tar_attention_reference(q.to(k.dtype), k, v.to(k.dtype), sigma=2.0, **kw), (k,), backend)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_an_empty_batch_has_a_second_order(backend):
    _skip_unavailable(backend)
    q, k, v = _leaves(t[:0] for t in make_qkv(2, 6, 2, 8))
    out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), q, allow_unused=True, materialize_grads=True)
    assert g.shape == h.shape == q.shape


def test_the_custom_op_called_directly_has_an_exact_second_order():
    assert extension.load() is None
    op = torch.ops.vstar_kernels.tar_attention
    kw = {"sigma": 2.0, "strength": 1.5, "mode": "relative", "scale": 0.3, "q_offset": 2}
    assert_second_order_matches_reference(lambda *x: op(*x, 2.0, 1.5, "relative", 0.3, 2, 0),
                                          lambda *x, **extra: tar_attention_reference(*x, **kw, **extra),
                                          make_qkv(1, 7, 2, 10, seed=6), "custom op")


def test_differentiating_the_fused_backward_op_raises():
    """The fused backward op has no derivative: a clear error, not PyTorch's warning and zeros."""
    assert extension.load() is None
    q, k, v = _leaves(make_qkv(1, 6, 2, 8))
    grad = torch.randn(1, 6, 2, 8)
    dq, _, _ = torch.ops.vstar_kernels.tar_attention_backward(grad, q, k, v, 2.0)
    with pytest.raises(RuntimeError, match=r"TAR attention \(extension backend\).*create_graph=True"):
        torch.autograd.grad(dq.sum(), q)
