"""The token layout of the op (tokens_per_frame, video_start, video_tokens): a frame-distance band for a video
transformer's 3D attention, text tokens without a frame.

The float64 reference is first checked against an independent statement written here (explicit frame indices and a
materialised softmax), then every backend is held to the reference with the precision criterion of helpers.py:
short rows (every backend, Triton under the interpreter with forced small tiles so the band-tile skip runs) and long
rows (the extension's flash kernel over key groups, 1024+ keys).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv

from vstar_kernels import gaussian_delta, tar_attention, tar_attention_reference
from vstar_kernels.backends import triton_tar
from vstar_kernels.contract import make_params

BACKENDS = ("triton", "extension", "torch")
MODES = ("relative", "absolute")


def independent_frames(length: int, tokens_per_frame: int, video_start: int, video_tokens: int | None,
                       offset: int) -> list[int | None]:
    """Frame of each token, written out: None outside the video span."""
    stop = length if video_tokens is None else min(length, video_start + video_tokens)
    return [offset + (t - video_start) // tokens_per_frame if video_start <= t < stop else None
            for t in range(length)]


def independent_tar(q, k, v, *, sigma, strength, mode, tokens_per_frame, video_start=0, video_tokens=None,
                    q_offset=0, k_offset=0):
    """Materialised TAR with a frame-distance band, in float64, from the paper's formula."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (batch, heads, tokens, dim)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    fq = independent_frames(q.shape[2], tokens_per_frame, video_start, video_tokens, q_offset)
    fk = independent_frames(k.shape[2], tokens_per_frame, video_start, video_tokens, k_offset)
    band = torch.tensor([[0.0 if a is None or b is None else math.exp(-((a - b) ** 2) / (2 * sigma**2)) for b in fk]
                         for a in fq], dtype=torch.float64)
    scale = strength * scores.amax(-1, keepdim=True) if mode == "relative" else strength
    probs = torch.softmax(scores + scale * band, dim=-1)
    return (probs @ v).transpose(1, 2)


# (tokens, tokens_per_frame, video_start, video_tokens): CogVideoX-like text first, HunyuanVideo-like text last,
# both, a partial last frame, one frame, a frame wider than the sequence, an empty video span
LAYOUT_CASES = [
    (37, 5, 6, None),
    (30, 4, 0, 20),
    (41, 6, 3, 30),
    (29, 7, 0, None),
    (24, 24, 0, None),
    (20, 100, 2, None),
    (18, 3, 18, None),
]


@pytest.mark.parametrize(("tokens", "per_frame", "start", "count"), LAYOUT_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_reference_is_the_frame_distance_formula(tokens, per_frame, start, count, mode):
    q, k, v = make_qkv(2, tokens, 3, 16, dtype=torch.float64, magnitude=2.0, seed=tokens)
    kw = dict(sigma=1.3, strength=1.5, mode=mode, tokens_per_frame=per_frame, video_start=start, video_tokens=count)
    expected = independent_tar(q, k, v, q_offset=2, k_offset=1, **kw)
    torch.testing.assert_close(tar_attention_reference(q, k, v, q_offset=2, k_offset=1, **kw), expected,
                               rtol=1e-12, atol=1e-12)


def test_band_of_a_layout():
    band = gaussian_delta(12, sigma=1.0, tokens_per_frame=3, video_start=2, video_tokens=8, dtype=torch.float64)
    frames = independent_frames(12, 3, 2, 8, 0)
    for i, fi in enumerate(frames):
        for j, fj in enumerate(frames):
            expected = 0.0 if fi is None or fj is None else math.exp(-0.5 * (fi - fj) ** 2)
            assert band[i, j].item() == pytest.approx(expected, abs=1e-15), (i, j)
    assert band[:2].abs().sum() == 0 and band[:, 10:].abs().sum() == 0  # text rows and columns: no bias


def test_temporal_layout_is_the_default():
    q, k, v = make_qkv(1, 9, 2, 8, dtype=torch.float64)
    kw = dict(sigma=2.0, mode="relative")
    torch.testing.assert_close(tar_attention_reference(q, k, v, tokens_per_frame=1, video_start=0, **kw),
                               tar_attention_reference(q, k, v, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("tokens", "per_frame", "start", "count"), LAYOUT_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_backends_short_rows(backend, tokens, per_frame, start, count, mode):
    q, k, v = make_qkv(2, tokens, 3, 40, layout="fused_qkv", magnitude=1.5, seed=tokens + per_frame)
    kw = dict(sigma=1.3, strength=2.0, mode=mode, tokens_per_frame=per_frame, video_start=start, video_tokens=count,
              q_offset=3, k_offset=1)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_half_precision_and_strided(backend):
    q, k, v = make_qkv(1, 45, 2, 24, dtype=torch.float16, layout="heads_first", seed=5)
    kw = dict(sigma=0.8, strength=1.0, mode="relative", tokens_per_frame=8, video_start=5)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("sigma", "strength"), [(0.25, 6.0), (0.6, 4.0), (1.5, -2.0), (40.0, 1.0)])
def test_triton_band_tile_skip(mode, sigma, strength):
    """16 x 16 tiles over frames of 8 tokens (fp16: the kernels that skip): at small sigma most key tiles are beyond
    the band and skip the bias; a wrongly skipped tile next to the diagonal (strength 4-6) would move the output far
    beyond the tolerance."""
    q, k, v = make_qkv(1, 100, 2, 32, magnitude=1.5, seed=7, dtype=torch.float16)
    kw = dict(sigma=sigma, strength=strength, mode=mode, tokens_per_frame=8, video_start=4, video_tokens=88)
    params = make_params(32, **kw)
    config = triton_tar.BlockConfig(16, 16, 32, two_pass=mode == "relative", num_warps=4)
    assert triton_tar.skips_band(params, config, q.dtype)
    if sigma < 1.0:
        assert triton_tar.band_tiles_skipped(100, 8, sigma, 32, mode, video_start=4, video_tokens=88,
                                             config=config) > 0
    out = triton_tar.forward(q, k, v, params, config=config)
    assert_matches_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_triton_ring_chunks_skip_the_band_with_per_side_starts(mode):
    """Chunks of a framed sequence (context parallelism's Ring) on the kernels that skip band tiles (fp16, 16 x 16
    tiles, two-pass relative): query and key chunks that begin inside a frame (negative local starts, different per
    side), the given row max replacing the first pass, and the natural-log lse, against the float64 reference with
    the same chunk offsets. A key window placed with the query side's start would move the output far beyond the
    tolerance (sigma 0.4, strength 3)."""
    from vstar_kernels.reference import row_max_reference

    q, k, v = make_qkv(1, 100, 2, 32, magnitude=1.5, seed=7, dtype=torch.float16)
    kw = dict(sigma=0.4, strength=3.0, mode=mode, q_offset=1, k_offset=3, tokens_per_frame=8, video_start=4,
              video_tokens=88)
    config = triton_tar.BlockConfig(16, 16, 32, two_pass=mode == "relative", num_warps=4)
    for (q0, q1), (k0, k1) in (((37, 100), (13, 77)), ((0, 37), (45, 100))):
        params = make_params(32, q_token_offset=q0, k_token_offset=k0, **kw)
        assert triton_tar.skips_band(params, config, q.dtype)
        rows, keys, values = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
        row_max = None
        if mode == "relative":  # the row max over every key of the sequence, as a Ring gathers it
            row_max = triton_tar.row_max(rows, k, params)
            assert (row_max.double() - row_max_reference(rows.double(), k.double())).abs().max() < 1e-3
        out, lse = triton_tar.forward(rows, keys, values, params, config=config, row_max=row_max, return_lse=True)
        ref, ref_lse = tar_attention_reference(rows.double(), keys.double(), values.double(), q_token_offset=q0,
                                               k_token_offset=k0, return_lse=True,
                                               row_max=None if row_max is None else row_max.double(), **kw)
        assert lse.shape == rows.shape[:3] and lse.dtype == torch.float32
        assert (out.double() - ref).abs().max().item() <= 2 * 1e-3 * v.abs().max().item()
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-3 * max(1.0, ref_lse.abs().max().item())


def test_triton_row_max_over_several_key_tiles():
    """triton_tar.row_max over key tiles (fp32 head_dim 40: 32-key tiles, 300 keys), any strides, and a row max of
    any strides given to the forward."""
    from vstar_kernels.reference import row_max_reference

    q, k, v = make_qkv(2, 40, 3, 40, len_k=300, magnitude=2.0, seed=1, layout="permuted")
    params = make_params(40, sigma=1.0, strength=2.0, scale=0.3)
    assert not triton_tar.block_config(40, 300, 40, "relative", torch.float32).block_n >= 300
    found = triton_tar.row_max(q, k, params)
    assert found.shape == (2, 40, 3) and found.is_contiguous()
    assert torch.allclose(found.double(), row_max_reference(q.double(), k.double(), scale=0.3), atol=1e-5)
    given = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3)).transpose(1, 2)  # non-contiguous
    out = triton_tar.forward(q, k, v, params, row_max=given)
    assert_matches_reference(out, q, k, v, sigma=1.0, strength=2.0, scale=0.3, row_max=given.double())


def test_band_zero_bound_is_exact_in_float32():
    """The skip bound: exp2(-x) is exactly 0 in float32 from BAND_ZERO_EXPONENT on (so skipping changes nothing),
    and not yet zero a little below 150 (the bound is not looser than needed by much)."""
    bound = torch.tensor(triton_tar.BAND_ZERO_EXPONENT, dtype=torch.float32)
    assert torch.exp2(-bound).item() == 0.0
    assert torch.exp2(torch.tensor(-149.0)).item() > 0.0


# ------------------------------------------------------------------------------------------------ long rows
LONG_CASES = [
    # (tokens, per_frame, start, count, mode, strength, sigma)
    (1100, 100, 40, None, "relative", 1.0, 1.5),  # text first (CogVideoX)
    (1300, 256, 0, 1024, "relative", 1.0, 0.5),  # text last (HunyuanVideo)
    (1030, 103, 0, None, "absolute", 2.0, 2.0),
    (1500, 300, 7, 1200, "relative", -1.0, 3.0),
    (1029, 7, 0, None, "relative", 1.0, 0.02),  # 147 frames, diagonal-only band
    (1200, 1, 0, None, "relative", 0.0, 2.0),  # no bias: plain attention, one key group
]


@pytest.mark.parametrize(("tokens", "per_frame", "start", "count", "mode", "strength", "sigma"), LONG_CASES)
def test_extension_long_rows(tokens, per_frame, start, count, mode, strength, sigma):
    q, k, v = make_qkv(1, tokens, 2, 40, layout="projection", magnitude=2.0, seed=tokens)
    kw = dict(sigma=sigma, strength=strength, mode=mode, tokens_per_frame=per_frame, video_start=start,
              video_tokens=count)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extension_long_rows_half_precision_offsets(dtype):
    q, k, v = make_qkv(1, 1040, 1, 72, dtype=dtype, layout="fused_qkv", magnitude=3.0, seed=11)
    kw = dict(sigma=1.0, strength=1.0, mode="relative", tokens_per_frame=130, video_start=0, q_offset=4, k_offset=2)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


def test_extension_long_rows_large_logits():
    """Logits of several hundred: the per-group maxima differ by far more than exp's range, and merging the groups
    must not overflow or lose the dominant one."""
    q, k, v = make_qkv(1, 1024, 1, 16, magnitude=8.0, seed=3)
    kw = dict(sigma=2.0, strength=0.5, mode="relative", tokens_per_frame=128)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", ["extension", "torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients(backend, mode):
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = make_qkv(1, 33, 2, 16, dtype=dtype, seed=2)
    assert_grads_match_reference(backend, q, k, v, sigma=1.3, strength=0.8, mode=mode, tokens_per_frame=8,
                                 video_start=2, video_tokens=24)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(tokens_per_frame=0), ValueError, "tokens_per_frame"),
    (dict(tokens_per_frame=2.0), TypeError, "tokens_per_frame"),
    (dict(tokens_per_frame=True), TypeError, "tokens_per_frame"),
    (dict(video_start=-1), ValueError, "video_start"),
    (dict(video_tokens=-3), ValueError, "video_tokens"),
    (dict(video_start=11), ValueError, "inside both q and k"),
    (dict(video_start=4, video_tokens=7), ValueError, "inside both q and k"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_layout_is_refused(kwargs, error, match, backend):
    q, k, v = make_qkv(1, 10, 1, 8)
    with pytest.raises(error, match=match):
        tar_attention(q, k, v, sigma=1.0, backend=backend, **kwargs)


def test_extension_op_checks_the_layout_itself():
    from vstar_kernels.backends import extension

    assert extension.load() is None
    q, k, v = make_qkv(1, 10, 1, 8)
    op = torch.ops.vstar_kernels.tar_attention
    with pytest.raises(RuntimeError, match="tokens_per_frame"):
        op(q, k, v, 1.0, 1.0, "relative", 1.0, 0, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="inside both"):
        op(q, k, v, 1.0, 1.0, "relative", 1.0, 0, 0, 2, 6, 5)
    out = op(q, k, v, 1.0, 1.0, "relative", 8**-0.5, 0, 0, 2, 1, 6)
    assert_matches_reference(out, q, k, v, sigma=1.0, tokens_per_frame=2, video_start=1, video_tokens=6)


def test_extension_layout_under_torch_compile():
    q, k, v = make_qkv(1, 12, 2, 8)
    kw = dict(sigma=1.0, tokens_per_frame=4, video_start=2, video_tokens=8)

    @torch.compile(fullgraph=True, backend="eager")
    def run(q, k, v):
        return tar_attention(q, k, v, backend="extension", **kw)

    assert_matches_reference(run(q, k, v), q, k, v, **kw)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.5, 1.0, 2.0, 7.5, 1e3])
def test_band_reach_is_where_the_band_becomes_exactly_zero(sigma):
    """Frames farther apart than band_reach have an exactly zero band in the kernel's fp32 arithmetic (so the tiles
    it skips change nothing), and the reach is tight: at 96% of it (an exponent of 140) the band is not zero yet."""
    params = make_params(32, sigma=sigma)
    reach = triton_tar.band_reach(params)
    coeff = torch.tensor(params.gauss_log2_coeff, dtype=torch.float32)
    far = torch.arange(reach + 1, reach + 50, dtype=torch.float32)
    assert (torch.exp2(-(far * far) * coeff) == 0).all()
    near = math.floor(math.sqrt(140.0 / params.gauss_log2_coeff))
    if near >= 1:
        assert torch.exp2(-(torch.tensor(float(near)) ** 2) * coeff).item() > 0
        assert reach <= 1.05 * near + 2
