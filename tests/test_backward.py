"""Gradients of TAR attention on every backend against the float64 reference's autograd (the definition).

Backends: the fused C++ CPU backward (extension), the fused Triton backward under the interpreter (fp16, and the
kernels with forced small tiles), the torch backend's chunked backward. Every one is held to the float64
reference with the precision-aware criterion (``helpers.assert_grads_match_reference``). The CUDA kernels'
gradients are checked in tests/test_cuda.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grads_match_reference, grads_of, make_qkv

from vstar_kernels import gaussian_delta, tar_attention, tar_attention_reference
from vstar_kernels.backends import extension

BACKENDS = ("triton", "extension", "torch")


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("len_q", "len_k", "q_offset"), [(6, 6, 0), (5, 8, 3), (1, 1, 0)])
def test_gradcheck_float64_torch_backend(mode, len_q, len_k, q_offset):
    q, k, v = (t.double().requires_grad_() for t in make_qkv(2, len_q, 2, 5, len_k=len_k))
    fn = lambda q, k, v: tar_attention(q, k, v, sigma=1.5, strength=2.0, mode=mode, q_offset=q_offset,  # noqa: E731
                                       backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("frames", "dim", "len_k", "q_offset", "layout"), [
    (16, 40, None, 0, "fused_qkv"),      # strided views of one fused QKV projection
    (19, 80, 23, 4, "contiguous"),       # Lq != Lk and an offset
    (7, 160, None, 0, "projection"),
    (1, 40, None, 0, "projection"),      # F = 1
    (160, 40, None, 0, "projection"),    # multi-tile rows (Triton goes two-pass)
    (24, 64, None, -5, "heads_first"),
])
def test_every_backend_matches_the_float64_reference(backend, mode, frames, dim, len_k, q_offset, layout):
    q, k, v = make_qkv(2, frames, 3, dim, len_k=len_k, layout=layout, seed=frames + dim)
    assert_grads_match_reference(backend, q, k, v, sigma=2.0, strength=1.5, mode=mode, q_offset=q_offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_inputs(backend):
    q, k, v = make_qkv(2, 24, 2, 40, dtype=torch.float16, layout="projection")
    assert_grads_match_reference(backend, q, k, v, sigma=4.0, strength=1.0)


def _tied_inputs(dtype=torch.float32):
    """Identical key frames (a static first frame, as in image-to-video): rows whose max is at a repeated frame
    have tied maxima."""
    q, k, v = make_qkv(1, 8, 2, 16, dtype=dtype)
    k = k.clone()
    k[:, 1] = k[:, 0]
    k[:, 2] = k[:, 0]
    q = q.clone()
    q[:, :4] = k[:, :1] * 3.0  # these rows have their maximum at frames 0, 1, 2 at once
    return q, k, v


def test_tied_maxima_split_the_row_max_gradient_evenly():
    """At a tie the row max is not differentiable (no gradcheck there); the gradient is torch.amax's convention,
    the even split, exactly as the float64 reference's autograd gives it."""
    q, k, v = _tied_inputs(torch.float64)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    assert ((scores == scores.amax(-1, keepdim=True)).sum(-1) == 3).any()  # real ties
    fn = lambda q, k, v: tar_attention(q, k, v, sigma=1.0, strength=2.0, backend="torch")  # noqa: E731
    _, ours = grads_of(fn, (q, k, v), torch.ones(1, 8, 2, 16, dtype=torch.float64))
    _, ref = grads_of(lambda q, k, v: tar_attention_reference(q, k, v, sigma=1.0, strength=2.0), (q, k, v),
                    torch.ones(1, 8, 2, 16, dtype=torch.float64))
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_maxima_on_every_backend(backend):
    q, k, v = _tied_inputs()
    assert_grads_match_reference(backend, q, k, v, sigma=1.0, strength=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_on_some_inputs_only(backend):
    q, k, v = make_qkv(2, 12, 2, 16)
    k = k.detach().requires_grad_()
    out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    (dk,) = torch.autograd.grad(out.sum(), k)
    k64 = k.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(tar_attention_reference(q.double(), k64, v.double(), sigma=2.0).sum(), k64)
    torch.testing.assert_close(dk.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_records_nothing(backend):
    q, k, v = make_qkv(2, 12, 2, 16)
    assert tar_attention(q, k, v, sigma=2.0, backend=backend).grad_fn is None
    q.requires_grad_()
    with torch.no_grad():
        assert tar_attention(q, k, v, sigma=2.0, backend=backend).grad_fn is None


def test_the_custom_op_is_differentiable_and_passes_opcheck():
    assert extension.load() is None
    op = torch.ops.vstar_kernels.tar_attention
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(2, 12, 3, 40, layout="fused_qkv"))
    for mode in ("relative", "absolute"):
        torch.library.opcheck(op, (q, k, v, 2.0, 1.0, mode, 0.2, 4, 0))  # schema, fake, autograd, AOT dispatch
    out = op(q, k, v, 2.0, 1.0, "relative", 0.2, 4, 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = tar_attention_reference(*leaves, sigma=2.0, scale=0.2, q_offset=4)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), leaves), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["extension", "torch"])
def test_torch_compile_traces_forward_and_backward(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 12, 2, 16, layout="fused_qkv")

    def loss(q, k, v):
        return (tar_attention(q, k, v, sigma=2.0, strength=1.0, backend=backend) ** 2).sum()

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    traced = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(traced, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_backward_is_memory_bounded():
    """A budget smaller than one (batch, heads, Lq, Lk) score tensor still gives the exact gradient (chunked)."""
    from vstar_kernels.backends import torch_tar
    from vstar_kernels.contract import make_params

    q, k, v = make_qkv(3, 40, 2, 8, len_k=40)
    grad_out = torch.randn(3, 40, 2, 8)
    params = make_params(8, sigma=2.0, strength=1.0)
    tiny = torch_tar.backward(q, k, v, grad_out, params, memory_budget=2 * 40 * 4 * 6)  # one query row at a time
    full = torch_tar.backward(q, k, v, grad_out, params, memory_budget=1 << 30)
    for a, b in zip(tiny, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unet_training_step_through_apply_tar_matches_the_materialised_processor():
    pytest.importorskip("diffusers")
    from vstar_kernels import apply_tar
    from vstar_kernels.diffusers import MaterialisedTARProcessor, TARAttnProcessor
    from vstar_kernels.diffusers.tiny import tiny_unet3d

    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 12, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)
    target = torch.randn(1, 4, 12, 8, 8, generator=gen)

    def weight_grads(processor):
        unet = tiny_unet3d().train()
        handle = apply_tar(unet, "64D1_32D8", timesteps="all", processor=processor)
        loss = torch.nn.functional.mse_loss(unet(x, 900, text).sample, target)
        loss.backward()
        return handle, {n: p.grad for n, p in unet.named_parameters()}

    handle, fused = weight_grads(TARAttnProcessor)
    _, materialised = weight_grads(MaterialisedTARProcessor)
    temporal = [n for n in fused if any(n.startswith(layer + ".to_") for layer in handle.layers)]
    assert temporal and all(fused[n] is not None and fused[n].abs().sum() > 0 for n in temporal)  # to_q/k/v/out
    for name, grad in fused.items():
        torch.testing.assert_close(grad, materialised[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["extension", "torch"])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_bfloat16_inputs(backend, mode):
    q, k, v = make_qkv(2, 20, 2, 40, dtype=torch.bfloat16, layout="fused_qkv")
    assert_grads_match_reference(backend, q, k, v, sigma=3.0, strength=1.0, mode=mode)


@pytest.mark.parametrize(("len_q", "len_k", "dim"), [(3, 3000, 8), (130, 70, 20), (7, 1, 4)])
def test_fused_cpu_backward_shapes(len_q, len_k, dim):
    """Long key rows (the strip narrows to a few query rows), several query blocks, a single key."""
    q, k, v = make_qkv(2, len_q, 2, dim, len_k=len_k, seed=len_k)
    assert_grads_match_reference("extension", q, k, v, sigma=5.0, strength=2.0, q_offset=len_k - len_q)


def test_fused_cpu_backward_op_checks_and_strided_grad():
    assert extension.load() is None
    op = torch.ops.vstar_kernels.tar_attention_backward
    q, k, v = make_qkv(2, 9, 3, 16, layout="heads_first")
    grad = torch.randn(2, 3, 9, 16).transpose(1, 2)  # a non-contiguous output gradient
    torch.library.opcheck(op, (grad, q, k, v, 2.0, 1.0, "relative", 0.25, 0, 0))
    dq, dk, dv = op(grad, q, k, v, 2.0, 1.0, "relative", 0.25, 0, 0)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = tar_attention_reference(*leaves, sigma=2.0, scale=0.25)
    for g, r in zip((dq, dk, dv), torch.autograd.grad(ref, leaves, grad.double()), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="grad_out must be shaped like the output"):
        op(grad[:, :4], q, k, v, 2.0)
    with pytest.raises(RuntimeError, match="sigma must be > 0"):
        op(grad, q, k, v, 0.0)
    empty = op(grad[:0], q[:0], k[:0], v[:0], 2.0)
    assert [t.shape[0] for t in empty] == [0, 0, 0]


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("len_q", "len_k"), [(40, 40), (17, 50), (50, 17)])
def test_triton_backward_with_small_tiles_and_ties(mode, len_q, len_k):
    """Forced 16-wide tiles: rows span several key tiles, the row max and its ties come from different tiles."""
    from vstar_kernels.backends import triton_tar_backward as tb
    from vstar_kernels.contract import make_params

    q, k, v = make_qkv(2, len_q, 2, 24, len_k=len_k, seed=len_q * len_k)
    k = k.clone()
    k[:, 20 % len_k] = k[:, 3]  # identical key frames in different 16-wide tiles
    q = q.clone()
    q[:, :5] = k[:, 3:4] * 2.0
    grad_out = torch.randn(2, len_q, 2, 24, generator=torch.Generator().manual_seed(3))
    params = make_params(24, sigma=3.0, strength=1.5, mode=mode, q_offset=2)
    config = tb.BackwardConfig(16, 16, 32, num_warps=2)
    grads = tb.backward(q, k, v, grad_out, params, config=config)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = tar_attention_reference(*leaves, sigma=3.0, strength=1.5, mode=mode, q_offset=2)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves, grad_out.double()), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("len_q", "len_k"), [(40, 40), (9, 70)])
def test_triton_training_forward_saves_the_row_max_and_log_sum_exp(mode, len_q, len_k):
    """The forward of a training call returns the output and, per row, the unbiased row max and lse of S' (log2)."""
    import math

    from vstar_kernels.backends import triton_tar
    from vstar_kernels.contract import make_params

    q, k, v = (t.half() for t in make_qkv(2, len_q, 3, 24, len_k=len_k, seed=7))
    params = make_params(24, sigma=2.5, strength=1.5, mode=mode, q_offset=3)
    out, (saved_out, stats) = triton_tar.forward_with_residuals(q, k, v, params)
    assert saved_out is out and stats.shape == (2, 2 * 3, len_q) and stats.dtype == torch.float32
    kw = dict(sigma=2.5, strength=1.5, mode=mode, q_offset=3)
    ref = tar_attention_reference(q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)
    qd, kd = q.double().transpose(1, 2), k.double().transpose(1, 2)  # (batch, heads, frames, dim)
    scores = qd @ kd.transpose(-1, -2) * 24**-0.5
    delta = gaussian_delta(len_q, len_k, sigma=2.5, q_offset=3).double()
    row_max = scores.amax(-1, keepdim=True)
    biased = scores + 1.5 * (row_max if mode == "relative" else 1.0) * delta
    lse = torch.logsumexp(biased, -1) / math.log(2)
    torch.testing.assert_close(stats[1].double(), lse.reshape(6, len_q), rtol=1e-5, atol=1e-5)
    if mode == "relative":
        torch.testing.assert_close(stats[0].double(), (row_max[..., 0] / math.log(2)).reshape(6, len_q),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_triton_backward_from_saved_residuals_equals_recomputing_them(mode):
    from vstar_kernels.backends import triton_tar
    from vstar_kernels.contract import make_params

    q, k, v = (t.half() for t in make_qkv(2, 37, 2, 40, seed=11))
    grad_out = torch.randn(2, 37, 2, 40, generator=torch.Generator().manual_seed(5)).half()
    params = make_params(40, sigma=3.0, strength=1.0, mode=mode)
    _, residuals = triton_tar.forward_with_residuals(q, k, v, params)
    saved = triton_tar.backward(q, k, v, grad_out, params, residuals=residuals)
    recomputed = triton_tar.backward(q, k, v, grad_out, params)
    for a, b in zip(saved, recomputed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "dtype", "saved"), [
    ("triton", torch.float16, 5),    # q, k, v, the output and its (2, batch·heads, Lq) row statistics
    ("triton", torch.float32, 3),    # fp32 gradients recompute in the chunked torch backward
    ("extension", torch.float32, 3),  # the fused C++ backward recomputes the row statistics bit-exactly
    ("torch", torch.float32, 3),
])
def test_the_forward_saves_what_its_backward_needs(backend, dtype, saved):
    q, k, v = (t.to(dtype).requires_grad_() for t in make_qkv(1, 20, 2, 16, seed=2))
    out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    tensors = out.grad_fn.saved_tensors
    assert len(tensors) == saved
    assert all(t.numel() <= 2 * q.numel() for t in tensors)  # nothing Lq x Lk


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_joins_the_graph_with_zero_gradients(backend):
    q, k, v = (t[:0].requires_grad_() for t in make_qkv(2, 8, 2, 16))
    out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    assert out.shape == (0, 8, 2, 16) and out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v), strict=True))
