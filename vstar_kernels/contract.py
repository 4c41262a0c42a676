"""The op contract shared by every backend: argument validation and the scalar parameters.

``tar_attention(q, k, v, *, sigma, strength, mode, scale, q_offset, k_offset, tokens_per_frame, video_start,
video_tokens)`` takes tensors of shape (batch, tokens, heads, head_dim) with any strides and computes, per (batch,
head),

    S_ij  = scale * <q_i, k_j>
    G_ij  = exp(-(gi - gj)^2 / (2 sigma^2))  when tokens i and j both have a frame, else 0
    c_i   = sat(strength * max_j' S_ij')             (mode "relative", VSTAR Eq. 3; the max runs over all keys)
    c_i   = sat(strength)                            (mode "absolute")
    S'_ij = S_ij + c_i * G_ij
    out_i = sum_j softmax_j(S'_ij) v_j
    sat(x) = min(max(x, -2^125), 2^125)              (BIAS_COEFF_MAX; see "Extreme values" below)

A frame-distance profile (``profile=``, :class:`~vstar_kernels.profiles.FrameProfile`, instead of sigma, strength
and mode) generalises the band: for framed tokens at distance d = |gi - gj|, with tables indexed by min(d, D),

    S'_ij = (S_ij > 0 ? scale(d) * S_ij : S_ij) + bias(d) + c_i * G_ij     over kept pairs only
    c_i   = sat(strength * max_{j kept} S_ij)      (relative; the row max over the keys the profile keeps)

where a pair is kept unless bias(d) = -inf or a window masks it (d > radius and the key's global frame not below
sink_frames); a masked pair gets no weight, no part in the row max and no gradient, and a row with no kept key (a
chunk of keys) returns zeros and lse -inf. Pairs with a text token keep S_ij.

The token layout (:class:`TokenFrames`) maps a token to its frame. Token t of a sequence has a frame when
``video_start <= t < video_start + video_tokens`` (``video_tokens=None``: to the end of the sequence); its global
frame index is ``offset + (t - video_start) // tokens_per_frame``, with ``q_offset`` for query tokens and
``k_offset`` for keys. The default (1 token per frame, from token 0 to the end) is temporal attention: token = frame.

Chunks of a longer sequence (context parallelism's Ring: each rank holds a contiguous run of query tokens and
visits the key chunks of the others). ``q_token_offset`` / ``k_token_offset`` are the index, in the whole sequence
the layout describes, of the first query / key token of the call: local query token i is token
``i + q_token_offset`` of the sequence, and the layout above applies to that index. A chunk boundary may fall
inside a frame. Given either (even 0), the call is a chunk: the video span may reach past it (the check that the
span lies inside both sequences applies to whole sequences only).

Partial results over key chunks merge exactly. Two more call arguments make that possible:

- ``row_max`` (relative mode): a (batch, Lq, heads) tensor that replaces ``max_j S_ij`` in c_i, so every chunk of
  a row biases with the row max over all of the row's keys (:func:`vstar_kernels.ops.tar_row_max` computes it
  for one chunk; the max over chunks is the row's).
- ``return_lse=True``: the call also returns ``lse_i = log sum_j exp(S'_ij)`` (natural log, (batch, Lq,
  heads), float32; float64 for float64 inputs). For key chunks c with outputs o_c and lse_c of one row,
  ``lse = logsumexp_c lse_c`` and
  ``out = sum_c exp(lse_c - lse) o_c`` is the output over all keys (:func:`vstar_kernels.ops.merge_partials`).
A video transformer's row-major (frame, height, width) patch sequence has ``tokens_per_frame = h * w``; text tokens
joined before it (CogVideoX) or after it (HunyuanVideo) have no frame, so their rows and columns get no bias.

Extreme values. Extreme strengths, sigmas and frame distances within the checks below give the formula's finite
answer, the same on every backend (the logits S themselves must be finite in float32):

- The bias coefficient c_i saturates at ±2^125 (natural units, BIAS_COEFF_MAX), so ``|strength * max_j S_ij|``
  beyond the float32 range (e.g. strength 1e38 with logits near 5) and ``|strength| * log2(e)`` beyond it (the
  absolute bias of the exp2-domain kernels) stay finite: every biased logit is within 2^125 + |S| and no difference
  of two overflows. A coefficient that large decides the row by the band alone: for c_i > 0 the keys of the row's
  largest G share the weight evenly (next to a bias of 2^125 * G, S_ij is below float32's resolution, and below
  float64's next to the unsaturated bias) and every other key gets none; for c_i < 0 the keys of the smallest G keep
  it. That is the softmax of the unsaturated float64 formula too wherever the band values that matter are 0 or at
  least ~2^-90 (keys within ~11 sigma of the query's frame); the saturation shows only where a key further out is
  the one the row keeps (c_i < 0 with every nearer key suppressed, or c_i > 0 with no key within ~11 sigma). A
  saturated row passes no gradient to its row max (sat' = 0).
- sigma: any finite sigma > 0. A sigma so large that log2(e) / (2 sigma^2) underflows to 0 (above ~1.2e162 in
  float64) is the constant band G = 1 between framed tokens, the formula's own value there (the float32 kernels'
  Gaussian is 1 to the last bit from sigma ~1e13 on).
- Frame distances: the GPU kernels hold gi - gj in int32, exact for ``|q_offset - k_offset| <= 2^30`` and at most
  2^30 tokens, i.e. every distance below 2^31 (beyond, "auto" runs the CPU backends, exact to 2^53).

This module holds no formula of its own beyond the host-side constants a kernel needs: the Gaussian and the
bias are defined in :mod:`vstar_kernels.reference` (Python), the Triton kernel and ``csrc/tar_attention.h``.
Everything here runs before any launch, so bad input fails with a message that names the argument.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .limits import FLOAT32_MAX, MAX_OFFSET, MAX_TOKENS, MODES, Mode  # noqa: F401  (Mode: re-exported)
from .profiles import FrameProfile

LOG2E = 1.4426950408889634  # log2(e): kernels work in the exp2 domain
# The Gaussian's exp2 coefficient saturates here: exp2(-2048 d^2) is exactly 0 in float32 and float64 for every
# |d| >= 1 (and 1 at d = 0), so any sigma below ~0.019 gives the diagonal-only band, down to the smallest sigma,
# without the coefficient overflowing (0 * inf = NaN on the diagonal).
GAUSS_LOG2_COEFF_MAX = 2048.0
# |c_i|, the multiplier of G_ij in a row (natural units), saturates here (module docstring, "Extreme values"): 2^125
# leaves every biased logit and every difference of two finite in float32, in natural and in exp2 units (2^125 *
# log2(e) < 2^126). csrc/tar_attention.h kBiasCoeffMax; the Triton kernels' BIAS_LOG2_MAX = this * log2(e).
BIAS_COEFF_MAX = 2.0**125
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TARParams:
    """Validated scalar parameters of one ``tar_attention`` call.

    The ``*_log2`` properties are the host-side constants of the exp2-domain kernels: a logit ``t = S * log2(e)``
    is computed as ``<q, k> * qk_log2_scale`` and the Gaussian as ``exp2(-(gi - gj)^2 * gauss_log2_coeff)``.
    In relative mode the bias is ``sat(strength * max_j t_ij) * G`` (the row max scales with log2(e) like the
    logits do, and so does the bound: ``BIAS_COEFF_MAX * log2(e)``, applied in the kernel), in absolute mode
    ``sat(strength) * log2(e) * G``.
    """

    sigma: float
    strength: float
    mode: str
    scale: float
    q_offset: int
    k_offset: int
    tokens_per_frame: int = 1
    video_start: int = 0
    video_tokens: int | None = None
    q_token_offset: int = 0
    k_token_offset: int = 0
    chunked: bool = False  # q_token_offset or k_token_offset given: a chunk of a longer sequence
    # the frame-distance profile's tables and window (vstar_kernels.profiles), when it has any: None for TAR alone
    # (a profile holding just a Gaussian band runs exactly as sigma/strength/mode do, on the kernels of today)
    profile: FrameProfile | None = None

    @property
    def shaped(self) -> bool:
        """Whether the call has a frame-distance profile beyond the Gaussian band (tables or a window)."""
        return self.profile is not None

    @property
    def relative(self) -> bool:
        return self.mode == "relative"

    @property
    def layout(self) -> TokenFrames:
        """How tokens map to frames (:class:`TokenFrames`)."""
        return TokenFrames(self.tokens_per_frame, self.video_start, self.video_tokens)

    @property
    def framed(self) -> bool:
        """True unless every token is its own frame (temporal attention): the kernels' layout-aware path."""
        return not self.layout.is_temporal

    @property
    def offset_delta(self) -> int:
        """The kernels' frame offset: gi - gj = offset_delta + f_q(i) - f_k(j) with the local frames f of
        :meth:`kernel_layout_args` (f(t) = t for temporal attention). ``q_offset - k_offset`` for whole sequences; a
        chunk's whole frames before its first token fold into it (:meth:`TokenFrames.fold`)."""
        fold_q = self.layout.fold(self.q_token_offset)[0]
        fold_k = self.layout.fold(self.k_token_offset)[0]
        return (self.q_offset + fold_q) - (self.k_offset + fold_k)

    def kernel_layout_args(self, len_q: int, len_k: int) -> tuple[int, int, int, int, int]:
        """(tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k) of the kernels: local token t of
        q has local frame ``(t - video_start_q) // tokens_per_frame`` when ``video_start_q <= t < video_end_q``, else
        none (the same for k), and frame distance ``offset_delta + f_q(i) - f_k(j)``. A start may be negative (down
        to ``1 - tokens_per_frame``: a chunk that begins inside a frame); t - start is then still >= 0, so C's
        truncating division agrees with floor. Every number lies within [-tokens_per_frame, max(Lq, Lk, 1)], int32
        wherever the lengths are. For whole sequences this is ``(tokens_per_frame, video_start, video_start,
        video_end(Lq), video_end(Lk))`` clipped to the longest sequence."""
        longest = max(len_q, len_k, 1)
        layout = self.layout
        per_frame = min(layout.tokens_per_frame, longest)  # no frame index changes (below), int32 wherever L is
        cut = layout.tokens_per_frame - per_frame

        def clipped(start: int) -> int:
            # a start -phase inside a frame longer than the call: its next frame begins at local token
            # tokens_per_frame - phase, which the clipped frame length must keep (or leave beyond the call)
            return -max(0, -start - cut) if start < 0 else start

        _, start_q, end_q = layout.fold(self.q_token_offset, len_q, longest)
        _, start_k, end_k = layout.fold(self.k_token_offset, len_k, longest)
        return per_frame, clipped(start_q), clipped(start_k), max(clipped(start_q), end_q), max(clipped(start_k),
                                                                                               end_k)

    @property
    def qk_log2_scale(self) -> float:
        return self.scale * LOG2E

    @property
    def gauss_log2_coeff(self) -> float:
        """log2(e) / (2 sigma^2), saturated at GAUSS_LOG2_COEFF_MAX (no overflow for tiny sigma); 0.0 for a sigma
        so large that it underflows (the constant band)."""
        return min((LOG2E / 2.0) / self.sigma / self.sigma, GAUSS_LOG2_COEFF_MAX)

    @property
    def bias_log2_scale(self) -> float:
        """strength (relative: the kernel multiplies the row max and saturates the product), or the saturated
        absolute bias in log2 units, ``sat(strength) * log2(e)`` (finite for every admitted strength)."""
        return self.strength if self.relative else saturate_bias_coeff(self.strength) * LOG2E


def saturate_bias_coeff(coeff: float) -> float:
    """sat(coeff): the multiplier of G_ij clamped to ±BIAS_COEFF_MAX (module docstring, "Extreme values")."""
    return max(-BIAS_COEFF_MAX, min(BIAS_COEFF_MAX, coeff))


@dataclass(frozen=True)
class TokenFrames:
    """Token → frame map of one sequence: token t has frame ``(t - video_start) // tokens_per_frame`` when
    ``video_start <= t < video_start + video_tokens`` (``video_tokens=None``: to the end), else none.

    Frame indices here are local (0 for the first video frame); a call adds ``q_offset`` / ``k_offset``.
    """

    tokens_per_frame: int = 1
    video_start: int = 0
    video_tokens: int | None = None

    @property
    def is_temporal(self) -> bool:
        """Every token is its own frame: the layout of temporal attention (and of every call before it existed)."""
        return self.tokens_per_frame == 1 and self.video_start == 0 and self.video_tokens is None

    def video_end(self, length: int) -> int:
        """One past the last token with a frame in a sequence of ``length`` tokens."""
        end = length if self.video_tokens is None else self.video_start + self.video_tokens
        return max(self.video_start, min(length, end))

    def fold(self, token_offset: int, length: int = 0, longest: int = 1) -> tuple[int, int, int]:
        """A chunk of ``length`` tokens starting at token ``token_offset`` of the sequence, in local terms:
        (frames_before, start, end) such that local token t has frame ``frames_before + (t - start) //
        tokens_per_frame`` when ``start <= t < end``. ``start`` lies in (-tokens_per_frame, longest] (a chunk that
        begins inside a frame has a negative start: the frames before it fold into ``frames_before``); ``end`` in
        [start, max(start, length)]. The kernels' form of the layout (:meth:`TARParams.kernel_layout_args`)."""
        start = self.video_start - token_offset
        before = 0
        if start < 0:
            before, phase = divmod(-start, self.tokens_per_frame)
            start = -phase
        start = min(start, longest)
        stop = length if self.video_tokens is None else self.video_start + self.video_tokens - token_offset
        return before, start, max(start, min(length, stop))

    def frames(self, length: int, offset: int = 0, device: torch.device | str | None = None,
               token_offset: int = 0) -> torch.Tensor:
        """(length,) int64 global frame index ``offset + (T - video_start) // tokens_per_frame`` of each token, T =
        t + ``token_offset`` its index in the sequence; meaningful only where :meth:`framed_mask` is True."""
        t = torch.arange(length, dtype=torch.int64, device=device) + token_offset
        return torch.div(t - self.video_start, self.tokens_per_frame, rounding_mode="floor") + offset

    def framed_mask(self, length: int, device: torch.device | str | None = None,
                    token_offset: int = 0) -> torch.Tensor:
        """(length,) bool: which tokens have a frame (token t is token t + ``token_offset`` of the sequence; with
        ``video_tokens=None`` the span runs to the end of the chunk)."""
        t = torch.arange(length, dtype=torch.int64, device=device) + token_offset
        end = self.video_end(length + token_offset) if self.video_tokens is not None else length + token_offset
        return (t >= self.video_start) & (t < end)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    # comparisons, not math.isfinite: under torch.compile a float that varies between calls (or any scalar with
    # dynamic=True) is symbolic, and comparisons trace where math.isfinite breaks the graph
    if not -math.inf < out < math.inf:
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer frame index, got {type(value).__name__}")
    out = int(value)
    if not -MAX_OFFSET <= out <= MAX_OFFSET:
        raise ValueError(f"{name} must be within ±2^53 (frame indices exact in float64), got {out}")
    return out


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer token count, got {type(value).__name__}")
    out = int(value)
    if not minimum <= out <= MAX_TOKENS:
        raise ValueError(f"{name} must be in [{minimum}, 2^53], got {out}")
    return out


def make_params(
    head_dim: int,
    *,
    sigma: float | None = None,
    strength: float | None = None,
    mode: str | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    tokens_per_frame: int = 1,
    video_start: int = 0,
    video_tokens: int | None = None,
    q_token_offset: int | None = None,
    k_token_offset: int | None = None,
    profile: FrameProfile | None = None,
) -> TARParams:
    """Validate the scalar arguments and resolve defaults (``strength`` 1.0, ``mode`` "relative", ``scale =
    head_dim ** -0.5``; token offsets 0, and ``chunked`` when either is given).

    The bias is given either by ``sigma`` (with ``strength`` and ``mode``: TAR's band) or by ``profile`` (a
    :class:`~vstar_kernels.profiles.FrameProfile`, which holds its band's sigma, strength and mode itself; giving
    any of those three beside it raises)."""
    sigma, strength, mode, profile = _bias_arguments(sigma, strength, mode, profile)
    sigma_f = _real("sigma", sigma)
    if sigma_f <= 0.0:
        raise ValueError(f"sigma must be > 0, got {sigma_f}")
    strength_f = _real("strength", strength)
    if abs(strength_f) > FLOAT32_MAX:
        raise ValueError(f"strength must fit in float32 (|strength| <= {FLOAT32_MAX:.4g}), got {strength_f}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale is None:
        scale_f = head_dim**-0.5 if head_dim > 0 else 1.0
    else:
        scale_f = _real("scale", scale)
        if scale_f <= 0.0:
            raise ValueError(f"scale must be > 0, got {scale_f}")
    params = TARParams(
        sigma=sigma_f,
        strength=strength_f,
        mode=mode,
        scale=scale_f,
        q_offset=_integer("q_offset", q_offset),
        k_offset=_integer("k_offset", k_offset),
        tokens_per_frame=_count("tokens_per_frame", tokens_per_frame, 1),
        video_start=_count("video_start", video_start, 0),
        video_tokens=None if video_tokens is None else _count("video_tokens", video_tokens, 0),
        q_token_offset=0 if q_token_offset is None else _count("q_token_offset", q_token_offset, 0),
        k_token_offset=0 if k_token_offset is None else _count("k_token_offset", k_token_offset, 0),
        chunked=q_token_offset is not None or k_token_offset is not None,
        profile=profile,
    )
    if abs(params.offset_delta) > MAX_OFFSET:
        raise ValueError(f"the frame distance offset of this call ({params.offset_delta}: q_offset - k_offset plus "
                         "the frames before each chunk's first token) must be within ±2^53")
    return params


def _bias_arguments(sigma, strength, mode, profile):
    """(sigma, strength, mode, shaped profile or None) of a call given ``sigma``/``strength``/``mode`` or
    ``profile``: a profile's band becomes the call's sigma, strength and mode (no band: strength 0, which every
    backend runs as no bias), and the profile itself is kept only when it holds more than the band."""
    if profile is None:
        if sigma is None:
            raise TypeError("sigma must be a real number (the band's width in frames), got NoneType; or pass "
                            "profile= (a vstar_kernels.FrameProfile)")
        return sigma, 1.0 if strength is None else strength, "relative" if mode is None else mode, None
    if not isinstance(profile, FrameProfile):
        raise TypeError(f"profile must be a vstar_kernels.FrameProfile, got {type(profile).__name__}")
    given = [name for name, value in (("sigma", sigma), ("strength", strength), ("mode", mode)) if value is not None]
    if given:
        raise ValueError(f"give {', '.join(given)} or profile=, not both: a profile holds its Gaussian band "
                         "(FrameProfile.gaussian(sigma, strength, mode) + ...)")
    shaped = profile if profile.shaped else None
    if profile.has_band:
        return profile.sigma, profile.strength, profile.mode, shaped
    return 1.0, 0.0, profile.mode, shaped


def validate_profile(params: TARParams, q: torch.Tensor) -> None:
    """The call's frame-distance profile, if any, must serve ``q``: one table row per head of ``q`` or one row for
    all, and its tables on the CPU or on ``q``'s device (ValueError otherwise)."""
    if params.profile is not None:
        params.profile.check_heads(q.shape[2])
        params.profile.check_device(q.device)


def validate_layout(params: TARParams, len_q: int, len_k: int) -> None:
    """The token layout must lie inside both sequences: ``video_start`` (plus ``video_tokens`` when given) at most
    the shorter of Lq and Lk, so a misplaced text span fails instead of silently biasing nothing."""
    shortest = min(len_q, len_k)
    if shortest == 0 or params.layout.is_temporal or params.chunked:  # a chunk: the span may reach past it
        return
    end = params.video_start + (params.video_tokens or 0)
    if end > shortest:
        what = "video_start" if params.video_tokens is None else "video_start + video_tokens"
        raise ValueError(f"{what} = {end} lies beyond the sequence (Lq = {len_q}, Lk = {len_k}): the video tokens "
                         "must be inside both q and k")


def validate_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check shapes, dtypes and devices of (batch, frames, heads, head_dim) inputs.

    k and v share a frame count that may differ from q's; batch, heads, head_dim, dtype and device must agree.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, frames, heads, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"mismatched dtype: q is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"mismatched device: q is on {q.device}, {name} is on {t.device}")
        for axis, label in ((0, "batch"), (2, "heads"), (3, "head_dim")):
            if t.shape[axis] != q.shape[axis]:
                raise ValueError(
                    f"mismatched {label}: q has {q.shape[axis]}, {name} has {t.shape[axis]} "
                    f"(shapes q={tuple(q.shape)}, {name}={tuple(t.shape)})"
                )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"mismatched frames: k has {k.shape[1]}, v has {v.shape[1]}")
    if q.shape[3] == 0:
        raise ValueError("head_dim must be >= 1, got 0")
    if k.shape[1] == 0 and q.shape[0] * q.shape[1] > 0:
        raise ValueError("k and v need at least one frame: softmax over zero keys is undefined")
