"""Temporal attention analysis: recorded maps are the layer's attention probabilities, recording changes nothing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from vstar_kernels import apply_tar, plot_temporal_attention, record_temporal_attention, tar_attention_probs
from vstar_kernels.diffusers.tiny import tiny_unet3d


def _inputs(frames: int = 12):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, frames, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)


@torch.no_grad()
def test_maps_are_the_layers_probabilities_and_outputs_are_unchanged():
    unet = tiny_unet3d()
    x, ehs = _inputs()
    handle = apply_tar(unet, "64D1_32D8", timesteps="all")
    before = dict(unet.attn_processors)
    expected = unet(x, 900, ehs).sample
    name = next(iter(handle.layers))
    layer = unet.get_submodule(name)
    seen = {}
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with record_temporal_attention(unet, positions=10_000) as maps:  # more positions than rows: all of them
        out = unet(x, 900, ehs).sample
    hook.remove()
    assert torch.equal(out, expected)  # recording runs beside the processor
    assert dict(unet.attn_processors) == before and all(unet.attn_processors[k] is v for k, v in before.items())
    assert set(maps.layers) == set(handle.layers) and maps.counts[name] == 1
    hidden = seen["x"]  # (B*H*W, F, C) input of the first TAR layer
    q = layer.to_q(hidden).view(hidden.shape[0], hidden.shape[1], layer.heads, -1)
    k = layer.to_k(hidden).view(hidden.shape[0], hidden.shape[1], layer.heads, -1)
    sigma = handle.layers[name][1]
    direct = tar_attention_probs(q, k, sigma=sigma, strength=1.0, mode="relative", scale=layer.scale).mean((0, 1))
    torch.testing.assert_close(maps.map(name), direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.mean().sum(-1), torch.ones(12), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tar_concentrates_attention_on_the_diagonal():
    unet = tiny_unet3d()
    x, ehs = _inputs(16)
    apply_tar(unet, "64D1", timesteps="all")
    with record_temporal_attention(unet, positions=8) as with_tar:
        unet(x, 900, ehs)
    with_tar_diag = with_tar.mean().diagonal().mean()
    apply_tar(unet, "64D1", timesteps="all", strength=0.0)
    with record_temporal_attention(unet, positions=8) as plain:
        unet(x, 900, ehs)
    assert with_tar_diag > 1.2 * plain.mean().diagonal().mean()


def test_processors_restored_on_error_and_bad_arguments():
    unet = tiny_unet3d()
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), record_temporal_attention(unet):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="positions must be >= 1"), record_temporal_attention(unet, positions=0):
        pass
    with pytest.raises(ValueError, match="not attention layers"), record_temporal_attention(unet, layers=["nope"]):
        pass


@torch.no_grad()
def test_plot(tmp_path):
    unet = tiny_unet3d()
    x, ehs = _inputs()
    with record_temporal_attention(unet, positions=4) as maps:
        unet(x, 900, ehs)
    path = plot_temporal_attention({"plain": maps, "identity": torch.eye(12)}, tmp_path / "maps.png")
    assert path.stat().st_size > 5_000
