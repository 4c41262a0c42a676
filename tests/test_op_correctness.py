"""Every backend against the float64 reference, with the precision-aware criterion of helpers.py.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors (bf16 only where CUDA exists: the interpreter's
bf16 dot is broken); the C++ extension and the torch fallback run natively (their bf16 cases: test_extension.py,
test_torch_fallback.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import LAYOUTS, assert_matches_reference, make_qkv

from vstar_kernels import tar_attention
from vstar_kernels.backends import triton_tar
from vstar_kernels.contract import make_params

BACKENDS = ("triton", "extension", "torch")
FRAMES = (1, 2, 7, 16, 24, 33, 64, 128, 200)
HEAD_DIMS = (4, 40, 64, 80, 160)
HEADS = (1, 5, 8)
SIGMAS = (0.5, 1.0, 8.0, 1e4)
STRENGTHS = (0.0, 1.0, 4.0)
MODES = ("relative", "absolute")
DTYPES = (torch.float32, torch.float16)


def _grid_cases():
    """frames x head_dim x mode x dtype, with heads/sigma/strength rotating so each value meets every frame."""
    for i, (frames, dim, mode, dtype) in enumerate(itertools.product(FRAMES, HEAD_DIMS, MODES, DTYPES)):
        heads = HEADS[i % len(HEADS)]
        sigma = SIGMAS[(i // 2) % len(SIGMAS)]
        strength = (1.0, 4.0)[(i // 3) % 2]
        yield pytest.param(frames, dim, heads, mode, dtype, sigma, strength,
                           id=f"F{frames}-d{dim}-h{heads}-{mode}-{str(dtype)[6:]}-s{sigma:g}-w{strength:g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("frames", "dim", "heads", "mode", "dtype", "sigma", "strength"), list(_grid_cases()))
def test_shape_grid(backend, frames, dim, heads, mode, dtype, sigma, strength):
    q, k, v = make_qkv(2, frames, heads, dim, dtype=dtype, layout="projection", seed=frames * 1000 + dim)
    kw = dict(sigma=sigma, strength=strength, mode=mode)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_matches_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("strength", STRENGTHS)
def test_sigma_strength(backend, mode, sigma, strength):
    q, k, v = make_qkv(3, 24, 5, 40, len_k=37)
    kw = dict(sigma=sigma, strength=strength, mode=mode, q_offset=6, k_offset=0)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("len_q", "len_k", "q_offset", "k_offset"),
    [
        (16, 48, 16, 0),  # a chunk of queries in the middle of the clip
        (7, 33, 30, 0),  # the last query frames
        (33, 7, 0, 10),  # fewer keys than queries
        (1, 200, 199, 0),  # a single query frame against a long key row
        (24, 24, -5, 1000),  # keys far away: the band vanishes
        (24, 20, 2**40 + 3, 2**40),  # offsets beyond int32
    ],
)
def test_offsets_and_unequal_lengths(backend, mode, len_q, len_k, q_offset, k_offset):
    q, k, v = make_qkv(2, len_q, 5, 64, len_k=len_k)
    kw = dict(sigma=2.0, strength=2.0, mode=mode, q_offset=q_offset, k_offset=k_offset)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


def test_offsets_equal_chunked_full_sequence():
    """Processing query frames in chunks with q_offset gives exactly the rows of the full computation."""
    q, k, v = make_qkv(2, 40, 5, 40)
    kw = dict(sigma=3.0, strength=2.0, mode="relative")
    full = tar_attention(q, k, v, backend="torch", **kw)
    for backend in BACKENDS:
        parts = [tar_attention(q[:, i:i + 16], k, v, q_offset=i, backend=backend, **kw) for i in range(0, 40, 16)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_layouts(backend, layout, mode, dtype):
    """Diffusers-style views, fused-QKV slices and other non-contiguous inputs, read without copies."""
    q, k, v = make_qkv(3, 24, 5, 40, dtype=dtype, layout=layout)
    if layout in ("fused_qkv", "heads_first", "permuted"):
        assert not q.is_contiguous()
    kw = dict(sigma=2.0, strength=1.0, mode=mode)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("frames", "dim"), [(24, 64), (200, 160)])
def test_large_magnitude_inputs(backend, mode, dtype, frames, dim):
    """Inputs x30: logits in the thousands, no overflow and no NaN in fp16 either."""
    q, k, v = make_qkv(2, frames, 2, dim, dtype=dtype, magnitude=30.0, seed=7)
    kw = dict(sigma=1.0, strength=4.0, mode=mode)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strength_zero_is_plain_attention(backend, mode, dtype):
    q, k, v = make_qkv(2, 33, 5, 40, dtype=dtype, len_k=20)
    out = tar_attention(q, k, v, sigma=1.0, strength=0.0, mode=mode, backend=backend)
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), plain, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_reshape_is_free(backend):
    """The (batch, Lq, heads, dim) result views as (batch, Lq, heads*dim) without a copy."""
    q, k, v = make_qkv(2, 16, 5, 40, layout="fused_qkv")
    out = tar_attention(q, k, v, sigma=1.0, backend=backend)
    flat = out.view(2, 16, 5 * 40)  # raises if the layout needed a copy
    assert flat.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16, 5, 40), (2, 0, 5, 40)])
def test_empty_inputs_return_empty(backend, shape):
    q = torch.randn(shape)
    k = v = torch.randn(shape[0], 8, 5, 40)
    out = tar_attention(q, k, v, sigma=1.0, backend=backend)
    assert out.shape == shape


# --------------------------------------------------------------------------------- Triton-specific paths
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames", [300, 257])
def test_triton_two_pass_by_frame_count(dtype, frames):
    """Lk beyond the single-tile limit takes the two-pass path on its own."""
    assert triton_tar.block_config(frames, frames, 64, "relative").two_pass
    q, k, v = make_qkv(1, frames, 2, 64, dtype=dtype)
    kw = dict(sigma=4.0, strength=1.0, mode="relative")
    assert_matches_reference(tar_attention(q, k, v, backend="triton", **kw), q, k, v, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("len_q", "len_k", "dim"), [(33, 33, 40), (17, 50, 80), (40, 16, 4)])
def test_triton_forced_small_tiles(mode, dtype, len_q, len_k, dim):
    """Two-pass relative mode and multi-tile online softmax with tails, forced through small tiles."""
    cfg = triton_tar.BlockConfig(block_m=16, block_n=16, block_d=triton_tar.block_config(1, 1, dim, mode).block_d,
                                 two_pass=True, num_warps=2)
    layout = "fused_qkv" if len_q == len_k else "projection"
    q, k, v = make_qkv(2, len_q, 3, dim, len_k=len_k, dtype=dtype, layout=layout)
    kw = dict(sigma=1.5, strength=3.0, mode=mode, q_offset=len_k - len_q if len_k > len_q else 0)
    out = triton_tar.forward(q, k, v, make_params(dim, **kw), config=cfg)
    assert_matches_reference(out, q, k, v, **kw)


def test_triton_single_pass_config_rejects_long_rows():
    q, k, v = make_qkv(1, 8, 1, 16, len_k=40)
    cfg = triton_tar.BlockConfig(block_m=16, block_n=16, block_d=16, two_pass=False, num_warps=2)
    with pytest.raises(ValueError, match="block_n >= Lk"):
        triton_tar.forward(q, k, v, make_params(16, sigma=1.0), config=cfg)


@pytest.mark.parametrize("dim", [1, 4, 16, 40, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("frames", [1, 16, 64, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_config_is_consistent(dim, frames, dtype):
    for mode in MODES:
        cfg = triton_tar.block_config(frames, frames, dim, mode, dtype)
        assert cfg.block_d >= max(16, dim) and cfg.block_d & (cfg.block_d - 1) == 0
        assert min(cfg.block_m, cfg.block_n) >= 16  # tl.dot needs 16
        assert cfg.two_pass == (mode == "relative" and frames > cfg.block_n)
        assert cfg.block_m * max(cfg.block_n, cfg.block_d) <= 4096
        if frames <= 16:
            assert not cfg.two_pass, "short clips must take the single-pass path"
