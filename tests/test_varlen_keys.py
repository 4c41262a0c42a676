"""Varlen keys (``tar_attention(..., k_lengths=)``): batch element b attends to its first ``k_lengths[b]`` keys, on
every backend, against the float64 reference (whose boolean key mask is the definition), forward and backward.

The keys past a length are padding (HunyuanVideo's padded text after its video): they get no weight, stay out of the
relative row max, and get exactly zero gradients, whatever values they hold.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv

from vstar_kernels import ops, tar_attention
from vstar_kernels.contract import make_params
from vstar_kernels.reference import tar_attention_reference

BACKENDS = ("extension", "torch", "triton")
# (tokens_per_frame, video_start, video_tokens, length, lengths): temporal attention; HunyuanVideo's [video, text]
CASES = {
    "temporal": (1, 0, None, 19, (19, 7, 1)),
    "text_last": (6, 0, 30, 41, (41, 34, 30)),
}


def _supported(backend: str, dtype: torch.dtype) -> None:
    reason = ops.why_not(backend, ops.InputSpec(torch.device("cpu"), dtype, 24, varlen=True), make_params(24, sigma=1))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _case(name: str) -> tuple[dict, int, torch.Tensor]:
    per_frame, start, tokens, length, lengths = CASES[name]
    return dict(tokens_per_frame=per_frame, video_start=start, video_tokens=tokens), length, torch.tensor(lengths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_forward_matches_the_masked_reference(backend, dtype, case, mode):
    _supported(backend, dtype)
    layout, length, lengths = _case(case)
    q, k, v = make_qkv(3, length, 2, 24, dtype=dtype, layout="projection", magnitude=2.0, seed=1)
    kw = dict(sigma=1.7, strength=2.5, mode=mode, q_offset=3, k_offset=1, k_lengths=lengths, **layout)
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_keys_have_no_influence_whatever_they_hold(backend, dtype):
    """Keys and values past each length set to huge numbers (whose logits would win the relative row max) leave the
    output bit-identical: the kernels never read them into the softmax."""
    _supported(backend, dtype)
    layout, length, lengths = _case("text_last")
    q, k, v = make_qkv(3, length, 2, 24, dtype=dtype, layout="heads_first", seed=2)
    kw = dict(sigma=1.2, strength=3.0, k_lengths=lengths, backend=backend, **layout)
    out = tar_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k2[b, n:] = 1e3 * q[b, :1].abs().amax()
        v2[b, n:] = 6e4 if dtype == torch.float16 else 1e30
    assert torch.equal(tar_attention(q, k2, v2, **kw), out)
    whole = tar_attention(q, k, v, backend=backend, sigma=1.2, strength=3.0, **layout)
    assert (whole.double() - out.double()).abs().max().item() > 1e-2  # the padding matters when not masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_the_masked_reference_and_padding_keys_get_zero(backend, case):
    dtype = torch.float16 if backend == "triton" else torch.float32  # triton's fused backward is fp16/bf16
    _supported(backend, dtype)
    layout, length, lengths = _case(case)
    q, k, v = make_qkv(3, length, 2, 24, dtype=dtype, layout="projection", seed=3)
    kw = dict(sigma=1.4, strength=1.5, mode="relative", k_lengths=lengths, **layout)
    assert_grads_match_reference(backend, q, k, v, seed=4, **kw)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    tar_attention(*leaves, backend=backend, **kw).float().square().sum().backward()
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(leaves[1].grad[b, n:], torch.zeros_like(leaves[1].grad[b, n:]))
        assert torch.equal(leaves[2].grad[b, n:], torch.zeros_like(leaves[2].grad[b, n:]))


def test_double_backward_and_lse_with_varlen_keys():
    """create_graph=True differentiates the masked reference (gradcheck in float64); the lse of a varlen call is the
    reference's over the kept keys."""
    layout, length, lengths = _case("text_last")
    q, k, v = (t.double().requires_grad_() for t in make_qkv(2, length, 1, 8, seed=5))
    lengths = lengths[:2]
    torch.autograd.gradgradcheck(lambda a, b, c: tar_attention(a, b, c, sigma=1.0, k_lengths=lengths,
                                                                backend="torch", **layout), (q, k, v))
    with torch.no_grad():
        for backend in BACKENDS:
            _supported(backend, torch.float32)
            qf, kf, vf = (t.float() for t in (q, k, v))
            _, lse = tar_attention(qf, kf, vf, sigma=1.0, k_lengths=lengths, return_lse=True, backend=backend,
                                   **layout)
            _, ref = tar_attention_reference(q, k, v, sigma=1.0, k_lengths=lengths, return_lse=True, **layout)
            assert (lse.double() - ref).abs().max().item() <= 1e-4, backend


@pytest.mark.parametrize("backend", ["extension", "torch"])
def test_compiled_fullgraph_equals_eager_without_recompiling_for_new_lengths(backend):
    """The lengths are data: a compiled call traces once and takes any lengths (no host sync, no recompile)."""
    _supported(backend, torch.float32)
    layout, length, lengths = _case("text_last")
    q, k, v = make_qkv(3, length, 2, 24, seed=6)

    def call(q, k, v, lengths):
        return tar_attention(q, k, v, sigma=1.3, k_lengths=lengths, backend=backend, **layout)

    compiled = torch.compile(call, fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lens in (lengths, torch.tensor([33, 41, 35])):
            torch.testing.assert_close(compiled(q, k, v, lens), call(q, k, v, lens), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="k_lengths"):
            compiled(q, k, v, torch.tensor([41, 0, 30]))


def test_k_lengths_are_validated_before_any_launch():
    q, k, v = make_qkv(2, 6, 2, 8)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        tar_attention(q, k, v, sigma=1.0, k_lengths=[6, 6])
    with pytest.raises(TypeError, match="integer"):
        tar_attention(q, k, v, sigma=1.0, k_lengths=torch.tensor([6.0, 6.0]))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        tar_attention(q, k, v, sigma=1.0, k_lengths=torch.tensor([6]))
    for bad in ([0, 6], [6, 7], [-1, 3]):
        with pytest.raises(ValueError, match=r"in \[1, Lk = 6\]"):
            tar_attention(q, k, v, sigma=1.0, k_lengths=torch.tensor(bad))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            tar_attention(q, k, v, sigma=1.0, k_lengths=torch.tensor([6, 6], device="cuda"))
    from vstar_kernels.backends import extension

    reason = extension.unsupported_reason(ops.InputSpec(torch.device("cuda"), torch.float16, 64, varlen=True),
                                          make_params(64, sigma=1.0))
    assert reason is not None and "k_lengths" in reason  # the CUDA fallback refuses it by name (triton runs it)
