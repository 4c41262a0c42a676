"""The GPU launchers' integer limits and 16-byte-vector decision (issue 15), checked before any launch."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_qkv

from vstar_kernels import tar_attention
from vstar_kernels.backends import InputSpec, extension, triton_tar
from vstar_kernels.backends.triton_tar import check_launch_limits, in_slice_offsets_fit, vector_width
from vstar_kernels.contract import make_params


def _out_like(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype)


@pytest.mark.parametrize("layout", ["contiguous", "projection", "fused_qkv"])
@pytest.mark.parametrize(("dtype", "width"), [(torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 4)])
def test_real_layouts_get_16_byte_vectors(layout: str, dtype: torch.dtype, width: int) -> None:
    q, k, v = make_qkv(2, 16, 8, 40, dtype=dtype, layout=layout)
    assert vector_width(40, q, k, v, _out_like(q)) == width


def test_rows_that_are_not_16_byte_aligned_get_scalars() -> None:
    q, k, v = make_qkv(2, 16, 8, 40, dtype=torch.float16, layout="projection")
    out = _out_like(q)
    odd_dim = make_qkv(2, 16, 8, 36, dtype=torch.float16, layout="projection")  # 72-byte rows
    assert vector_width(36, *odd_dim, _out_like(odd_dim[0])) == 1
    shifted = torch.empty(2, 16, 8 * 40 + 1, dtype=torch.float16)[..., 1:].unflatten(-1, (8, 40))  # 2-byte offset
    assert vector_width(40, shifted, k, v, out) == 1
    strided_channels = torch.empty(2, 16, 8, 80, dtype=torch.float16)[..., ::2]
    assert vector_width(40, q, strided_channels, v, out) == 1
    heads_first = torch.empty(2, 8, 16, 40, dtype=torch.float16).transpose(1, 2)  # still 80-byte rows: aligned
    assert vector_width(40, heads_first, k, v, out) == 8


def test_in_slice_offsets_are_int32() -> None:
    fits = torch.empty_strided((1, 2, 1, 1), (0, 2**31 - 1, 1, 1), device="meta")
    wraps = torch.empty_strided((1, 2, 1, 1), (0, 2**31, 1, 1), device="meta")
    assert in_slice_offsets_fit(fits)
    assert not in_slice_offsets_fit(wraps)


def test_launch_limits_raise_before_any_launch() -> None:
    params = make_params(64, sigma=1.0)
    check_launch_limits(2**30, 2**30, 1, 16, params)
    with pytest.raises(ValueError, match="int32"):
        check_launch_limits(2**30 + 1, 16, 1, 16, params)
    with pytest.raises(ValueError, match="int32"):
        check_launch_limits(16, 16, 1, 16, make_params(64, sigma=1.0, q_offset=2**30 + 1))
    with pytest.raises(ValueError, match="grid limit"):
        check_launch_limits(2**20, 2**20, 2**16, 16, params)  # 2^16 slices x 2^16 blocks = 2^32 programs


def test_offsets_beyond_int32_distances_fall_back_from_the_gpu_kernels() -> None:
    far = make_params(64, sigma=1.0, q_offset=2**30 + 1)
    assert "2**30" in triton_tar.unsupported_reason(InputSpec(torch.device("cuda"), torch.float16, 64), far)
    assert "2**30" in extension.unsupported_reason(InputSpec(torch.device("cuda"), torch.float16, 64), far)
    assert extension.unsupported_reason(InputSpec(torch.device("cpu"), torch.float16, 64), far) is None


@pytest.mark.skipif(not triton_tar.INTERPRETER, reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
def test_triton_refuses_far_offsets_and_auto_falls_back() -> None:
    q, k, v = make_qkv(2, 9, 2, 40, layout="fused_qkv")
    kw = dict(sigma=2.0**29, q_offset=2**31, k_offset=2**31 - 2**30 - 3)  # distance 2^30 + 3 + i - j
    with pytest.raises(RuntimeError, match="2\\*\\*30"):
        tar_attention(q, k, v, backend="triton", **kw)
    assert_matches_reference(tar_attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.skipif(not triton_tar.INTERPRETER, reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_triton_distance_at_the_int32_limit_is_exact(mode: str) -> None:
    """|q_offset - k_offset| = 2^30 with sigma = 2^29: G = exp(-2) on the diagonal, computed from exact integer
    distances."""
    q, k, v = make_qkv(2, 9, 2, 40, layout="projection")
    kw = dict(sigma=2.0**29, strength=3.0, mode=mode, q_offset=2**30, k_offset=0)
    assert_matches_reference(tar_attention(q, k, v, backend="triton", **kw), q, k, v, **kw)


@pytest.mark.skipif(not triton_tar.INTERPRETER, reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
def test_inputs_whose_slices_overflow_int32_are_made_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice spanning 2^31 elements needs tens of GiB, so the decision is forced: the launcher then runs on
    contiguous copies, with the same result."""
    q, k, v = make_qkv(2, 17, 3, 40, layout="fused_qkv")
    seen = []

    def fits_only_when_contiguous(t: torch.Tensor) -> bool:
        seen.append(t.is_contiguous())
        return t.is_contiguous()

    monkeypatch.setattr(triton_tar, "in_slice_offsets_fit", fits_only_when_contiguous)
    out = tar_attention(q, k, v, sigma=2.0, backend="triton")
    assert seen[:3] == [False, False, False] and all(seen[3:])
    assert_matches_reference(out, q, k, v, sigma=2.0)
