"""Frame-distance profiles in the Triton kernels (forward and backward): forced small tiles and two-pass configs
with windows against the float64 reference, the host-side mirror of the kernels' tile window against the pairs a
profile keeps, and proof that skipped tiles are really skipped (NaN keys, values and queries in them would poison
any tile that read them). tests/test_profiles.py runs the shared cases on every backend; these are the Triton
kernels' own (tile skipping, rows with no kept key, the plain-TAR flags)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_matches_reference, make_qkv

from vstar_kernels import FrameProfile, tar_attention, tar_attention_reference
from vstar_kernels.backends import triton_tar, triton_tar_backward
from vstar_kernels.backends.triton_common import profile_args, profile_flags
from vstar_kernels.backends.triton_tar import BlockConfig, profile_window
from vstar_kernels.backends.triton_tar_backward import BackwardConfig
from vstar_kernels.contract import make_params
from vstar_kernels.reference import bias_rows

pytestmark = pytest.mark.skipif(not triton_tar.INTERPRETER,
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")

HEADS = 2
TILES = BlockConfig(16, 16, 32, two_pass=True, num_warps=4)  # several key tiles, two-pass relative mode
BWD_TILES = BackwardConfig(16, 16, 32, num_warps=4)


def _composed(mode: str, radius: int = 2, sinks: int = 1) -> FrameProfile:
    bias = torch.randn(HEADS, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bias[1, 3] = -math.inf  # head 1 masks distance 3
    return (FrameProfile.table(bias=bias, positive_scale=torch.tensor([1.0, 1.3, 0.8]))
            + FrameProfile.window(radius, sink_frames=sinks) + FrameProfile.gaussian(1.5, 2.0, mode))


LAYOUTS = {
    "temporal": {},
    "text-first": dict(tokens_per_frame=3, video_start=5),
    "text-last": dict(tokens_per_frame=2, video_tokens=40),
}


def _kept(params, len_q: int, len_k: int) -> torch.Tensor:
    """(heads, Lq, Lk) bool: the pairs the profile keeps (the reference's definition)."""
    keep = bias_rows(params, range(len_q), len_k, dtype=torch.float64, device="cpu").keep
    return keep.expand(HEADS, len_q, len_k)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_small_tiles_match_the_reference(layout: str, mode: str) -> None:
    """Several query blocks and key tiles (two-pass in relative mode), a window with a sink, masked and scaled
    distances: the forward, and its partial results (the lse, a given row max), against the reference."""
    kw = dict(profile=_composed(mode), k_offset=1, **LAYOUTS[layout])
    q, k, v = make_qkv(2, 50, HEADS, 20, len_k=46, layout="heads_first", seed=3, magnitude=1.5)
    params = make_params(20, **kw)
    assert_matches_reference(triton_tar.forward(q, k, v, params, config=TILES), q, k, v, **kw)
    ref_out, ref_lse = tar_attention_reference(q.double(), k.double(), v.double(), return_lse=True, **kw)
    row_max = torch.randn(2, 50, HEADS) if mode == "relative" else None
    out, lse = triton_tar.forward(q, k, v, params, config=TILES, return_lse=True, row_max=row_max)
    if row_max is None:
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    ref_out, ref_lse = tar_attention_reference(q.double(), k.double(), v.double(), return_lse=True,
                                               row_max=None if row_max is None else row_max.double(), **kw)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_varlen_keys_with_a_window(mode: str) -> None:
    kw = dict(profile=_composed(mode, radius=1, sinks=2), **LAYOUTS["text-first"])
    q, k, v = make_qkv(2, 40, HEADS, 16, seed=5)
    lengths = torch.tensor([40, 23])
    params = make_params(16, **kw)
    out = triton_tar.forward(q, k, v, params, config=TILES, k_lengths=lengths)
    mask = (torch.arange(40) < lengths[:, None])[:, None, None, :]
    ref = tar_attention_reference(q.double(), k.double(), v.double(), attn_mask=mask, **kw)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["temporal", "text-first"])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_fused_backward_matches_the_reference(layout: str, mode: str) -> None:
    """The three backward kernels (fp32 through the fused kernels directly, small tiles: their windows of key tiles
    and of query blocks) against the float64 reference's gradients."""
    kw = dict(profile=_composed(mode), q_offset=1, **LAYOUTS[layout])
    q, k, v = make_qkv(1, 45, HEADS, 12, len_k=41, layout="heads_first", seed=6)
    grad_out = torch.randn(1, 45, HEADS, 12, generator=torch.Generator().manual_seed(2))
    params = make_params(12, **kw)
    grads = triton_tar_backward.backward(q, k, v, grad_out, params, config=BWD_TILES)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(tar_attention_reference(*leaves, **kw), leaves, grad_out.double())
    for name, got, want in zip("qkv", grads, ref, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)


def test_fp16_training_through_the_op() -> None:
    """fp16 gradients through tar_attention (the training forward's residuals, then the fused backward)."""
    from helpers import assert_grads_match_reference

    q, k, v = make_qkv(1, 45, HEADS, 16, dtype=torch.float16, seed=8)
    assert_grads_match_reference("triton", q, k, v, profile=_composed("relative"), **LAYOUTS["text-last"])


def test_rows_with_no_kept_key_give_zeros_minus_inf_and_no_gradient() -> None:
    profile = FrameProfile.window(2) + FrameProfile.gaussian(1.0)
    q, k, v = make_qkv(1, 20, HEADS, 8, len_k=18)
    out, lse = tar_attention(q, k, v, profile=profile, k_offset=30, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    params = make_params(8, profile=profile, k_offset=30)
    grads = triton_tar_backward.backward(q, k, v, torch.ones_like(q), params, config=BWD_TILES)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ------------------------------------------------------------------------------------------- the tile window
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("radius", "sinks", "offsets"), [(1, 0, {}), (2, 1, {"k_offset": 3}),
                                                          (0, 2, {"q_token_offset": 7, "k_token_offset": 20})])
def test_the_window_holds_every_kept_pair_and_skips_tiles(layout: str, radius: int, sinks: int, offsets) -> None:
    """The host mirror of the kernels' window: every kept (row, key) pair lies in a visited tile of both loops
    (forward and dQ: key tiles per query block; dK/dV: query blocks per key tile), and tiles are skipped."""
    kw = dict(LAYOUTS[layout], **offsets)
    params = make_params(8, profile=FrameProfile.window(radius, sink_frames=sinks), **kw)
    len_q = len_k = 70
    key_tiles, query_blocks = profile_window(params, len_q, len_k, 16, 8)
    keep = _kept(params, len_q, len_k)[0]
    for i, j in keep.nonzero().tolist():
        assert j // 8 * 8 in key_tiles[i // 16], (i, j)
        assert i // 16 * 16 in query_blocks[j // 8], (i, j)
    visited = sum(map(len, key_tiles))
    assert visited < len(key_tiles) * -(-len_k // 8)  # something is skipped
    share = 1 - visited / (len(key_tiles) * -(-len_k // 8))
    assert triton_tar.profile_tiles_skipped(params, len_q, len_k, BlockConfig(16, 8, 32, True, 4)) == share


def test_plain_tar_sets_no_profile_flag() -> None:
    """Plain TAR (and a profile that is only a band) launches the kernels of before profiles: every flag off."""
    for params in (make_params(8, sigma=2.0), make_params(8, profile=FrameProfile.gaussian(2.0))):
        assert profile_flags(params) == {"HAS_BIAS": False, "HAS_SCALE": False, "MASKS": False}
    flags = profile_flags(make_params(8, profile=_composed("relative")))
    assert flags == {"HAS_BIAS": True, "HAS_SCALE": True, "MASKS": True}
    far = make_params(8, profile=FrameProfile.window(2**40))
    assert profile_args(far, torch.device("cpu"))[5] == 2**31 - 1  # a radius beyond every int32 distance


@pytest.mark.parametrize("layout", ["temporal", "text-first"])
def test_skipped_tiles_are_never_read(layout: str) -> None:
    """NaN keys and values in every key tile the window skips for a query block: the forward and dQ of that block
    stay finite and exact (a read would turn its rows into NaN: 0 * NaN in P·V). Likewise NaN queries and output
    gradients in the query blocks a key tile's dK/dV loop skips leave that tile's dK, dV exact."""
    profile = _composed("relative", radius=1, sinks=0)
    kw = dict(profile=profile, **LAYOUTS[layout])
    len_q = len_k = 64
    params = make_params(16, **kw)
    key_tiles, query_blocks = profile_window(params, len_q, len_k, 16, 16)
    q, k, v = make_qkv(1, len_q, HEADS, 16, seed=9)
    grad_out = torch.randn(1, len_q, HEADS, 16, generator=torch.Generator().manual_seed(4))
    keep = _kept(params, len_q, len_k)
    for block, tiles in enumerate(key_tiles):
        rows = slice(16 * block, 16 * block + 16)
        skipped = [j for j in range(len_k) if j // 16 * 16 not in tiles]
        if not skipped:
            continue
        assert not keep[:, rows, skipped].any()
        k2, v2 = k.clone(), v.clone()
        k2[:, skipped], v2[:, skipped] = math.nan, math.nan
        out = triton_tar.forward(q, k2, v2, params, config=TILES)
        ref = tar_attention_reference(q.double(), k.double(), v.double(), **kw)
        torch.testing.assert_close(out[:, rows].double(), ref[:, rows], atol=1e-5, rtol=1e-5)
        # the residuals of the same small tiles (a single 64-key tile would read the NaN keys: 0 * NaN in P·V)
        residuals = triton_tar.training_forward(q, k2, v2, params, config=TILES)[1]
        dq = triton_tar_backward.backward(q, k2, v2, grad_out, params, config=BWD_TILES, residuals=residuals)[0]
        assert torch.isfinite(dq[:, rows]).all()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, dk_ref, dv_ref = torch.autograd.grad(tar_attention_reference(*leaves, **kw), leaves, grad_out.double())
    checked = 0
    for tile, blocks in enumerate(query_blocks):
        cols = slice(16 * tile, 16 * tile + 16)
        skipped = [i for i in range(len_q) if i // 16 * 16 not in blocks]
        if not skipped:
            continue
        q2, g2 = q.clone(), grad_out.clone()
        q2[:, skipped], g2[:, skipped] = math.nan, math.nan
        # the residuals of the rows this tile's loop reads are those of clean rows (the NaN rows are never read)
        residuals = triton_tar.training_forward(q, k, v, params, config=TILES)[1]
        _, dk, dv = triton_tar_backward.backward(q2, k, v, g2, params, config=BWD_TILES, residuals=residuals)
        torch.testing.assert_close(dk[:, cols].double(), dk_ref[:, cols], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dv[:, cols].double(), dv_ref[:, cols], atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked
