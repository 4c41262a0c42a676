"""Chunks of a sequence (context parallelism's Ring): token-granular offsets, a given row max, the log-sum-exp, and
the exact merge of key chunks, on every backend against the float64 reference.

A whole call over the sequence is the truth: splitting its queries and keys into chunks at arbitrary token
boundaries (inside frames, inside the text), biasing each pairing with the global row max and merging the
partials through their log-sum-exp must give it back.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import ATOL, make_qkv

from vstar_kernels import ops
from vstar_kernels.contract import make_params
from vstar_kernels.reference import row_max_reference, tar_attention_reference

BACKENDS = ("extension", "torch", "triton")
DTYPES = (torch.float32, torch.float16)
# (tokens_per_frame, video_start, video_tokens, length): temporal; Wan/LTX (video only); CogVideoX (text first);
# HunyuanVideo (text last)
LAYOUTS = {
    "temporal": (1, 0, None, 23),
    "video": (6, 0, None, 42),
    "text_first": (5, 4, None, 39),
    "text_last": (6, 0, 30, 37),
}
CUTS = {23: (0, 5, 6, 17, 23), 42: (0, 7, 13, 24, 42), 39: (0, 3, 11, 22, 39), 37: (0, 9, 16, 29, 37)}


def _layout_kwargs(name: str) -> tuple[dict, int]:
    tpf, start, tokens, length = LAYOUTS[name]
    return dict(tokens_per_frame=tpf, video_start=start, video_tokens=tokens), length


def _supported(backend: str, dtype: torch.dtype) -> None:
    params = make_params(16, sigma=1.0)
    reason = ops.why_not(backend, ops.InputSpec(torch.device("cpu"), dtype, 16), params)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _tolerance(dtype: torch.dtype, v: torch.Tensor) -> float:
    # chunks add the merge's rounding to the kernel's: twice the per-dtype bound of a whole call
    return 2 * ATOL[dtype] * max(1.0, v.abs().max().item()) * (4 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_chunks_merged_through_their_lse_are_the_whole_call(backend, dtype, layout, mode):
    _supported(backend, dtype)
    layout_kw, length = _layout_kwargs(layout)
    q, k, v = make_qkv(2, length, 3, 24, dtype=dtype, layout="projection", seed=3)
    kw = dict(sigma=1.3, strength=1.7, mode=mode, q_offset=2, k_offset=1, **layout_kw)
    truth = tar_attention_reference(q.double(), k.double(), v.double(), **kw)
    cuts = CUTS[length]
    spans = list(itertools.pairwise(cuts))
    for q0, q1 in spans:
        rows = q[:, q0:q1]
        row_max = None
        if mode == "relative":
            row_max = torch.stack([ops.tar_row_max(rows, k[:, k0:k1], backend=backend) for k0, k1 in spans]).amax(0)
        outs, lses = [], []
        for k0, k1 in spans:
            out, lse = ops.tar_attention(rows, k[:, k0:k1], v[:, k0:k1], q_token_offset=q0, k_token_offset=k0,
                                         row_max=row_max, return_lse=True, backend=backend, **kw)
            assert out.shape == rows.shape and out.dtype == dtype
            assert lse.shape == rows.shape[:3] and lse.dtype == torch.float32
            _, ref_lse = tar_attention_reference(rows.double(), k[:, k0:k1].double(), v[:, k0:k1].double(),
                                                 q_token_offset=q0, k_token_offset=k0, return_lse=True,
                                                 row_max=None if row_max is None else row_max.double(), **kw)
            assert (lse.double() - ref_lse).abs().max().item() <= 1e-4 * max(1.0, ref_lse.abs().max().item()) * (
                20 if dtype == torch.float16 else 1)
            outs.append(out)
            lses.append(lse)
        merged, _ = ops.merge_partials(outs, lses)
        err = (merged.double() - truth[:, q0:q1]).abs().max().item()
        assert err <= _tolerance(dtype, v), (q0, q1, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_query_chunk_against_every_key_is_the_whole_calls_rows(backend, layout):
    """Token offsets alone (keys whole, queries a chunk): the Ulysses-free half of Ring, and the gradients."""
    _supported(backend, torch.float32)
    layout_kw, length = _layout_kwargs(layout)
    q, k, v = make_qkv(1, length, 2, 16, seed=5)
    kw = dict(sigma=0.9, strength=2.5, mode="relative", **layout_kw)
    q0, q1 = CUTS[length][1], CUTS[length][3]
    rows = q[:, q0:q1].clone().requires_grad_()
    keys, values = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = ops.tar_attention(rows, keys, values, q_token_offset=q0, k_token_offset=0, backend=backend, **kw)
    ref_rows = rows.detach().double().requires_grad_()
    ref_k, ref_v = k.double().requires_grad_(), v.double().requires_grad_()
    ref = tar_attention_reference(ref_rows, ref_k, ref_v, q_token_offset=q0, k_token_offset=0, **kw)
    whole = tar_attention_reference(q.double(), k.double(), v.double(), **kw)[:, q0:q1]
    assert torch.allclose(ref, whole, atol=1e-12)  # the reference's chunk is the whole call's rows
    assert (out.double() - ref).abs().max().item() <= ATOL[torch.float32] * 2
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for ours, theirs in ((rows, ref_rows), (keys, ref_k), (values, ref_v)):
        assert (ours.grad.double() - theirs.grad).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_max_is_the_unbiased_logits_max(backend):
    _supported(backend, torch.float32)
    q, k, _ = make_qkv(2, 13, 3, 40, len_k=29, layout="heads_first", magnitude=3.0, seed=7)
    out = ops.tar_row_max(q, k, scale=0.3, backend=backend)
    assert out.shape == (2, 13, 3) and out.dtype == torch.float32
    assert torch.allclose(out.double(), row_max_reference(q.double(), k.double(), scale=0.3), atol=1e-4)


def test_row_max_passes_gradients_like_amax():
    q, k, _ = make_qkv(1, 5, 2, 8, len_k=7, dtype=torch.float64, seed=1)
    q.requires_grad_()
    k.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ops.tar_row_max(a, b, backend="torch"), (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_given_row_max_replaces_the_calls_own(backend):
    """Relative mode with row_max = m biases as c_i = strength * m_i: the reference with that row max."""
    _supported(backend, torch.float32)
    q, k, v = make_qkv(1, 11, 2, 16, seed=2)
    row_max = torch.linspace(-3.0, 4.0, 22).reshape(1, 11, 2)
    out = ops.tar_attention(q, k, v, sigma=1.0, strength=1.5, row_max=row_max, backend=backend)
    ref = tar_attention_reference(q.double(), k.double(), v.double(), sigma=1.0, strength=1.5,
                                  row_max=row_max.double())
    own = tar_attention_reference(q.double(), k.double(), v.double(), sigma=1.0, strength=1.5)
    assert (out.double() - ref).abs().max().item() <= 2 * ATOL[torch.float32]
    assert (ref - own).abs().max().item() > 1e-2  # the given row max changed the result


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_a_whole_call(backend):
    _supported(backend, torch.float32)
    q, k, v = make_qkv(2, 9, 2, 20, len_k=14, layout="permuted", seed=4)
    for mode in ("relative", "absolute"):
        out, lse = ops.tar_attention(q, k, v, sigma=2.0, strength=3.0, mode=mode, return_lse=True, backend=backend)
        ref, ref_lse = tar_attention_reference(q.double(), k.double(), v.double(), sigma=2.0, strength=3.0,
                                               mode=mode, return_lse=True)
        assert (out.double() - ref).abs().max().item() <= 2 * ATOL[torch.float32]
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-4 * max(1.0, ref_lse.abs().max().item())


def test_token_offsets_fold_into_the_kernels_layout():
    """contract.kernel_layout_args: a chunk that begins inside a frame has a negative start, its whole frames before
    fold into the frame offset; every local frame equals the global one."""
    layout = dict(tokens_per_frame=5, video_start=3, video_tokens=37)
    # frames of 5 tokens, and frames of 100 (longer than the call: the kernels' frame length is clipped to it)
    for per_frame, video_tokens in ((5, 37), (100, 370)):
        layout = dict(tokens_per_frame=per_frame, video_start=3, video_tokens=video_tokens)
        for q0, k0 in ((19, 2), (0, 0), (41, 7), (3, 38), (1, 45), (150, 95), (97, 0)):
            p = make_params(8, sigma=1.0, q_offset=2, k_offset=-1, q_token_offset=q0, k_token_offset=k0, **layout)
            tpf, start_q, start_k, end_q, end_k = p.kernel_layout_args(12, 9)
            assert -tpf < start_q and -tpf < start_k and tpf <= 12
            for t in range(12):
                for j in range(9):
                    framed = (start_q <= t < end_q) and (start_k <= j < end_k)
                    g_t, g_j = t + q0, j + k0
                    truth = 3 <= g_t < 3 + video_tokens and 3 <= g_j < 3 + video_tokens
                    assert framed == truth, (q0, k0, t, j)
                    if framed:
                        local = p.offset_delta + (t - start_q) // tpf - (j - start_k) // tpf
                        assert local == (2 + (g_t - 3) // per_frame) - (-1 + (g_j - 3) // per_frame)


def test_chunk_arguments_are_validated_before_any_launch():
    q, k, v = make_qkv(1, 6, 2, 8)
    with pytest.raises(ValueError, match="q_token_offset"):
        ops.tar_attention(q, k, v, sigma=1.0, q_token_offset=-1)
    with pytest.raises(ValueError, match="row_max must have shape"):
        ops.tar_attention(q, k, v, sigma=1.0, row_max=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="relative"):
        ops.tar_attention(q, k, v, sigma=1.0, mode="absolute", row_max=torch.zeros(1, 6, 2))
    with pytest.raises(TypeError, match="floating"):
        ops.tar_attention(q, k, v, sigma=1.0, row_max=torch.zeros(1, 6, 2, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="forward-only"):
        ops.tar_attention(q.requires_grad_(), k, v, sigma=1.0, return_lse=True)
    with pytest.raises(ValueError, match="one lse per output"):
        ops.merge_partials([q], [])
    # a chunk may hold only part of the video span; a whole call may not
    with pytest.raises(ValueError, match="beyond the sequence"):
        ops.tar_attention(q.detach(), k, v, sigma=1.0, video_tokens=10)
    ops.tar_attention(q.detach(), k, v, sigma=1.0, video_tokens=10, q_token_offset=0, k_token_offset=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_max_holding_nan_is_refused_and_infinities_are_kept(backend):
    """NaN in row_max is no row maximum: refused on every backend before any launch (Triton's clamp once turned it
    into the saturated coefficient, the others returned NaN). ±inf stays valid: the saturated bias."""
    _supported(backend, torch.float32)
    q, k, v = make_qkv(1, 7, 2, 16, seed=8)
    row_max = torch.linspace(-2.0, 3.0, 14).reshape(1, 7, 2)
    row_max[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="row_max holds NaN"):
        ops.tar_attention(q, k, v, sigma=1.0, row_max=row_max, backend=backend)
    row_max[0, 3, 1], row_max[0, 5, 0] = float("inf"), float("-inf")
    out = ops.tar_attention(q, k, v, sigma=1.0, row_max=row_max, backend=backend)
    ref = tar_attention_reference(q.double(), k.double(), v.double(), sigma=1.0, row_max=row_max.double())
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() <= 2 * ATOL[torch.float32]


def test_a_row_max_holding_nan_is_refused_in_a_compiled_call():
    q, k, v = make_qkv(1, 5, 2, 8, seed=9)

    def call(q, k, v, row_max):
        return ops.tar_attention(q, k, v, sigma=1.0, row_max=row_max, backend="torch")

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    row_max = torch.zeros(1, 5, 2)
    torch.testing.assert_close(compiled(q, k, v, row_max), call(q, k, v, row_max))
    row_max[0, 1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="row_max holds NaN"):
        compiled(q, k, v, row_max)


@pytest.mark.parametrize("value", ["False", 0, 1, None, torch.tensor(True)])
def test_return_lse_takes_only_a_bool(value):
    q, k, v = make_qkv(1, 5, 2, 8)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        ops.tar_attention(q, k, v, sigma=1.0, return_lse=value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_lse_is_float32_and_float64_for_float64_inputs(backend, dtype):
    """The contract: lse float32, float64 for float64 inputs (the backends that take float64: torch), also for an
    empty batch."""
    _supported(backend, dtype)
    for batch in (2, 0):
        q, k, v = make_qkv(batch, 6, 2, 16, dtype=dtype, seed=3) if batch else (
            torch.empty(0, 6, 2, 16, dtype=dtype),) * 3
        _, lse = ops.tar_attention(q, k, v, sigma=1.0, return_lse=True, backend=backend)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert lse.shape == (batch, 6, 2)
        assert ops.tar_row_max(q, k, backend=backend).dtype == lse.dtype
