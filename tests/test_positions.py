"""Frame positions beyond a table's length (AnimateDiff's 32-row motion tables) and 128 frames on every family.

Every model here is built from a released layer structure, narrower: AnimateDiff adapters keep their 32-row tables.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import pickle_round_trip

diffusers = pytest.importorskip("diffusers")

from diffusers.models.embeddings import SinusoidalPositionalEmbedding  # noqa: E402

from vstar_kernels import apply_tar, extend_frame_positions, remove_tar, restore_frame_positions  # noqa: E402
from vstar_kernels.diffusers import TARAttnProcessor  # noqa: E402
from vstar_kernels.diffusers.tiny import (  # noqa: E402
    RELEASED_MOTION_POSITIONS,
    tiny_animatediff_unet,
    tiny_i2vgen_unet,
    tiny_svd_unet,
    tiny_unet3d,
)
from vstar_kernels.diffusers.unet.frame_positions import FramePositionEmbedding, frame_positions_state  # noqa: E402

ROWS = RELEASED_MOTION_POSITIONS


def small_motion_unet():
    """AnimateDiff v2 structure (8 heads, 32 positions, motion mid block) on two levels: fast to run."""
    return tiny_animatediff_unet("animatediff", (32, 64), layers_per_block=1)[0]


def motion_inputs(frames: int, in_channels: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_channels, frames, 8, 8, generator=gen)
    ehs = torch.randn(1, 7, 32, generator=gen).repeat_interleave(frames, dim=0)  # repeated per frame
    return x, ehs


def tables(unet) -> dict[str, SinusoidalPositionalEmbedding]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, SinusoidalPositionalEmbedding)}


def independent_interpolation(table: torch.Tensor, frames: int) -> torch.Tensor:
    """What the issue defines: F.interpolate of the stored rows, linear, align_corners=True."""
    return F.interpolate(table.double().transpose(1, 2), size=frames, mode="linear",
                         align_corners=True).transpose(1, 2)


def closed_form_sinusoid(frames: int, dim: int) -> torch.Tensor:
    """sin/cos(p / 10000^(2i/dim)) in float64, written independently of diffusers' expression."""
    p = torch.arange(frames, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    angle = p / 10000.0 ** (2 * i / dim)
    out = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(frames, dim)
    return out[None]


# ------------------------------------------------------------------------------------------------ the headline
@torch.no_grad()
def test_32_position_adapter_runs_128_frames_after_plain_apply_tar():
    unet = small_motion_unet()
    assert {m.pe.shape[1] for m in tables(unet).values()} == {ROWS}
    x, ehs = motion_inputs(64)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(64\) must match the size of tensor b \(32\)"):
        unet(x, 900, ehs)  # diffusers' own limit, which is what users hit
    handle = apply_tar(unet)
    assert handle.positions == "interpolate" and set(handle.position_tables) == set(tables(unet))
    assert set(handle.position_tables.values()) == {ROWS}
    x, ehs = motion_inputs(128)
    out = unet(x, 900, ehs).sample
    assert out.shape == (1, 4, 128, 8, 8) and torch.isfinite(out).all()


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 16, 31, 32])
def test_within_the_table_every_mode_is_bit_identical_to_keep(frames):
    unet = small_motion_unet()
    x, ehs = motion_inputs(frames)
    apply_tar(unet, timesteps="all", positions="keep")
    keep = unet(x, 900, ehs).sample
    for mode in ("interpolate", "extrapolate"):
        apply_tar(unet, timesteps="all", positions=mode)
        assert torch.equal(unet(x, 900, ehs).sample, keep), mode
    remove_tar(unet)
    plain = unet(x, 900, ehs).sample
    extend_frame_positions(unet, "interpolate")  # without TAR: exactly diffusers
    assert torch.equal(unet(x, 900, ehs).sample, plain)


# --------------------------------------------------------------------------------- positions, independently
@torch.no_grad()
@pytest.mark.parametrize("frames", [33, 50, 64, 128, 1000])
def test_interpolated_positions_match_f_interpolate_of_the_stored_rows(frames):
    unet = small_motion_unet()
    for module in tables(unet).values():  # a trained table: the stored rows must be used, not the sinusoid
        module.pe.copy_(torch.randn_like(module.pe))
    extend_frame_positions(unet, "interpolate")
    for name, module in tables(unet).items():
        expected = independent_interpolation(module.pe, frames)
        got = module(torch.zeros(1, frames, module.pe.shape[2]))  # the forward adds exactly the positions
        assert got.dtype == module.pe.dtype
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6, msg=name)
        assert torch.equal(got[0, 0], module.pe[0, 0]) and torch.equal(got[0, -1], module.pe[0, -1])


@torch.no_grad()
@pytest.mark.parametrize("frames", [33, 64, 128, 513])
def test_extrapolated_positions_are_the_sinusoid_diffusers_would_build(frames):
    unet = small_motion_unet()
    extend_frame_positions(unet, "extrapolate")
    for name, module in tables(unet).items():
        dim = module.pe.shape[2]
        got = module(torch.zeros(1, frames, dim))
        assert torch.equal(got, SinusoidalPositionalEmbedding(dim, max_seq_length=frames).pe), name
        torch.testing.assert_close(got.double(), closed_form_sinusoid(frames, dim), rtol=0, atol=2e-4)
        assert torch.equal(got[:, :ROWS], module.pe)  # continues the stored rows


@torch.no_grad()
@pytest.mark.parametrize("mode", ["interpolate", "extrapolate"])
def test_unet_output_equals_a_model_whose_tables_were_built_for_f_frames(mode):
    """End to end: the extended UNet computes what diffusers computes with tables of F rows holding the
    independently computed positions (new buffers, in a copy made before patching)."""
    frames = 48
    unet = small_motion_unet()
    reference = copy.deepcopy(unet)
    for module in tables(reference).values():
        dim = module.pe.shape[2]
        values = (independent_interpolation(module.pe, frames) if mode == "interpolate"
                  else closed_form_sinusoid(frames, dim))
        module.pe = values.float()
    x, ehs = motion_inputs(frames)
    apply_tar(unet, timesteps="all", positions=mode)
    apply_tar(reference, timesteps="all", positions="keep")
    torch.testing.assert_close(unet(x, 900, ehs).sample, reference(x, 900, ehs).sample, rtol=1e-4, atol=1e-5)


def test_extrapolate_refuses_a_trained_table_before_changing_anything():
    unet = small_motion_unet()
    name, module = next(iter(tables(unet).items()))
    with torch.no_grad():
        module.pe[0, 5] += 0.1
    processors = dict(unet.attn_processors)
    with pytest.raises(ValueError, match=rf"{name}.*not that sinusoid.*interpolate"):
        apply_tar(unet, positions="extrapolate")
    with pytest.raises(ValueError, match="not that sinusoid"):
        extend_frame_positions(unet, "extrapolate")
    assert all(processors[k] is v for k, v in unet.attn_processors.items())
    assert all(type(m) is SinusoidalPositionalEmbedding for m in tables(unet).values())
    assert apply_tar(unet, positions="interpolate").num_layers > 0


@torch.no_grad()
def test_extrapolate_notices_a_table_loaded_after_it_was_set():
    unet = small_motion_unet()
    extend_frame_positions(unet, "extrapolate")
    state = {k: v + 0.5 if k.endswith("pos_embed.pe") else v for k, v in unet.state_dict().items()}
    unet.load_state_dict(state)
    module = next(iter(tables(unet).values()))
    with pytest.raises(ValueError, match="not that sinusoid"):
        module(torch.zeros(1, 40, module.pe.shape[2]))


@torch.no_grad()
def test_keep_gives_a_clear_error_naming_the_table_and_the_other_modes():
    unet = small_motion_unet()
    apply_tar(unet, positions="keep")
    x, ehs = motion_inputs(40)
    with pytest.raises(ValueError, match=r"40 frames exceed .* 32 rows.*'interpolate'.*'extrapolate'"):
        unet(x, 900, ehs)


@pytest.mark.parametrize("bad", ["stretch", None, 3])
def test_bad_positions_mode_is_refused_and_nothing_changes(bad):
    unet = small_motion_unet()
    processors = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="positions must be one of"):
        apply_tar(unet, positions=bad)
    with pytest.raises(ValueError, match="positions must be one of"):
        extend_frame_positions(unet, bad)
    assert all(processors[k] is v for k, v in unet.attn_processors.items())
    assert all(type(m) is SinusoidalPositionalEmbedding for m in tables(unet).values())


# ------------------------------------------------------------------------------------------- nothing lost
@torch.no_grad()
def test_remove_tar_brings_back_diffusers_behaviour_exactly():
    unet = small_motion_unet()
    x16, ehs16 = motion_inputs(16)
    before = unet(x16, 900, ehs16).sample
    modules_before = dict(unet.named_modules())
    apply_tar(unet, timesteps="all")
    assert all(type(m) is FramePositionEmbedding for m in tables(unet).values())
    x64, ehs64 = motion_inputs(64)
    unet(x64, 900, ehs64)
    assert remove_tar(unet)
    assert all(type(m) is SinusoidalPositionalEmbedding for m in tables(unet).values())
    assert all(not hasattr(m, "frame_positions") and not hasattr(m, "_frame_position_cache")
               for m in tables(unet).values())
    assert dict(unet.named_modules()).keys() == modules_before.keys()
    assert all(modules_before[n] is m for n, m in unet.named_modules())  # the same objects
    assert torch.equal(unet(x16, 900, ehs16).sample, before)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(64\)"):
        unet(x64, 900, ehs64)


def test_state_dict_is_unchanged_while_applied():
    unet = small_motion_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    apply_tar(unet)
    x, ehs = motion_inputs(64)
    with torch.no_grad():
        unet(x, 900, ehs)
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    assert all(after[k].data_ptr() == p for k, p in pointers.items())  # no buffer was resized or replaced


@torch.no_grad()
def test_positions_are_computed_once_per_frames_device_and_dtype(monkeypatch):
    calls: list[int] = []
    original = FramePositionEmbedding._compute

    def counting(self, num_frames):
        calls.append(num_frames)
        return original(self, num_frames)

    monkeypatch.setattr(FramePositionEmbedding, "_compute", counting)
    unet = small_motion_unet()
    count = len(tables(unet))
    apply_tar(unet, timesteps="all")
    x, ehs = motion_inputs(64)
    first = unet(x, 900, ehs).sample
    unet(x, 800, ehs)
    assert calls == [64] * count
    x40, ehs40 = motion_inputs(40)
    unet(x40, 900, ehs40)
    assert calls == [64] * count + [40] * count
    unet.to(torch.float64)  # a new dtype: computed again, once
    out64 = unet(x.double(), 900, ehs.double()).sample
    unet(x.double(), 900, ehs.double())
    assert len(calls) == 3 * count
    torch.testing.assert_close(out64.float(), first, rtol=1e-3, atol=1e-4)


@torch.no_grad()
def test_a_newly_loaded_table_is_used_not_a_stale_cache():
    unet = small_motion_unet()
    extend_frame_positions(unet, "interpolate")
    module = next(iter(tables(unet).values()))
    probe = torch.zeros(1, 64, module.pe.shape[2])
    module(probe)
    state = {k: v * 2 if k.endswith("pos_embed.pe") else v for k, v in unet.state_dict().items()}
    unet.load_state_dict(state)  # copies into the same buffer
    torch.testing.assert_close(module(probe).double(), independent_interpolation(module.pe, 64), rtol=0, atol=2e-6)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["interpolate", "extrapolate"])
@pytest.mark.parametrize("make_copy", [copy.deepcopy, pickle_round_trip], ids=["deepcopy", "pickle"])
def test_copies_carry_their_own_positions(make_copy, mode):
    unet = small_motion_unet()
    extend_frame_positions(unet, mode)
    x, ehs = motion_inputs(64)
    expected = unet(x, 900, ehs).sample
    twin = make_copy(unet)
    assert frame_positions_state(twin) == frame_positions_state(unet)
    assert restore_frame_positions(unet)  # the original goes back to diffusers' limit; the copy keeps its mode
    assert torch.equal(twin(x, 900, ehs).sample, expected)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(64\)"):
        unet(x, 900, ehs)
    assert all(type(m) is FramePositionEmbedding for m in tables(twin).values())


@torch.no_grad()
def test_torch_compile_fullgraph_of_an_extended_model():
    unet = small_motion_unet()
    extend_frame_positions(unet, "interpolate")
    x, ehs = motion_inputs(48)
    eager = unet(x, 900, ehs).sample
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, 900, ehs).sample, eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ composition and pipelines
@torch.no_grad()
def test_remove_tar_restores_the_users_own_extension():
    unet = small_motion_unet()
    extend_frame_positions(unet, "extrapolate")
    before = frame_positions_state(unet)
    apply_tar(unet, positions="interpolate")
    assert set(frame_positions_state(unet).values()) == {"interpolate"}
    apply_tar(unet, positions="keep")  # re-applying replaces the first application, not the user's choice
    remove_tar(unet)
    assert frame_positions_state(unet) == before


def test_extend_and_restore_on_a_pipeline_cover_every_model():
    from vstar_kernels.diffusers.tiny import animatediff_pipeline

    pipe = animatediff_pipeline(*tiny_animatediff_unet("animatediff", (32, 64), layers_per_block=1))
    extended = extend_frame_positions(pipe)
    prefixes = {name.split(".")[0] for name in extended}
    assert prefixes == {"unet", "motion_adapter"} and set(extended.values()) == {ROWS}
    assert restore_frame_positions(pipe)
    assert not restore_frame_positions(pipe)
    assert set(frame_positions_state(pipe).values()) == {None}


def test_models_without_a_table_have_nothing_to_extend():
    assert extend_frame_positions(tiny_unet3d()) == {}
    assert not restore_frame_positions(tiny_unet3d())
    assert apply_tar(tiny_unet3d(), positions="extrapolate").position_tables == {}


@torch.no_grad()
def test_animatediff_pipeline_generates_past_the_table():
    from vstar_kernels.diffusers.tiny import animatediff_pipeline

    pipe = animatediff_pipeline(*tiny_animatediff_unet("animatediff", (32, 64), layers_per_block=1))
    apply_tar(pipe)
    video = pipe("a cat", num_frames=40, num_inference_steps=2, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 40, 3, 16, 16) and torch.isfinite(video).all()


# ---------------------------------------------------------------------- 128 frames on every family's layout
def _family_call(family: str, frames: int):
    """(unet, call) for a released layer structure (four levels where released, two layers per block), narrower."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 7, 32, generator=gen)
    if family == "unet3d":  # ModelScope / zeroscope: no positional embedding
        unet = tiny_unet3d((32, 64, 64, 64), layers_per_block=2)
        x = torch.randn(1, 4, frames, 8, 8, generator=gen)
        return unet, lambda: unet(x, 900, text).sample
    if family == "svd":  # frame index through a sinusoidal time embedding; image conditioning repeated per frame
        unet = tiny_svd_unet((32, 64, 64, 64), layers_per_block=2)
        x = torch.randn(1, frames, 8, 8, 8, generator=gen)
        return unet, lambda: unet(x, 900, text, added_time_ids=torch.tensor([[6.0, 127.0, 0.02]])).sample
    if family == "i2vgen":  # no positional embedding; fps conditioning
        unet = tiny_i2vgen_unet((32, 64, 64, 64), layers_per_block=2)
        x = torch.randn(1, 4, frames, 8, 8, generator=gen)
        image = torch.randn(1, 4, frames, 8, 8, generator=gen)
        return unet, lambda: unet(x, 900, fps=torch.tensor([16]), image_latents=image,
                                  image_embeddings=torch.randn(1, 32, generator=gen), encoder_hidden_states=text).sample
    unet = tiny_animatediff_unet(family)[0]
    x = torch.randn(1, unet.config.in_channels, frames, 8, 8, generator=gen)
    per_frame = text.repeat_interleave(frames, dim=0)
    extra = {}
    if family == "animatediff-sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=gen),
                                      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return unet, lambda: unet(x, 900, per_frame, **extra).sample


@torch.no_grad()
@pytest.mark.parametrize("family", ["unet3d", "svd", "i2vgen", "animatediff", "animatediff-sdxl", "pia"])
def test_128_frames_on_the_released_layout(family):
    unet, call = _family_call(family, 128)
    tables_ = tables(unet)
    if family in ("animatediff", "animatediff-sdxl", "pia"):
        assert tables_ and {m.pe.shape[1] for m in tables_.values()} == {ROWS}
    else:
        assert not tables_  # nothing in the UNet limits the frame count
    handle = apply_tar(unet, timesteps="all")
    assert handle.num_layers > 0 and len(handle.position_tables) == len(tables_)
    seen: list[int] = []
    for name in handle.layers:  # TAR really runs on every patched layer, at 128 frames
        unet.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    out = call()
    assert torch.isfinite(out).all() and out.shape[-2:] == (8, 8) and 128 in out.shape
    assert seen.count(128) == handle.num_layers and len(seen) == handle.num_layers
    assert all(isinstance(unet.get_submodule(n).processor, TARAttnProcessor) for n in handle.layers)


def test_released_adapter_tables_are_the_diffusers_sinusoid():
    """The tiny adapters keep the released 32-row sinusoid, so both modes apply to them."""
    for module in tables(small_motion_unet()).values():
        assert module.pe.shape[1] == ROWS
        torch.testing.assert_close(module.pe.double(), closed_form_sinusoid(ROWS, module.pe.shape[2]),
                                   rtol=0, atol=1e-5)
