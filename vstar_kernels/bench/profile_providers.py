"""What a frame-distance-profile benchmark compares: the op with a profile against the strongest peers that can express
it, one calling convention (a provider builds a zero-argument thunk from a :class:`ProfileCase`).

- ``sdpa``: plain SDPA without any bias or mask, the floor every ratio is taken to;
- ``sdpa_mask``: SDPA with the profile materialised as one additive (L, L) mask (-inf where masked, the bias table
  elsewhere); a positive-logit scale depends on S and has no additive form, so a decay profile cannot run there;
- ``naive``: the materialised reference (scores, bias and probabilities of the whole row);
- ``flex``: FlexAttention with a block mask built from the window (its masked blocks skipped) and a ``score_mod``
  for the tables (compiled, a compile per length; relative bands have no FlexAttention form);
- ``triton`` / ``extension`` / ``torch``: ``tar_attention(profile=...)``;
- ``extension_tar``: the extension running TAR's band alone on the same inputs, the cost a decay or table profile
  should match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vstar_kernels import FrameProfile, tar_attention, tar_attention_reference
from vstar_kernels.bench.providers import Provider, Thunk, _flex_attention, flex_compiled
from vstar_kernels.contract import make_params
from vstar_kernels.ops import why_not


@dataclass(frozen=True)
class ProfileCase:
    """One long-row point: a single sequence of ``q.shape[1]`` tokens in frames of ``tokens_per_frame``, the profile
    and the TAR band the ``extension_tar`` comparison runs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    profile: FrameProfile
    tokens_per_frame: int
    band_sigma: float = 2.0

    @property
    def frames(self) -> int:
        return self.q.shape[1] // self.tokens_per_frame


def make_profile_case(frames: int, tokens_per_frame: int, heads: int, head_dim: int, profile: FrameProfile, *,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ProfileCase:
    """One sequence of ``frames x tokens_per_frame`` tokens, q, k, v views of one fused projection."""
    length = frames * tokens_per_frame
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(1, length, 3 * heads * head_dim, generator=gen).to(device=device, dtype=dtype)
    q, k, v = (t.view(1, length, heads, head_dim) for t in fused.split(heads * head_dim, dim=-1))
    return ProfileCase(q, k, v, profile, tokens_per_frame)


def kept_share(profile: FrameProfile, frames: int) -> float:
    """The share of (query, key) token pairs the profile keeps in a video of ``frames`` frames (no text), from its
    window and its bias table's -inf entries (one-row tables: the share of head 0)."""
    index = torch.arange(frames)
    dist = (index[:, None] - index[None, :]).abs()
    keep = torch.ones(frames, frames, dtype=torch.bool)
    if profile.radius is not None:
        keep &= (dist <= profile.radius) | (index < profile.sink_frames)[None, :]
    if profile.bias is not None:
        keep &= torch.isfinite(profile.bias[0, dist.clamp(max=profile.bias.shape[1] - 1)])
    return float(keep.double().mean())


def _heads_first(case: ProfileCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return case.q.transpose(1, 2), case.k.transpose(1, 2), case.v.transpose(1, 2)


def _sdpa(case: ProfileCase) -> Thunk:
    q, k, v = _heads_first(case)
    return lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def additive_mask(case: ProfileCase) -> torch.Tensor:
    """The profile as one (heads or 1, L, L) additive mask in the inputs' dtype: bias(d), -inf where masked."""
    frames = torch.arange(case.q.shape[1], device=case.q.device) // case.tokens_per_frame
    dist = (frames[:, None] - frames[None, :]).abs()
    profile = case.profile
    mask = torch.zeros(1, *dist.shape, dtype=case.q.dtype, device=case.q.device)
    if profile.bias is not None:
        table = profile.bias.to(device=case.q.device, dtype=case.q.dtype)
        mask = table[:, dist.clamp(max=table.shape[1] - 1)]
    if profile.radius is not None:
        outside = (dist > profile.radius) & (frames >= profile.sink_frames)[None, :]
        mask = mask.masked_fill(outside, float("-inf"))
    return mask


def _sdpa_mask(case: ProfileCase) -> Thunk:
    q, k, v = _heads_first(case)
    mask = additive_mask(case)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _sdpa_mask_unavailable(case: ProfileCase) -> str | None:
    if case.profile.positive_scale is not None or case.profile.sigma is not None:
        return "a positive-logit scale or a relative band depends on S: no additive mask expresses it"
    return None


def _naive(case: ProfileCase) -> Thunk:
    return lambda: tar_attention_reference(case.q, case.k, case.v, profile=case.profile, upcast=False,
                                           tokens_per_frame=case.tokens_per_frame)


def _flex(case: ProfileCase) -> Thunk:
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = _heads_first(case)
    per_frame, profile = case.tokens_per_frame, case.profile
    bias = None if profile.bias is None else profile.bias[0].to(device=q.device, dtype=torch.float32)
    scale = None if profile.positive_scale is None else profile.positive_scale[0].to(device=q.device,
                                                                                      dtype=torch.float32)

    def distance(q_idx, kv_idx):
        return (q_idx // per_frame - kv_idx // per_frame).abs()

    def score_mod(score, b, h, q_idx, kv_idx):
        d = distance(q_idx, kv_idx)
        if scale is not None:
            score = torch.where(score > 0, score * scale[d.clamp(max=scale.shape[0] - 1)], score)
        if bias is not None:
            score = score + bias[d.clamp(max=bias.shape[0] - 1)]
        return score

    block_mask = None
    if profile.radius is not None:
        radius, sinks = profile.radius, profile.sink_frames

        def mask_mod(b, h, q_idx, kv_idx):
            return (distance(q_idx, kv_idx) <= radius) | (kv_idx // per_frame < sinks)

        length = q.shape[2]
        block_mask = create_block_mask(mask_mod, None, None, length, length, device=str(q.device))
    flex = _flex_attention(flex_compiled())
    mod = score_mod if bias is not None or scale is not None else None
    return lambda: flex(q, k, v, score_mod=mod, block_mask=block_mask).transpose(1, 2)


def _flex_unavailable(case: ProfileCase) -> str | None:
    if case.profile.sigma is not None:
        return "a Gaussian band's relative form needs the row max, which FlexAttention's score_mod never sees"
    if case.profile.heads > 1:
        return "per-head tables: the benchmark's FlexAttention form takes one row"
    return None


def _backend(name: str) -> Callable[[ProfileCase], Thunk]:
    def build(case: ProfileCase) -> Thunk:
        return lambda: tar_attention(case.q, case.k, case.v, profile=case.profile, backend=name,
                                     tokens_per_frame=case.tokens_per_frame)

    return build


def _backend_unavailable(name: str) -> Callable[[ProfileCase], str | None]:
    def unavailable(case: ProfileCase) -> str | None:
        params = make_params(case.q.shape[-1], profile=case.profile, tokens_per_frame=case.tokens_per_frame)
        return why_not(name, case.q, params)

    return unavailable


def _extension_tar(case: ProfileCase) -> Thunk:
    return lambda: tar_attention(case.q, case.k, case.v, sigma=case.band_sigma, backend="extension",
                                 tokens_per_frame=case.tokens_per_frame)


def _extension_tar_unavailable(case: ProfileCase) -> str | None:
    return why_not("extension", case.q, make_params(case.q.shape[-1], sigma=case.band_sigma,
                                                    tokens_per_frame=case.tokens_per_frame))


PROFILE_PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("sdpa", "plain SDPA, dense, no bias (floor)", _sdpa),
        Provider("sdpa_mask", "SDPA + materialised mask", _sdpa_mask, _sdpa_mask_unavailable),
        Provider("naive", "naive materialised profile", _naive),
        Provider("flex", "FlexAttention, block mask (compiled)", _flex, _flex_unavailable),
        Provider("triton", "vstar triton kernel", _backend("triton"), _backend_unavailable("triton")),
        Provider("extension", "vstar C++/CUDA extension", _backend("extension"),
                        _backend_unavailable("extension")),
        Provider("torch", "vstar torch fallback", _backend("torch"), _backend_unavailable("torch")),
        Provider("extension_tar", "vstar extension, TAR band alone (the cost to match)", _extension_tar,
                        _extension_tar_unavailable),
    )
}
# bytes per L x L element of the materialising providers (fp32 mask or scores, biased scores, probabilities)
MATERIALISED_BYTES = {"sdpa_mask": 12, "naive": 40}
