"""A frame-distance profile in the form the fused kernels read: float32 tables on the inputs' device and a few
integers, built once per (profile, device) and shared by the Triton and C++/CUDA launchers.

The kernels evaluate, for a pair of framed tokens at frame distance ``d = |gi - gj|`` (``idx = min(d, table_len -
1)``, ``h`` the head, or 0 when the tables have one row)::

    kept   = (radius < 0 or d <= radius or f_k(j) < sink_limit) and bias[h, idx] > -inf
    S'_ij  = (S_ij > 0 ? scale[h, idx] * S_ij : S_ij) + bias[h, idx] + c_i * G(d)     (kept pairs; else masked)

with ``f_k(j)`` the key's local frame (the kernels' :meth:`~vstar_kernels.contract.TARParams.kernel_layout_args`)
and the relative row max of c_i taken over the kept keys. Pairs with a text token are never masked, scaled or
biased. This is :func:`vstar_kernels.reference.bias_rows` in kernel terms; the definition stays there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..contract import TARParams
from ..profiles import FrameProfile, widen_table

NO_RADIUS = -1  # the kernels' "no window"
_CACHE: weakref.WeakKeyDictionary[FrameProfile, dict[tuple[torch.device, torch.dtype], tuple]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class KernelProfile:
    """The kernel arguments of one call's profile.

    Attributes:
        bias: (rows, table_len) contiguous table in ``dtype`` (``-inf`` entries mask), or None.
        scale: (rows, table_len) contiguous positive-logit scale table, or None.
        table_len: D + 1, the entries of each table row (both tables are widened to the longer one's length).
        head_stride: elements between two heads' rows: table_len for per-head tables (a one-row table composed with a
            per-head one is repeated per head, so the stride serves both), 0 when every table has one row.
        radius: the window's radius in frames, or NO_RADIUS.
        sink_limit: a key whose local frame ``f_k(j)`` is below this is a sink (``sink_frames`` minus the global
            frame of the call's local key frame 0); meaningful only with a window.
        reach: frames beyond which no key is kept except sinks: the smaller of the radius and the bias table's
            reach (:attr:`FrameProfile.table_reach`), or None for no limit; tile and key-group skipping use it.
        sinks_reach: whether sinks stay kept beyond ``reach`` (False when the bias table masks them too).
        table_masks: whether the bias table holds ``-inf`` entries.
    """

    bias: torch.Tensor | None
    scale: torch.Tensor | None
    table_len: int
    head_stride: int
    radius: int
    sink_limit: int
    reach: int | None
    sinks_reach: bool
    table_masks: bool


def kernel_profile(params: TARParams, device: torch.device, dtype: torch.dtype = torch.float32, *,
                   cached: bool = True) -> KernelProfile:
    """The :class:`KernelProfile` of a call with a profile (``params.profile`` not None). With ``cached`` the tables
    are copied to ``device`` in ``dtype`` once per profile and kept while it lives; a traced call (torch.compile)
    passes ``cached=False`` and gets them made by traced ops (a graph's tensors must not outlive it in a cache)."""
    profile = params.profile
    if profile is None:
        raise ValueError("kernel_profile needs a call with a frame-distance profile")
    if cached:
        per_profile = _CACHE.setdefault(profile, {})
        key = (torch.device(device), dtype)
        if key not in per_profile:
            per_profile[key] = _tables(profile, device, dtype)
        bias, scale, length = per_profile[key]
    else:
        bias, scale, length = _tables(profile, device, dtype)
    radius = NO_RADIUS if profile.radius is None else profile.radius
    reaches = [r for r in (profile.radius, profile.table_reach) if r is not None]
    first_key_frame = params.k_offset + params.layout.fold(params.k_token_offset)[0]
    return KernelProfile(
        bias=bias, scale=scale, table_len=length, head_stride=length if profile.heads > 1 else 0, radius=radius,
        sink_limit=_clamped(profile.sink_frames - first_key_frame) if profile.radius is not None else 0,
        reach=min(reaches) if reaches else None, sinks_reach=profile.radius is not None and profile.table_reach is None,
        table_masks=profile.table_masks)


def _tables(profile: FrameProfile, device: torch.device, dtype: torch.dtype) -> tuple:
    """(bias, scale, table_len): both tables widened to one length and to the profile's rows (a one-row table beside
    a per-head one is repeated per head, so one head stride serves both), contiguous in ``dtype`` on ``device``."""
    tables = (profile.bias, profile.positive_scale)
    length = max([t.shape[1] for t in tables if t is not None], default=1)
    copies = [None if t is None else widen_table(t, length).expand(profile.heads, -1).to(device=device, dtype=dtype)
              .contiguous() for t in tables]
    return (*copies, length)


def _clamped(value: int) -> int:
    """An int32 kernel argument: the sink limit clamped to [-2^31 + 1, 2^31 - 1] (frames beyond it never occur)."""
    bound = 2**31 - 1
    return max(-bound, min(bound, value))


def spans_interact(params: TARParams, len_q: int, len_k: int) -> bool:
    """Whether some (query, key) pair of a call's chunks is kept: False only when every query token and every key
    token has a frame and the two chunks' frames lie further apart than the profile keeps (its radius or its bias
    table's reach), with no sink key kept beyond it. Context parallelism's Ring skips a key chunk for which this is
    False (its partial result would be zeros with lse -inf). Host-side, from the layout alone."""
    profile = params.profile
    if profile is None or len_q == 0 or len_k == 0:
        return True
    reaches = [r for r in (profile.radius, profile.table_reach) if r is not None]
    if not reaches:
        return True
    layout = params.layout
    q_tokens = range(params.q_token_offset, params.q_token_offset + len_q)
    k_tokens = range(params.k_token_offset, params.k_token_offset + len_k)
    spans = []
    for tokens, offset in ((q_tokens, params.q_offset), (k_tokens, params.k_offset)):
        end = tokens.stop if layout.video_tokens is None else min(tokens.stop, layout.video_start
                                                                   + layout.video_tokens)
        if tokens.start < layout.video_start or tokens.stop > end:
            return True  # a token without a frame (text) sees, or is seen by, every token
        first = (tokens.start - layout.video_start) // layout.tokens_per_frame + offset
        last = (tokens.stop - 1 - layout.video_start) // layout.tokens_per_frame + offset
        spans.append((first, last))
    (q_first, q_last), (k_first, k_last) = spans
    gap = max(0, k_first - q_last, q_first - k_last)
    sinks_kept = (profile.radius is not None and k_first < profile.sink_frames
                  and (profile.table_reach is None or gap <= profile.table_reach))  # a sink's distance >= gap
    return gap <= min(reaches) or sinks_kept
