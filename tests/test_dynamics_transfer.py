"""Dynamics transfer: record temporal attention on a reference video and on the model's own generation, fit a
per-distance bias (``FrameProfile.from_attention``), apply it, and the model's recorded per-distance attention moves
toward the reference's (measured). Also: recording a video transformer's attention per latent frame."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from vstar_kernels import FrameProfile, apply_tar, record_temporal_attention, remove_tar, tar_attention_probs
from vstar_kernels.diffusers import TemporalAttentionMaps, tiny
from vstar_kernels.diffusers.dit.processor import DiTTARProcessor
from vstar_kernels.profiles import distance_profile

FRAMES = 8


def _wan_inputs(latents: torch.Tensor) -> dict:
    text = torch.randn(latents.shape[0], 7, 32, generator=torch.Generator().manual_seed(9))
    return dict(hidden_states=latents, timestep=torch.tensor([700] * latents.shape[0]), encoder_hidden_states=text)


def _videos(frames: int = FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, generated) Wan latents: a slowly drifting pattern (the "real video") and independent noise."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 16, 1, 8, 12, generator=gen)
    reference = torch.cat([base + 0.3 * f * torch.randn(1, 16, 1, 8, 12, generator=gen) for f in range(frames)], 2)
    return reference, torch.randn(1, 16, frames, 8, 12, generator=gen)


@torch.no_grad()
def _record(model, latents, **kw) -> TemporalAttentionMaps:
    with record_temporal_attention(model, positions=8, **kw) as maps:
        model(**_wan_inputs(latents))
    return maps


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum())


# ------------------------------------------------------------------------------------------------- the fit itself
def test_from_attention_is_the_log_ratio_of_the_distance_profiles():
    ref = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])
    gen = torch.full((3, 3), 1 / 3)
    profile = FrameProfile.from_attention(ref, gen)
    r = torch.tensor([0.5, 0.275, 0.2], dtype=torch.float64)  # mean weight at distance 0, 1, 2
    expected = (r / (1 / 3)).log()
    torch.testing.assert_close(profile.bias[0], expected - expected[0])
    assert profile.bias[0, 0] == 0.0 and profile.heads == 1 and not profile.masks
    half = FrameProfile.from_attention(ref, gen, strength=0.5, max_distance=1)
    torch.testing.assert_close(half.bias[0], 0.5 * (expected[:2] - expected[0]))
    zero = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a zero weight is floored, not -inf
    assert torch.isfinite(FrameProfile.from_attention(zero, torch.full((2, 2), 0.5)).bias).all()
    torch.testing.assert_close(distance_profile(ref), r)


@pytest.mark.parametrize(("args", "error", "match"), [
    ((torch.zeros(3, 2), torch.zeros(3, 3)), ValueError, r"must be \(F, F\)"),
    (([[1.0]], torch.zeros(1, 1)), TypeError, "reference must be recorded attention"),
    ((torch.eye(2), torch.eye(2)), None, None),
])
def test_from_attention_checks_its_inputs(args, error, match):
    if error is None:
        with pytest.raises(ValueError, match="floor must be > 0"):
            FrameProfile.from_attention(*args, floor=0.0)
        return
    with pytest.raises(error, match=match):
        FrameProfile.from_attention(*args)


# ----------------------------------------------------------------------------------------- recording transformers
@torch.no_grad()
def test_recording_a_transformer_changes_nothing_and_gives_frame_maps():
    """Every block's self-attention gets an F x F map; without TAR applied the model's outputs are bit for bit its
    own and its processors are back on exit; rows of Wan (no text in its self-attention) sum to 1."""
    model = tiny.tiny_wan_transformer()
    _, latents = _videos()
    expected = model(**_wan_inputs(latents)).sample
    with record_temporal_attention(model, positions=8) as maps:
        out = model(**_wan_inputs(latents)).sample
    assert torch.equal(out, expected)
    assert not any(isinstance(getattr(m, "processor", None), DiTTARProcessor) for m in model.modules())
    assert set(maps.layers) == {f"blocks.{i}.attn1" for i in range(len(model.blocks))}
    assert maps.mean().shape == (FRAMES, FRAMES)
    torch.testing.assert_close(maps.mean().sum(-1), torch.ones(FRAMES), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), record_temporal_attention(model):
        raise RuntimeError("boom")
    assert not any(isinstance(getattr(m, "processor", None), DiTTARProcessor) for m in model.modules())
    with pytest.raises(ValueError, match="not self-attention layers"), record_temporal_attention(model,
                                                                                                layers=["nope"]):
        pass


@torch.no_grad()
def test_a_transformer_map_is_the_attention_of_its_frames(monkeypatch):
    """With every token of each frame sampled, a layer's map is the materialised attention of the q and k the layer
    hands the op, summed over each key frame's tokens and averaged over each query frame's tokens and the heads."""
    from vstar_kernels.diffusers.dit import processor as dit_processor

    model = tiny.tiny_wan_transformer()
    _, latents = _videos(4)
    apply_tar(model, sigma=1.0, strength=2.0, timesteps="all", blocks=[0])
    seen = []
    real = dit_processor.tar_attention
    monkeypatch.setattr(dit_processor, "tar_attention", lambda q, k, v, **kw: seen.append((q, k, kw)) or real(
        q, k, v, **kw))
    with record_temporal_attention(model, positions=10_000) as maps:
        model(**_wan_inputs(latents))
    (q, k, kw), = seen
    kw = {name: kw[name] for name in ("sigma", "strength", "mode", "scale", "tokens_per_frame")}
    probs = tar_attention_probs(q, k, compute_dtype=torch.float32, **kw)
    tokens = kw["tokens_per_frame"]
    direct = probs.reshape(1, q.shape[2], 4, tokens, 4, tokens).sum(-1).mean(dim=(0, 1, 3))
    torch.testing.assert_close(maps.map("blocks.0.attn1"), direct, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- transfer
@torch.no_grad()
def test_a_fitted_bias_moves_a_transformers_attention_toward_a_reference_video():
    """Reference: the attention recorded on a slowly drifting video; generated: on noise. The fitted bias, applied
    as a profile, brings the recorded per-distance attention on the same noise closer to the reference's."""
    model = tiny.tiny_wan_transformer()
    reference, generated = _videos()
    ref, gen = _record(model, reference), _record(model, generated)
    before = _gap(ref.distance_profile(), gen.distance_profile())
    apply_tar(model, profile=FrameProfile.from_attention(ref, gen), timesteps="all")
    after = _gap(ref.distance_profile(), _record(model, generated).distance_profile())
    assert after < 0.25 * before, (before, after)


@torch.no_grad()
def test_a_pronounced_reference_profile_is_transferred():
    """A reference with strongly local attention (recorded under a strong band, as a video with fast motion
    attends to its neighbours): the fitted bias moves the plain model most of the way there."""
    model = tiny.tiny_wan_transformer()
    _, latents = _videos()
    gen = _record(model, latents)
    apply_tar(model, sigma=1.0, strength=8.0, mode="absolute", timesteps="all")
    ref = _record(model, latents)
    remove_tar(model)
    before = _gap(ref.distance_profile(), gen.distance_profile())
    assert before > 0.1  # the reference is far from the plain model's attention
    apply_tar(model, profile=FrameProfile.from_attention(ref, gen), timesteps="all")
    after = _gap(ref.distance_profile(), _record(model, latents).distance_profile())
    assert after < 0.3 * before, (before, after)


@torch.no_grad()
def test_dynamics_transfer_on_an_animatediff_unet():
    """The same on AnimateDiff's motion UNet (SD1.5 + the v1.5 v2 adapter, two levels): maps of its temporal
    layers, the fitted profile applied alone on both levels."""
    unet, _ = tiny.tiny_animatediff_unet("animatediff", (32, 64), layers_per_block=1)
    gen_x = torch.randn(1, 4, 12, 8, 8, generator=torch.Generator().manual_seed(2))
    ref_x = gen_x[:, :, :1] + 0.2 * torch.arange(12.0).view(1, 1, 12, 1, 1) * gen_x[:, :, 1:2]
    ehs = torch.randn(12, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    layers = list(apply_tar(unet, sigma=1.0, levels=(0, 1)).layers)
    remove_tar(unet)

    def record(x):
        with record_temporal_attention(unet, positions=16, layers=layers) as maps:
            unet(x, 900, ehs)
        return maps

    ref, gen = record(ref_x), record(gen_x)
    before = _gap(ref.distance_profile(), gen.distance_profile())
    handle = apply_tar(unet, profile=FrameProfile.from_attention(ref, gen), levels=(0, 1), timesteps="all")
    assert set(handle.layers) == set(layers)
    after = _gap(ref.distance_profile(), record(gen_x).distance_profile())
    assert math.isfinite(before) and after < 0.5 * before, (before, after)
