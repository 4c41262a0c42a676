"""Frame-distance profiles (``FrameProfile``, ``tar_attention(profile=...)``): the constructors' checks and
composition rules, the reference against an independent per-pair computation of the formula, every backend against
the float64 reference (tables per head, windows with sinks, decays, compositions, both modes, text tokens, chunks
split inside frames), gradients of first and second order, and the masks' exactness (a masked key has no influence
at all)."""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv

from vstar_kernels import FrameProfile, merge_partials, tar_attention, tar_attention_reference, tar_row_max
from vstar_kernels.contract import make_params
from vstar_kernels.ops import why_not

BACKENDS = ("triton", "extension", "torch")


def _table(heads: int, length: int, seed: int, *, masked: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(heads, length, generator=gen, dtype=torch.float64)
    if masked:
        table[:, -1] = -math.inf  # beyond D - 1 frames: masked
        table[0, 2] = -math.inf  # and head 0 skips distance 2
    return table


def _profiles(heads: int) -> dict[str, FrameProfile]:
    scale = 0.5 + torch.rand(heads, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return {
        "bias-per-head": FrameProfile.table(bias=_table(heads, 5, 1)),
        "bias-masked": FrameProfile.table(bias=_table(heads, 6, 2, masked=True)),
        "scale-per-head": FrameProfile.table(positive_scale=scale),
        "decay": FrameProfile.decay_beyond(2, 0.6),
        "window": FrameProfile.window(2),
        "window-sinks": FrameProfile.window(1, sink_frames=2),
        "composed": (FrameProfile.gaussian(1.5, 2.0) + FrameProfile.table(bias=_table(heads, 4, 4))
                     + FrameProfile.window(3, sink_frames=1) + FrameProfile.decay_beyond(1, 0.7)),
        "ultravico-like+tar": FrameProfile.decay_beyond(3, 0.9) + FrameProfile.gaussian(2.0),
    }


PROFILE_NAMES = tuple(_profiles(1))


def _with_mode(profile: FrameProfile, mode: str) -> FrameProfile:
    """``profile`` with a Gaussian band of ``mode`` (its own band's, re-made, or a new one)."""
    if profile.sigma is not None:
        band = FrameProfile.gaussian(profile.sigma, profile.strength, mode)
        rest = FrameProfile(bias=profile.bias, positive_scale=profile.positive_scale, radius=profile.radius,
                            sink_frames=profile.sink_frames)
        return rest + band
    return profile + FrameProfile.gaussian(2.5, -1.5 if mode == "absolute" else 1.0, mode)


# ------------------------------------------------------------------------------------------ the independent check
def naive_profile_attention(q, k, v, profile: FrameProfile, *, scale=None, q_offset=0, k_offset=0,
                            tokens_per_frame=1, video_start=0, video_tokens=None):
    """The contract's formula pair by pair in float64 with Python loops (no code shared with the library):
    S'_ij = (S>0 ? scale(d) S : S) + bias(d) + c_i G(d) over kept framed pairs, S unchanged for text pairs."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    scale = dim**-0.5 if scale is None else scale

    def frame(t: int, length: int, offset: int) -> int | None:
        end = length if video_tokens is None else video_start + video_tokens
        return offset + (t - video_start) // tokens_per_frame if video_start <= t < end else None

    def at(table, h, d):
        if table is None:
            return None
        row = table[h if table.shape[0] > 1 else 0]
        return float(row[min(d, row.shape[0] - 1)])

    out = torch.zeros(batch, len_q, heads, v.shape[3], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = (q[b, :, h] @ k[b, :, h].T) * scale
            for i in range(len_q):
                fi = frame(i, len_q, q_offset)
                logits, kept = [], []
                for j in range(len_k):
                    fj = frame(j, len_k, k_offset)
                    keep = True
                    if fi is not None and fj is not None:
                        d = abs(fi - fj)
                        if profile.radius is not None and d > profile.radius and fj >= profile.sink_frames:
                            keep = False
                        bias = at(profile.bias, h, d)
                        if bias is not None and bias == -math.inf:
                            keep = False
                    kept.append(keep)
                peak = max((float(s[i, j]) for j in range(len_k) if kept[j]), default=-math.inf)
                for j in range(len_k):
                    fj = frame(j, len_k, k_offset)
                    x = float(s[i, j])
                    if not kept[j]:
                        logits.append(-math.inf)
                        continue
                    if fi is not None and fj is not None:
                        d = abs(fi - fj)
                        sc = at(profile.positive_scale, h, d)
                        if sc is not None and x > 0:
                            x *= sc
                        bias = at(profile.bias, h, d)
                        if bias is not None:
                            x += bias
                        if profile.sigma is not None:
                            c = profile.strength * (peak if profile.mode == "relative" else 1.0)
                            x += c * math.exp(-d * d / (2 * profile.sigma**2))
                    logits.append(x)
                row = torch.tensor(logits, dtype=torch.float64)
                if torch.isneginf(row).all():
                    continue
                out[b, i, h] = torch.softmax(row, 0) @ v[b, :, h]
    return out


@pytest.mark.parametrize("name", PROFILE_NAMES)
@pytest.mark.parametrize("layout", ["temporal", "text-first", "text-last"])
def test_reference_equals_the_formula_pair_by_pair(name, layout):
    """The library's reference (vectorised) against the per-pair loop: odd frame counts, 2 tokens per frame,
    text tokens before (CogVideoX) or after (HunyuanVideo) the video, offset frames."""
    heads = 2
    profile = _profiles(heads)[name]
    kw = {"temporal": {"q_offset": 3, "k_offset": 1},
          "text-first": {"tokens_per_frame": 2, "video_start": 3},
          "text-last": {"tokens_per_frame": 3, "video_tokens": 15}}[layout]
    q, k, v = make_qkv(1, 19, heads, 6, dtype=torch.float64, seed=5, magnitude=2.0)
    ref = tar_attention_reference(q, k, v, profile=profile, **kw)
    naive = naive_profile_attention(q, k, v, profile, **kw)
    torch.testing.assert_close(ref, naive, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the backends
def _skip_unless(backend: str, q: torch.Tensor, params) -> None:
    reason = why_not(backend, q, params)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("name", PROFILE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_backends_match_the_reference(backend, mode, name, dtype):
    """Random per-head tables, windows with sinks, decays and compositions, both modes: odd frame counts, strided
    inputs, a frame offset."""
    heads = 3
    profile = _with_mode(_profiles(heads)[name], mode)
    q, k, v = make_qkv(2, 23, heads, 20, len_k=21, dtype=dtype, layout="heads_first", seed=7, magnitude=1.5)
    kw = dict(profile=profile, q_offset=2)
    _skip_unless(backend, q, make_params(20, **kw))
    assert_matches_reference(tar_attention(q, k, v, backend=backend, **kw), q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["text-first", "text-last"])
@pytest.mark.parametrize("name", ["composed", "window-sinks", "bias-masked"])
def test_backends_match_the_reference_with_text_tokens(backend, layout, name):
    """A transformer's layout: patches per latent frame, text before or after the video (text pairs unbiased)."""
    heads = 2
    profile = _profiles(heads)[name]
    kw = {"text-first": dict(tokens_per_frame=4, video_start=5),
          "text-last": dict(tokens_per_frame=3, video_tokens=27)}[layout]
    q, k, v = make_qkv(1, 33, heads, 24, seed=11)
    _skip_unless(backend, q, make_params(24, profile=profile, **kw))
    assert_matches_reference(tar_attention(q, k, v, backend=backend, profile=profile, **kw), q, k, v,
                             profile=profile, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_a_gaussian_profile_is_tar(backend, mode):
    """FrameProfile.gaussian(sigma, strength, mode) gives exactly what sigma=, strength=, mode= give."""
    q, k, v = make_qkv(2, 17, 3, 16, dtype=torch.float32, seed=2)
    kw = dict(sigma=1.7, strength=2.5, mode=mode)
    _skip_unless(backend, q, make_params(16, **kw))
    expected = tar_attention(q, k, v, backend=backend, **kw)
    got = tar_attention(q, k, v, backend=backend, profile=FrameProfile.gaussian(1.7, 2.5, mode))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["composed", "window-sinks", "bias-masked", "scale-per-head"])
def test_chunks_split_inside_frames_merge_to_the_whole(backend, name):
    """Context parallelism's Ring in op terms: query and key chunks that begin inside a frame, the relative row max
    over every key chunk (tar_row_max with the profile: over the kept keys), partial results merged. Some query
    rows see no kept key in some key chunk (the window): zeros and lse -inf there, which the merge ignores."""
    heads = 2
    profile = _with_mode(_profiles(heads)[name], "relative")
    layout = dict(tokens_per_frame=3, video_start=2)
    q, k, v = make_qkv(1, 38, heads, 16, seed=4)
    _skip_unless(backend, q, make_params(16, profile=profile, **layout))
    whole = tar_attention_reference(q.double(), k.double(), v.double(), profile=profile, **layout)
    q_cuts, k_cuts = (0, 13, 38), (0, 8, 20, 38)
    for a, b in itertools.pairwise(q_cuts):
        chunk = dict(layout, q_token_offset=a)
        peaks = [tar_row_max(q[:, a:b], k[:, c:d], profile=profile, k_token_offset=c, **chunk)
                 for c, d in itertools.pairwise(k_cuts)]
        row_max = torch.stack(peaks).amax(dim=0)
        outs, lses = zip(*(tar_attention(q[:, a:b], k[:, c:d], v[:, c:d], backend=backend, profile=profile,
                                         k_token_offset=c, row_max=row_max, return_lse=True, **chunk)
                           for c, d in itertools.pairwise(k_cuts)), strict=True)
        out, _ = merge_partials(outs, lses)
        torch.testing.assert_close(out.double(), whole[:, a:b], atol=2e-5, rtol=2e-5)


def test_a_row_with_no_kept_key_gives_zeros_and_minus_inf_lse():
    """Keys 10+ frames from every query of a radius-2 window without sinks: nothing kept, out 0, lse -inf, no NaN;
    its gradients are zeros too."""
    q, k, v = make_qkv(1, 4, 2, 8, len_k=5, dtype=torch.float64)
    profile = FrameProfile.window(2) + FrameProfile.gaussian(1.0)
    out, lse = tar_attention(q, k, v, profile=profile, k_offset=10, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tar_attention(*leaves, profile=profile, k_offset=10).sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


# ------------------------------------------------------------------------------------------------- the masks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["window-sinks", "bias-masked", "composed"])
def test_masked_keys_have_no_influence(backend, name):
    """Perturbing every key and value a query row does not keep (huge values) leaves that row's output bit for bit
    unchanged, and the relative band's row max too (it runs over the kept keys only)."""
    heads = 2
    profile = _with_mode(_profiles(heads)[name], "relative")
    q, k, v = make_qkv(1, 15, heads, 8, seed=9)
    _skip_unless(backend, q, make_params(8, profile=profile))
    keep = _kept(profile, 15, heads)  # (heads, Lq, Lk)
    row = 12
    base = tar_attention(q, k, v, backend=backend, profile=profile)
    masked = ~keep[:, row]  # (heads, Lk)
    assert masked.any()
    k2, v2 = k.clone(), v.clone()
    for h in range(heads):
        k2[0, masked[h], h] = 1e4
        v2[0, masked[h], h] = -1e4
    out = tar_attention(q, k2, v2, backend=backend, profile=profile)
    assert torch.equal(out[0, row], base[0, row])


def _kept(profile: FrameProfile, frames: int, heads: int) -> torch.Tensor:
    """(heads, frames, frames) bool: which (query, key) frame pairs the profile keeps (temporal layout)."""
    d = (torch.arange(frames)[:, None] - torch.arange(frames)[None, :]).abs()
    keep = torch.ones(heads, frames, frames, dtype=torch.bool)
    if profile.radius is not None:
        keep &= (d <= profile.radius) | (torch.arange(frames) < profile.sink_frames)[None, :]
    if profile.bias is not None:
        table = profile.bias.expand(heads, -1)
        keep &= torch.isfinite(table[:, d.clamp(max=table.shape[1] - 1)])
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_keys_get_no_gradient_from_the_rows_that_mask_them(backend):
    """A key only row 0 would see past its window gets exactly zero gradient from a loss on row 0 alone."""
    profile = FrameProfile.window(2, sink_frames=1) + FrameProfile.gaussian(2.0)
    q, k, v = make_qkv(1, 12, 1, 8, seed=3)
    _skip_unless(backend, q, make_params(8, profile=profile))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    tar_attention(*leaves, backend=backend, profile=profile)[0, 0].sum().backward()
    for t in leaves[1:]:
        assert torch.equal(t.grad[0, 3:], torch.zeros_like(t.grad[0, 3:]))  # keys 3.. are beyond row 0's window
        assert t.grad[0, :3].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("name", ["composed", "bias-masked", "scale-per-head", "window-sinks"])
def test_gradients_match_the_reference(backend, mode, name):
    heads = 2
    profile = _with_mode(_profiles(heads)[name], mode)
    q, k, v = make_qkv(2, 13, heads, 12, len_k=11, layout="heads_first", seed=6)
    kw = dict(profile=profile, tokens_per_frame=2, video_start=1, k_offset=1)
    _skip_unless(backend, q, make_params(12, **kw))
    assert_grads_match_reference(backend, q, k, v, **kw)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_second_order_gradients(mode):
    """gradcheck and gradgradcheck of the op (float64, torch: the backend that runs float64) with a composed
    profile: the double backward through the differentiable reference is exact."""
    heads = 2
    profile = _with_mode(_profiles(heads)["composed"], mode)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 7, heads, 4, dtype=torch.float64, seed=8))

    def fn(q, k, v):
        return tar_attention(q, k, v, profile=profile, tokens_per_frame=2)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) traces a call with a profile (the profile's facts are Python values) and
    matches eager, forward and backward."""
    profile = FrameProfile.gaussian(2.0) + FrameProfile.table(bias=_table(2, 5, 1)) + FrameProfile.window(3, 1)
    q, k, v = make_qkv(1, 12, 2, 8, seed=1)
    fn = torch.compile(lambda q, k, v: tar_attention(q, k, v, profile=profile, tokens_per_frame=2),
                       fullgraph=True, backend="eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.sum().backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = tar_attention(*eager, profile=profile, tokens_per_frame=2)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------- the profile value
def test_composition_rules():
    a = FrameProfile.table(bias=torch.tensor([0.5, 1.0]), positive_scale=torch.tensor([1.0, 2.0, 0.5]))
    b = FrameProfile.table(bias=torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -math.inf]]))
    c = a + b + FrameProfile.window(4, sink_frames=1) + FrameProfile.window(6, sink_frames=3)
    # the shorter table extends by its last entry (it holds for every larger distance)
    torch.testing.assert_close(c.bias, torch.tensor([[1.5, 3.0, 4.0], [0.5, 1.0, -math.inf]], dtype=torch.float64))
    torch.testing.assert_close(c.positive_scale, torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64))
    assert (c.radius, c.sink_frames, c.heads, c.table_masks, c.table_reach) == (4, 3, 2, True, None)
    d = FrameProfile.decay_beyond(2, 0.5) + FrameProfile.table(positive_scale=torch.tensor([2.0]))
    torch.testing.assert_close(d.positive_scale, torch.tensor([[2.0, 2.0, 2.0, 1.0]], dtype=torch.float64))
    g = FrameProfile.gaussian(3.0, 0.5, "absolute")
    e = FrameProfile.window(2) + g
    assert (e.sigma, e.strength, e.mode, e.radius) == (3.0, 0.5, "absolute", 2)
    assert sum([g, FrameProfile.window(2)]).radius == 2
    with pytest.raises(ValueError, match="two Gaussian bands"):
        g + FrameProfile.gaussian(1.0)
    with pytest.raises(ValueError, match="2 and 3 heads"):
        FrameProfile.table(bias=torch.zeros(2, 3)) + FrameProfile.table(bias=torch.zeros(3, 3))
    reach = FrameProfile.table(bias=torch.tensor([0.0, -math.inf, 1.0, -math.inf]))
    assert reach.table_reach == 2 and reach.masks


def test_decay_beyond_is_a_scale_table():
    p = FrameProfile.decay_beyond(21, 0.9)
    assert p.positive_scale.shape == (1, 23)
    assert torch.equal(p.positive_scale[0, :22], torch.ones(22, dtype=torch.float64))
    assert p.positive_scale[0, 22] == 0.9 and not p.masks


def test_a_profile_is_a_value():
    p = FrameProfile.gaussian(2.0) + FrameProfile.table(bias=torch.randn(3, 4)) + FrameProfile.window(5, 2)
    for copied in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert (copied.sigma, copied.radius, copied.sink_frames, copied.heads) == (2.0, 5, 2, 3)
        assert torch.equal(copied.bias, p.bias)
    assert "gaussian(sigma=2" in repr(p) and "window(radius=5, sink_frames=2)" in repr(p)
    with pytest.raises(AttributeError):
        p.radius = 3
    given = torch.zeros(4)
    q = FrameProfile.table(bias=given)
    given[0] = 5.0  # the profile holds its own copy
    assert q.bias[0, 0] == 0.0


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: FrameProfile.table(), ValueError, "needs bias= or positive_scale="),
    (lambda: FrameProfile.table(bias=[0.0, 1.0]), TypeError, "bias must be a torch.Tensor"),
    (lambda: FrameProfile.table(bias=torch.zeros(2, 3, 4)), ValueError, r"shape \(D\+1,\) or \(heads, D\+1\)"),
    (lambda: FrameProfile.table(bias=torch.zeros(0)), ValueError, "D\\+1 >= 1"),
    (lambda: FrameProfile.table(bias=torch.zeros(3, dtype=torch.int64)), TypeError, "floating tensor"),
    (lambda: FrameProfile.table(bias=torch.tensor([0.0, math.nan])), ValueError, "bias holds NaN"),
    (lambda: FrameProfile.table(bias=torch.tensor([-math.inf, 0.0])), ValueError, r"bias\[\.\.\., 0\] must be finite"),
    (lambda: FrameProfile.table(bias=torch.tensor([0.0, math.inf])), ValueError, "bias holds \\+inf"),
    (lambda: FrameProfile.table(bias=torch.zeros(3, requires_grad=True)), ValueError, "requires grad"),
    (lambda: FrameProfile.table(positive_scale=torch.tensor([1.0, 0.0])), ValueError, "positive_scale must be"),
    (lambda: FrameProfile.table(positive_scale=torch.tensor([1.0, -2.0])), ValueError, "positive_scale must be"),
    (lambda: FrameProfile.table(positive_scale=torch.tensor([1.0, math.inf])), ValueError, "positive_scale must be"),
    (lambda: FrameProfile.table(positive_scale=torch.tensor([1.0, math.nan])), ValueError, "holds NaN"),
    (lambda: FrameProfile.table(bias=torch.zeros(2, 3), positive_scale=torch.ones(3, 3)), ValueError, "heads"),
    (lambda: FrameProfile.decay_beyond(4, 0.0), ValueError, r"factor must be in \(0, 1\]"),
    (lambda: FrameProfile.decay_beyond(4, 1.5), ValueError, r"factor must be in \(0, 1\]"),
    (lambda: FrameProfile.decay_beyond(4, math.nan), ValueError, "factor must be finite"),
    (lambda: FrameProfile.decay_beyond(-1, 0.5), ValueError, "window must be in"),
    (lambda: FrameProfile.decay_beyond(2.5, 0.5), TypeError, "window must be an integer"),
    (lambda: FrameProfile.window(-1), ValueError, "radius must be in"),
    (lambda: FrameProfile.window(2, sink_frames=-1), ValueError, "sink_frames must be in"),
    (lambda: FrameProfile(sink_frames=2), ValueError, "sink_frames needs a window"),
    (lambda: FrameProfile.gaussian(0.0), ValueError, "sigma must be > 0"),
    (lambda: FrameProfile.gaussian(1.0, mode="relatve"), ValueError, "mode must be one of"),
    (lambda: FrameProfile.gaussian(1.0, strength=math.inf), ValueError, "strength must be finite"),
])
def test_bad_profiles_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_calls_raise_before_any_launch():
    q, k, v = make_qkv(1, 6, 2, 8)
    p = FrameProfile.window(2)
    with pytest.raises(ValueError, match="give sigma or profile=, not both"):
        tar_attention(q, k, v, sigma=1.0, profile=p)
    with pytest.raises(ValueError, match="give strength, mode or profile="):
        tar_attention(q, k, v, strength=2.0, mode="absolute", profile=p)
    with pytest.raises(TypeError, match=r"profile must be a vstar_kernels\.FrameProfile"):
        tar_attention(q, k, v, profile={"radius": 2})
    with pytest.raises(TypeError, match="sigma must be a real number"):
        tar_attention(q, k, v)
    with pytest.raises(ValueError, match="3 rows, but the call has 2 heads"):
        tar_attention(q, k, v, profile=FrameProfile.table(bias=torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="3 rows, but the call has 2 heads"):
        tar_row_max(q, k, profile=FrameProfile.table(bias=torch.zeros(3, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a table on another device")
def test_a_table_on_another_device_raises():
    q, k, v = make_qkv(1, 6, 2, 8)
    with pytest.raises(ValueError, match="table is on cuda"):
        tar_attention(q, k, v, profile=FrameProfile.table(bias=torch.zeros(4, device="cuda")))
