"""The reference is the definition: check it against closed forms and an independent element-wise loop."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_qkv

from vstar_kernels import gaussian_delta, tar_attention_reference


@pytest.mark.parametrize("sigma", [0.5, 1.0, 8.0, 1e4])
@pytest.mark.parametrize(("lq", "lk", "q_offset", "k_offset"), [(7, None, 0, 0), (5, 9, 4, 0), (3, 4, -2, 100)])
def test_gaussian_delta_closed_form(sigma, lq, lk, q_offset, k_offset):
    g = gaussian_delta(lq, lk, sigma=sigma, q_offset=q_offset, k_offset=k_offset, dtype=torch.float64)
    assert g.shape == (lq, lk if lk is not None else lq)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            d = (q_offset + i) - (k_offset + j)
            assert g[i, j].item() == pytest.approx(math.exp(-d * d / (2 * sigma * sigma)), rel=1e-14, abs=0)


def test_gaussian_delta_diagonal_symmetry_and_dtype():
    g = gaussian_delta(9, sigma=2.0, dtype=torch.float16)
    assert g.dtype == torch.float16
    assert torch.all(torch.diagonal(g) == 1)
    assert torch.equal(g, g.T)
    assert g[0, 1] > g[0, 2] > g[0, 3]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_gaussian_delta_rejects_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_delta(4, sigma=bad)


def _elementwise_tar(q, k, v, sigma, strength, mode, q_offset=0, k_offset=0):
    """An independent, loop-by-loop statement of DESIGN.md §2 in plain Python floats."""
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    out = torch.zeros(batch, len_q, heads, dim, dtype=torch.float64)
    scale = dim**-0.5
    for b in range(batch):
        for h in range(heads):
            for i in range(len_q):
                s = [scale * float(q[b, i, h] @ k[b, j, h]) for j in range(len_k)]
                row_max = max(s)
                biased = []
                for j in range(len_k):
                    g = math.exp(-((q_offset + i) - (k_offset + j)) ** 2 / (2 * sigma**2))
                    biased.append(s[j] + strength * (row_max if mode == "relative" else 1.0) * g)
                top = max(biased)
                w = [math.exp(x - top) for x in biased]
                total = sum(w)
                for j in range(len_k):
                    out[b, i, h] += (w[j] / total) * v[b, j, h].double()
    return out


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("sigma", "strength"), [(1.0, 1.0), (0.5, 4.0), (3.0, -0.5)])
def test_reference_matches_elementwise_definition(mode, sigma, strength):
    q, k, v = make_qkv(2, 5, 2, 3, len_k=6, dtype=torch.float64, seed=3)
    ref = tar_attention_reference(q, k, v, sigma=sigma, strength=strength, mode=mode, q_offset=1, k_offset=0)
    expected = _elementwise_tar(q, k, v, sigma, strength, mode, q_offset=1, k_offset=0)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)


def test_reference_relative_and_absolute_differ_and_bias_pulls_towards_diagonal():
    q, k, v = make_qkv(1, 16, 1, 8, dtype=torch.float64, seed=5)
    plain = tar_attention_reference(q, k, v, sigma=1.0, strength=0.0)
    rel = tar_attention_reference(q, k, v, sigma=1.0, strength=1.0, mode="relative")
    ab = tar_attention_reference(q, k, v, sigma=1.0, strength=1.0, mode="absolute")
    assert not torch.allclose(rel, ab)
    # a strong absolute band makes each frame attend almost only to itself: out_i -> v_i
    strong = tar_attention_reference(q, k, v, sigma=0.5, strength=200.0, mode="absolute")
    torch.testing.assert_close(strong, v, rtol=0, atol=1e-6)
    assert (strong - v).abs().max() < (plain - v).abs().max()


def test_reference_strength_zero_is_softmax_attention():
    q, k, v = make_qkv(2, 7, 3, 16, len_k=9, dtype=torch.float64)
    ref = tar_attention_reference(q, k, v, sigma=1.0, strength=0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(ref, sdpa, rtol=1e-12, atol=1e-12)


def test_reference_upcast_controls_compute_precision():
    q, k, v = make_qkv(2, 16, 2, 40, dtype=torch.float16, seed=11)
    ref64 = tar_attention_reference(q.double(), k.double(), v.double(), sigma=1.0)
    up = tar_attention_reference(q, k, v, sigma=1.0, upcast=True)
    low = tar_attention_reference(q, k, v, sigma=1.0, upcast=False)
    assert up.dtype == low.dtype == torch.float16
    assert (up.double() - ref64).abs().max() <= (low.double() - ref64).abs().max()


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_reference_attn_mask_bool_and_additive(mode):
    q, k, v = make_qkv(1, 6, 2, 8, dtype=torch.float64)
    keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    keep |= torch.eye(6, dtype=torch.bool)
    additive = torch.zeros(6, 6, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    a = tar_attention_reference(q, k, v, sigma=1.0, mode=mode, attn_mask=keep)
    b = tar_attention_reference(q, k, v, sigma=1.0, mode=mode, attn_mask=additive)
    torch.testing.assert_close(a, b)
    # masked keys get no weight: dropping key 0 for query 0 changes row 0 exactly as a smaller key set would
    only_first = torch.ones(6, 6, dtype=torch.bool)
    only_first[0] = False
    only_first[0, 3:] = True
    masked = tar_attention_reference(q, k, v, sigma=1.0, mode=mode, attn_mask=only_first)
    sub = tar_attention_reference(q[:, :1], k[:, 3:], v[:, 3:], sigma=1.0, mode=mode, k_offset=3)
    torch.testing.assert_close(masked[:, :1], sub)
