"""Extreme values inside the contract (issue 22, item 7): each gives the finite answer the formula has, on every
backend, where the code before gave NaN or raised.

1. relative mode with |strength * row max| beyond float32 (strength 1e38, logits near 5): NaN on every backend;
2. absolute mode with |strength| * log2(e) beyond float32 (|strength| >= ~2.4e38): NaN on Triton (and the CUDA
   fallback: the same tar_bias_coeff, compiled by the nvcc check only);
3. sigma above ~1.2e162 (1 / (2 sigma^2) underflows to 0): ZeroDivisionError in Triton's band_reach;
4. frame distances beyond 2^30 (up to the contract's 2^31 - 1) in a token layout: Triton fp16/bf16 gave those keys no
   band (the band window's reach was capped at 2^30).

The criterion: the float64 formula *without* the saturation of the bias coefficient (:func:`unsaturated_float64`,
written out here), which is what the saturation must not change in these cases, plus the usual precision-aware
comparison with the (saturating) float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ATOL, assert_matches_reference, make_qkv

from vstar_kernels import gaussian_delta, tar_attention
from vstar_kernels.backends import triton_tar
from vstar_kernels.backends.triton_common import MAX_BAND_REACH, BlockConfig, band_reach
from vstar_kernels.contract import BIAS_COEFF_MAX, FLOAT32_MAX, make_params

BACKENDS = ("extension", "torch", "triton")
needs_interpreter = pytest.mark.skipif(not triton_tar.INTERPRETER,
                                       reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")


def unsaturated_float64(q, k, v, *, sigma, strength, mode="relative", scale=None, q_offset=0, k_offset=0,
                        tokens_per_frame=1, video_start=0, video_tokens=None) -> torch.Tensor:
    """softmax(S + c G) V in float64 with c = strength * rowmax(S) or strength, never saturated."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # (batch, heads, frames, dim)
    scores = qd @ kd.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    band = gaussian_delta(q.shape[1], k.shape[1], sigma=sigma, q_offset=q_offset, k_offset=k_offset,
                          tokens_per_frame=tokens_per_frame, video_start=video_start, video_tokens=video_tokens,
                          dtype=torch.float64)
    coeff = strength * scores.amax(-1, keepdim=True) if mode == "relative" else strength
    return (torch.softmax(scores + coeff * band, -1) @ vd).transpose(1, 2)


def assert_is_the_formula(out: torch.Tensor, q, k, v, **kw) -> None:
    """Finite, equal to the unsaturated float64 formula to the dtype's tolerance, and to the reference."""
    assert torch.isfinite(out).all(), "non-finite output"
    atol = ATOL[q.dtype] * max(1.0, v.abs().max().item())
    torch.testing.assert_close(out.double(), unsaturated_float64(q, k, v, **kw), rtol=0, atol=atol)
    assert_matches_reference(out, q, k, v, **kw)


def logits_near_5(batch=2, frames=8, heads=2, dim=16):
    """q, k, v with S_ii = <q_i, k_i> = 5 (scale 1), so every row max is at least 5 (and near it)."""
    _, k, v = make_qkv(batch, frames, heads, dim)
    q = 5.0 * k / (k * k).sum(-1, keepdim=True)
    row_max = (q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)).amax(-1)
    assert (row_max >= 5 - 1e-5).all() and (row_max < 50).all()
    return q, k, v


# ------------------------------------------------------------------------- 1. |strength * row max| > float32
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strength", [1e38, -1e38, FLOAT32_MAX])
def test_relative_bias_beyond_float32_is_computed(backend, strength):
    """c = strength * m is 1e38 * ~5, beyond float32: the band decides each row (the diagonal for c > 0, the farthest
    frame for c < 0), as the unsaturated float64 formula says. NaN before on every backend."""
    q, k, v = logits_near_5()
    kw = dict(sigma=1.0, strength=strength, scale=1.0)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_is_the_formula(out, q, k, v, **kw)
    if strength > 0:  # each frame sees itself
        torch.testing.assert_close(out, v.contiguous(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_bias_beyond_float32_with_text_tokens(backend):
    """A token layout with text before and after the video: text rows and columns have G = 0, so inf * 0 was NaN
    there before; now text rows are plain attention and a video row shares its weight between the two tokens of its
    frame (next to a bias of 2^125, S is below float32's and float64's resolution alike)."""
    q, k, v = logits_near_5(frames=12)
    kw = dict(sigma=1.0, strength=1e38, scale=1.0, tokens_per_frame=2, video_start=2, video_tokens=8)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_is_the_formula(out, q, k, v, **kw)
    plain = tar_attention(q, k, v, backend=backend, sigma=1.0, strength=0.0, scale=1.0)
    torch.testing.assert_close(out[:, [0, 1, 10, 11]], plain[:, [0, 1, 10, 11]], rtol=0, atol=1e-6)
    pairs = v[:, 2:10].unflatten(1, (4, 2)).mean(2).repeat_interleave(2, 1)
    torch.testing.assert_close(out[:, 2:10], pairs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_a_saturated_relative_bias_are_finite(backend):
    """The saturated coefficient passes no gradient to the row max (sat' = 0), as the reference's autograd says;
    before, the forward was NaN already."""
    q, k, v = logits_near_5(frames=6)
    kw = dict(sigma=1.0, strength=1e38, scale=1.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(tar_attention(*leaves, backend=backend, **kw), leaves, grad_out)
    from vstar_kernels import tar_attention_reference

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(tar_attention_reference(*ref_leaves, **kw), ref_leaves, grad_out.double())
    for g, r in zip(grads, ref, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[2], grad_out, rtol=0, atol=1e-6)  # out = v: dv = dout, dq = dk = 0


@needs_interpreter
def test_triton_fp16_backward_of_a_saturated_relative_bias():
    """The fused fp16 backward (prep kernel: the row max's share) gives the saturated gradient too."""
    q, k, v = (t.half() for t in logits_near_5(frames=6))
    kw = dict(sigma=1.0, strength=1e38, scale=1.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    out = tar_attention(*leaves, backend="triton", **kw)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-3)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(grads[2], grad_out, rtol=0, atol=1e-3)
    for g in grads[:2]:
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-3)


# ------------------------------------------------------------------------ 2. |strength| * log2(e) > float32
def test_absolute_log2_bias_is_finite_in_float32():
    """The exp2-domain kernels' host constant sat(strength) * log2(e): inf in float32 before for |strength| from
    ~2.36e38."""
    for strength in (3e38, -FLOAT32_MAX):
        scale = make_params(8, sigma=1.0, strength=strength, mode="absolute").bias_log2_scale
        assert np.isfinite(np.float32(scale)) and abs(scale) == pytest.approx(BIAS_COEFF_MAX * 1.4426950408889634)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strength", [3e38, -3e38])
@pytest.mark.parametrize("layout", [{}, dict(tokens_per_frame=2, video_start=1, video_tokens=8)])
def test_absolute_bias_beyond_float32_in_log2_units_is_computed(backend, strength, layout):
    """strength 3e38 in absolute mode: 4.3e38 in log2 units. NaN before on Triton (s + inf - inf, or inf * 0 at
    text tokens); the C++ CPU kernel and torch work in natural units and were right."""
    q, k, v = make_qkv(2, 10, 2, 16)
    kw = dict(sigma=1.0, strength=strength, mode="absolute", **layout)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_is_the_formula(out, q, k, v, **kw)


# ---------------------------------------------------------------------------------------- 3. a huge sigma
@pytest.mark.parametrize("sigma", [1e163, 1e200, 1.7e308])
def test_band_reach_of_a_huge_sigma_is_everything(sigma):
    """1 / (2 sigma^2) underflows to 0: the constant band reaches every key (ZeroDivisionError before)."""
    params = make_params(8, sigma=sigma, tokens_per_frame=2)
    assert params.gauss_log2_coeff == 0.0
    assert band_reach(params) == MAX_BAND_REACH
    assert triton_tar.band_tiles_skipped(64, 2, sigma, 16, mode="absolute",
                                         config=BlockConfig(16, 16, 32, False, 2)) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("layout", [{}, dict(tokens_per_frame=3, video_start=2)])
def test_a_huge_sigma_is_the_constant_band(backend, mode, layout):
    """G = 1 between framed tokens: in the temporal layout a constant bias, i.e. plain attention."""
    q, k, v = make_qkv(2, 11, 2, 16)
    kw = dict(sigma=1e200, strength=2.0, mode=mode, **layout)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_is_the_formula(out, q, k, v, **kw)
    if not layout:
        plain = tar_attention(q, k, v, backend=backend, sigma=1.0, strength=0.0)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)


@needs_interpreter
def test_a_huge_sigma_in_the_fp16_band_window():
    """fp16 with a token layout and several key tiles (the band window, SKIP_BAND): the whole row is in reach."""
    q, k, v = (t.half() for t in make_qkv(1, 48, 2, 16))
    kw = dict(sigma=1e200, strength=2.0, mode="absolute", tokens_per_frame=2)
    params = make_params(16, **kw)
    config = BlockConfig(16, 16, 32, two_pass=False, num_warps=2)
    assert triton_tar.skips_band(params, config, torch.float16)
    assert_matches_reference(triton_tar.forward(q, k, v, params, config=config), q, k, v, **kw)


# ----------------------------------------------------------------- 4. frame distances beyond 2^30 in fp16
@needs_interpreter
@pytest.mark.parametrize(("q_offset", "k_offset"), [(2**30, 0), (0, 2**30)])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_triton_fp16_band_window_reaches_distances_beyond_2_30(q_offset, k_offset, mode):
    """|q_offset - k_offset| = 2^30 with 24 frames: distances 2^30 - 23 .. 2^30 + 23, G ~ exp(-2) with sigma 2^29.
    The band window (fp16, a token layout, several key tiles) skipped the keys more than 2^30 frames away, as if the
    band ended there; the contract's int32 distances reach 2^31 - 1. (Relative mode takes the window with two-pass
    tiles, which the launcher picks for rows longer than a tile; forced here with a 16-key config.)"""
    q, k, v = (t.half() for t in make_qkv(2, 48, 2, 16, layout="projection"))
    kw = dict(sigma=2.0**29, strength=3.0, mode=mode, q_offset=q_offset, k_offset=k_offset, tokens_per_frame=2)
    params = make_params(16, **kw)
    config = BlockConfig(16, 16, 32, two_pass=mode == "relative", num_warps=2)
    assert triton_tar.skips_band(params, config, torch.float16)
    assert band_reach(params) == MAX_BAND_REACH  # sigma 2^29: nonzero far past 2^30
    out = triton_tar.forward(q, k, v, params, config=config)
    assert_matches_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_distances_beyond_2_30_in_a_token_layout(backend):
    """The same call on every backend, through the op (the launcher's own tiles; fp32 on Triton)."""
    q, k, v = make_qkv(2, 48, 2, 16, layout="projection")
    kw = dict(sigma=2.0**29, strength=3.0, mode="absolute", q_offset=2**30, k_offset=0, tokens_per_frame=2)
    assert_is_the_formula(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)
