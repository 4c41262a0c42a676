"""apply_tar / remove_tar on tiny random diffusers video UNets built from configs (offline, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention  # noqa: E402
from helpers import profile_softmax  # noqa: E402

from vstar_kernels import PRESETS, FrameProfile, TARAttnProcessor, apply_tar, remove_tar  # noqa: E402
from vstar_kernels.diffusers import tar_state  # noqa: E402
from vstar_kernels.reference import gaussian_delta  # noqa: E402


def unet3d():
    from vstar_kernels.diffusers.tiny import tiny_unet3d

    return tiny_unet3d()


def motion_unet():
    return motion_unet_and_adapter()[0]


def motion_unet_and_adapter():
    """AnimateDiff (SD1.5 + the v1.5 v2 adapter: 8 heads, 32 positions), two levels of one layer each."""
    from vstar_kernels.diffusers.tiny import tiny_animatediff_unet

    return tiny_animatediff_unet("animatediff", (32, 64), layers_per_block=1)


def svd_unet():
    from vstar_kernels.diffusers.tiny import tiny_svd_unet

    return tiny_svd_unet()


def i2vgen_unet():
    from vstar_kernels.diffusers.tiny import tiny_i2vgen_unet

    return tiny_i2vgen_unet()


MODELS = {"unet3d": unet3d, "motion": motion_unet, "svd": svd_unet, "i2vgen": i2vgen_unet}


def _expected_patched(unet, levels: set[int]) -> set[str]:
    """Independently from the structure: self-attention under a temporal container in down/up blocks."""
    num_up = len(unet.up_blocks)
    out = set()
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        parts = name.split(".")
        if parts[0] not in ("down_blocks", "up_blocks"):
            continue
        if not any(p in ("temp_attentions", "motion_modules", "temporal_transformer_blocks") for p in parts):
            continue
        level = int(parts[1]) if parts[0] == "down_blocks" else num_up - 1 - int(parts[1])
        if level in levels:
            out.add(name)
    return out


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", ["64D1", "64D1_32D8"])
def test_patched_layers_match_structure(model, preset):
    unet = MODELS[model]()
    levels = set(PRESETS[preset])
    handle = apply_tar(unet, preset)
    assert set(handle.layers) == _expected_patched(unet, levels)
    assert handle.num_layers > 0
    for name, (level, sigma) in handle.layers.items():
        assert sigma == PRESETS[preset][level]
        assert isinstance(unet.get_submodule(name).processor, TARAttnProcessor)
        assert not unet.get_submodule(name).is_cross_attention
        assert not name.startswith(("transformer_in", "mid_block", "image_latents_temporal_encoder"))


def test_no_temporal_attention_is_a_clear_error():
    unet2d = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(ValueError, match=r"no temporal self-attention.*TransformerTemporalModel"):
        apply_tar(unet2d)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "64D3"}, "unknown preset"),
        ({"preset": "64D1", "sigma": 1.0}, "either preset or sigma"),
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"preset": {5: 1.0}}, r"levels \[0, 1\], not \[5\]"),
        ({"timesteps": "sometimes"}, "timesteps must be"),
        ({"timesteps": (500, 100)}, r"t_lo <= t_hi"),
        ({"mode": "relatve"}, "mode must be one of"),
        ({"backend": "fast"}, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    unet = unet3d()
    before = dict(unet.attn_processors)
    with pytest.raises((ValueError, TypeError), match=match):
        apply_tar(unet, **kwargs)
    assert dict(unet.attn_processors) == before  # nothing patched


def _unet3d_inputs(frames=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, frames, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)


@torch.no_grad()
def test_round_trip_idempotence_and_state_dict():
    unet = unet3d()
    x, ehs = _unet3d_inputs()
    base = unet(x, 900, ehs).sample
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    names = {n for n, _ in unet.named_parameters()} | {n for n, _ in unet.named_buffers()}
    originals = dict(unet.attn_processors)

    apply_tar(unet, "64D1")
    first = unet(x, 900, ehs).sample
    handle = apply_tar(unet, "64D1_32D8", timesteps="all")  # replaces, never stacks
    assert tar_state(unet) is handle
    patched = {n.removesuffix(".processor") for n, p in unet.attn_processors.items() if isinstance(p, TARAttnProcessor)}
    assert patched == set(handle.layers)
    assert {n for n, _ in unet.named_parameters()} | {n for n, _ in unet.named_buffers()} == names
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert not torch.equal(first, base)

    assert remove_tar(unet) is True
    assert remove_tar(unet) is False
    assert all(originals[k] is v for k, v in unet.attn_processors.items())
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert torch.equal(unet(x, 900, ehs).sample, base)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_strength_zero_equals_no_tar(mode):
    unet = unet3d()
    x, ehs = _unet3d_inputs()
    base = unet(x, 900, ehs).sample
    apply_tar(unet, sigma=1.0, levels=(0, 1), strength=0.0, mode=mode, timesteps="all")
    # fp32 rounding only: the CPU extension's softmax uses a 20-ulp exp where SDPA uses its own
    torch.testing.assert_close(unet(x, 900, ehs).sample, base, rtol=1e-5, atol=1e-5)


class MaterialisingTARProcessor:
    """Test-only: the official method's order of operations, S and ΔA materialised (independent of the package)."""

    def __init__(self, sigma: float, strength: float = 1.0):
        self.sigma, self.strength = sigma, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        frames = hidden_states.shape[1]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        scores = torch.baddbmm(torch.zeros(q.shape[0], frames, frames), q, k.transpose(1, 2), beta=0, alpha=attn.scale)
        idx = torch.arange(frames, dtype=torch.float32)
        delta = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * self.sigma**2))
        scores = scores + self.strength * scores.max(dim=-1, keepdim=True).values * delta
        out = attn.batch_to_head_dim(torch.bmm(scores.softmax(dim=-1), v))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@torch.no_grad()
@pytest.mark.parametrize("frames", [16, 33])
def test_tar_equals_materialising_official_order(frames):
    unet = unet3d()
    x, ehs = _unet3d_inputs(frames)
    handle = apply_tar(unet, "64D1_32D8", strength=1.5, timesteps="all")
    fused = unet(x, 900, ehs).sample
    remove_tar(unet)
    for name, (_, sigma) in handle.layers.items():
        unet.get_submodule(name).set_processor(MaterialisingTARProcessor(sigma, 1.5))
    naive = unet(x, 900, ehs).sample
    torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused, unet3d()(x, 900, ehs).sample, atol=1e-3)  # TAR did something


def test_gaussian_of_the_test_processor_is_the_package_one():
    idx = torch.arange(9, dtype=torch.float64)
    manual = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * 8.0**2))
    torch.testing.assert_close(manual, gaussian_delta(9, sigma=8.0, dtype=torch.float64))


@torch.no_grad()
def test_step_window_switches_at_the_right_timesteps():
    unet = unet3d()
    x, ehs = _unet3d_inputs()
    steps = (999, 441, 440, 439, 300, 150, 10)
    plain = {t: unet(x, t, ehs).sample for t in steps}
    apply_tar(unet, "64D1_32D8", timesteps="all")
    always = {t: unet(x, t, ehs).sample for t in steps}
    assert all(not torch.equal(always[t], plain[t]) for t in steps)

    apply_tar(unet, "64D1_32D8")  # paper: on for t >= 440 (the noisiest 14/25 of 1000 training steps)
    for t in steps:
        out = unet(x, torch.tensor([t, t]), ehs).sample  # a batched (CFG-style) timestep tensor
        assert torch.equal(out, always[t] if t >= 440 else plain[t]), t
    apply_tar(unet, "64D1_32D8", timesteps=(100, 200))  # explicit inclusive range, keyword timestep
    for t in steps:
        out = unet(x, timestep=float(t), encoder_hidden_states=ehs).sample
        assert torch.equal(out, always[t] if 100 <= t <= 200 else plain[t]), t


@torch.no_grad()
def test_128_frames_single_pass_forward():
    unet = unet3d()
    x, ehs = _unet3d_inputs(frames=128)
    apply_tar(unet, "64D1_32D8", timesteps="all")
    out = unet(x[:1], 900, ehs[:1]).sample
    assert out.shape == (1, 4, 128, 8, 8) and torch.isfinite(out).all()


@torch.no_grad()
def test_motion_unet_forward_with_tar_matches_materialising():
    unet = motion_unet()
    frames = 16
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(2))
    ehs = torch.randn(frames, 7, 32, generator=torch.Generator().manual_seed(3))  # repeated per frame
    base = unet(x, 900, ehs).sample
    handle = apply_tar(unet, "64D1_32D8", timesteps="all")
    fused = unet(x, 900, ehs).sample
    remove_tar(unet)
    assert torch.equal(unet(x, 900, ehs).sample, base)
    for name, (_, sigma) in handle.layers.items():
        unet.get_submodule(name).set_processor(MaterialisingTARProcessor(sigma))
    torch.testing.assert_close(fused, unet(x, 900, ehs).sample, rtol=1e-4, atol=1e-5)


def test_processor_without_arguments_is_plain_attention():
    """IP-Adapter re-creates processors with no arguments: that must still be correct attention."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    x = torch.randn(3, 16, 32)
    from diffusers.models.attention_processor import AttnProcessor2_0

    expected = AttnProcessor2_0()(attn, x)
    torch.testing.assert_close(TARAttnProcessor()(attn, x), expected, rtol=1e-5, atol=1e-6)
    assert not isinstance(TARAttnProcessor(), torch.nn.Module)
    assert math.isclose(attn.scale, 8**-0.5)


# ------------------------------------------------------------------------------- pipelines and interplay
def _pipeline():
    from vstar_kernels.diffusers.tiny import text_to_video_pipeline

    return text_to_video_pipeline(unet3d())


def _record_tar_steps(unet) -> list[tuple[int, bool]]:
    """A pre-hook registered after apply_tar's: sees each UNet call's timestep and whether TAR was on."""
    seen: list[tuple[int, bool]] = []
    handle = tar_state(unet)
    unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((float(kwargs.get("timestep", args[1] if len(args) > 1 else -1)),
                                              handle.switch.active)),
        with_kwargs=True,
    )
    return seen


@torch.no_grad()
def test_paper_window_inside_a_real_pipeline_call():
    """25 DDIM steps with classifier-free guidance: TAR on for exactly the first 14 (the noisiest) steps."""
    pipe = _pipeline()
    kwargs = dict(num_inference_steps=25, num_frames=8, height=16, width=16, output_type="pt", guidance_scale=7.5)
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
    apply_tar(pipe, "64D1_32D8")  # the pipeline itself is accepted (its .unet is patched)
    seen = _record_tar_steps(pipe.unet)
    tar = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert len(seen) == 25
    assert [active for _, active in seen] == [True] * 14 + [False] * 11
    assert all(t >= 440 for t, active in seen if active) and all(t < 440 for t, active in seen if not active)
    assert not torch.equal(tar, plain)
    remove_tar(pipe)
    assert torch.equal(pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames, plain)


@torch.no_grad()
@pytest.mark.parametrize("call", ["set_attn_processor", "fuse_qkv_projections", "set_attention_slice"])
def test_calls_that_replace_processors_drop_tar_and_apply_after_works(call):
    """diffusers calls that re-create every processor drop TAR; remove_tar keeps their choice; apply_tar after works."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = unet3d()
    x, ehs = _unet3d_inputs()
    apply_tar(unet, "64D1_32D8", timesteps="all")
    tar_out = unet(x, 900, ehs).sample
    if call == "set_attn_processor":
        unet.set_attn_processor(AttnProcessor2_0())
    elif call == "fuse_qkv_projections":
        unet.fuse_qkv_projections()
    else:
        unet.set_attention_slice(1)
    assert not any(isinstance(p, TARAttnProcessor) for p in unet.attn_processors.values())
    replaced = dict(unet.attn_processors)
    remove_tar(unet)
    assert all(replaced[k] is v for k, v in unet.attn_processors.items())  # their choice is kept
    handle = apply_tar(unet, "64D1_32D8", timesteps="all")
    assert all(isinstance(unet.get_submodule(n).processor, TARAttnProcessor) for n in handle.layers)
    torch.testing.assert_close(unet(x, 900, ehs).sample, tar_out, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_materialised_processor_gives_the_same_video():
    from vstar_kernels.diffusers import MaterialisedTARProcessor

    unet = unet3d()
    x, ehs = _unet3d_inputs()
    apply_tar(unet, "64D1_32D8", timesteps="all")
    fused = unet(x, 900, ehs).sample
    handle = apply_tar(unet, "64D1_32D8", timesteps="all", processor=MaterialisedTARProcessor)
    assert all(type(unet.get_submodule(n).processor) is MaterialisedTARProcessor for n in handle.layers)
    torch.testing.assert_close(unet(x, 900, ehs).sample, fused, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="processor must be TARAttnProcessor"):
        apply_tar(unet, processor=object)


def test_attention_mask_runs_the_reference_with_the_mask(caplog, monkeypatch):
    monkeypatch.setattr(TARAttnProcessor, "_warned_mask", False)
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    x = torch.randn(2, 12, 32)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[:, 8:] = False  # the last 4 frames are padding
    proc = TARAttnProcessor(sigma=2.0, strength=1.0)
    with caplog.at_level("WARNING"):
        masked = proc(attn, x, attention_mask=keep)
    truncated = proc(attn, x[:, :8])  # same queries, keys restricted to the unmasked frames
    torch.testing.assert_close(masked[:, :8], truncated, rtol=1e-5, atol=1e-6)
    assert caplog.text.count("materialised reference") == 1  # logged once, not per call
    proc(attn, x, attention_mask=keep)
    assert caplog.text.count("materialised reference") == 1


def _full_size(name: str):
    """Full-size default configs on the meta device (no weights, no memory): the real block layouts."""
    with torch.device("meta"):
        if name == "zeroscope":
            return diffusers.UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64)
        if name == "i2vgen-xl":
            return diffusers.I2VGenXLUNet()
        if name == "animatediff":
            return diffusers.UNetMotionModel.from_unet2d(diffusers.UNet2DConditionModel(cross_attention_dim=768),
                                                         diffusers.MotionAdapter())
        return diffusers.UNetSpatioTemporalConditionModel()


@pytest.mark.parametrize(("name", "per_level"), [("zeroscope", 10), ("i2vgen-xl", 10), ("animatediff", 10), ("svd", 5)])
def test_full_size_layouts(name, per_level):
    """Each real layout: both temporal self-attention layers of every temporal transformer at a level, down and up."""
    unet = _full_size(name)
    for preset in ("64D1", "64D1_32D8"):
        handle = apply_tar(unet, preset)
        levels = set(PRESETS[preset])
        assert set(handle.layers) == _expected_patched(unet, levels)
        assert handle.num_layers == per_level * len(levels)


@torch.no_grad()
def test_paper_window_follows_the_schedule_for_svd_continuous_timesteps():
    """SVD's scheduler passes EDM timesteps (0.25 ln sigma): "paper" is the first 14/25 of its steps, not t >= 440."""
    from types import SimpleNamespace

    scheduler = diffusers.EulerDiscreteScheduler(
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    unet = svd_unet()
    pipe = SimpleNamespace(unet=unet, scheduler=scheduler)  # what apply_tar reads of a pipeline
    apply_tar(pipe, "64D1_32D8")
    seen = _record_tar_steps(unet)
    scheduler.set_timesteps(25)
    assert float(scheduler.timesteps.max()) < 10  # continuous timesteps: a 440 threshold would never fire
    x = torch.randn(1, 8, 8, 8, 8)  # (batch, frames, channels, height, width)
    for t in scheduler.timesteps:
        unet(x, t, encoder_hidden_states=torch.randn(1, 1, 32), added_time_ids=torch.randn(1, 3))
    assert [active for _, active in seen] == [True] * 14 + [False] * 11


@torch.no_grad()
def test_animatediff_pipeline_and_free_noise():
    """AnimateDiffPipeline offline: TAR changes the video, remove restores it exactly; enable_free_noise rebuilds the
    motion blocks with fresh processors (dropping TAR), and apply_tar after it patches them again."""
    from vstar_kernels.diffusers.tiny import animatediff_pipeline

    pipe = animatediff_pipeline(*motion_unet_and_adapter())
    kwargs = dict(num_inference_steps=3, num_frames=16, height=16, width=16, output_type="pt")

    def run():
        return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = run()
    handle = apply_tar(pipe, "64D1_32D8", timesteps="all")
    with_tar = run()
    assert not torch.equal(with_tar, plain)
    remove_tar(pipe)
    assert torch.equal(run(), plain)

    apply_tar(pipe, "64D1_32D8", timesteps="all")
    pipe.enable_free_noise(context_length=8, context_stride=4)
    assert not any(isinstance(p, TARAttnProcessor) for p in pipe.unet.attn_processors.values())
    free_noise = run()
    again = apply_tar(pipe, "64D1_32D8", timesteps="all")
    assert set(again.layers) == set(handle.layers)
    free_noise_tar = run()
    assert torch.isfinite(free_noise_tar).all() and not torch.equal(free_noise_tar, free_noise)


@torch.no_grad()
def test_stable_video_diffusion_pipeline_paper_window():
    """StableVideoDiffusionPipeline offline, 25 EDM steps with CFG: TAR on for the first 14 steps, the video changes,
    remove_tar gives back the original video exactly."""
    from vstar_kernels.diffusers.tiny import svd_pipeline

    pipe = svd_pipeline(svd_unet())
    image = torch.rand(1, 3, 32, 32)
    kwargs = dict(num_inference_steps=25, num_frames=8, height=32, width=32, output_type="pt", decode_chunk_size=8)

    def run():
        return pipe(image, generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = run()
    handle = apply_tar(pipe, "64D1_32D8")
    assert handle.num_layers == 6  # 3 per level in this 2-level tiny SVD layout
    seen = _record_tar_steps(pipe.unet)
    with_tar = run()
    assert [active for _, active in seen] == [True] * 14 + [False] * 11
    assert not torch.equal(with_tar, plain)
    remove_tar(pipe)
    assert torch.equal(run(), plain)


@torch.no_grad()
def test_i2vgen_xl_pipeline():
    """I2VGenXLPipeline offline (deprecated in diffusers, still shipped). It samples the image latents from the global
    RNG, so each run reseeds it."""
    from vstar_kernels.diffusers.tiny import i2vgen_pipeline

    pipe = i2vgen_pipeline(i2vgen_unet())
    image = torch.rand(1, 3, 32, 32)
    kwargs = dict(num_inference_steps=3, num_frames=8, height=32, width=32, output_type="pt", decode_chunk_size=8,
                  target_fps=16, clip_skip=None)  # clip_skip=None: its clip-skip path predates transformers 5

    def run():
        torch.manual_seed(0)
        return pipe("a cat", image, generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = run()
    assert torch.equal(run(), plain)
    apply_tar(pipe, "64D1_32D8", timesteps="all")
    with_tar = run()
    assert torch.isfinite(with_tar).all() and not torch.equal(with_tar, plain)
    remove_tar(pipe)
    assert torch.equal(run(), plain)


def _tiny_ip_adapter_state_dict(unet, clip_dim: int = 24) -> dict:
    """An IP-Adapter checkpoint for ``unet`` with random weights: image projection plus to_k_ip/to_v_ip for every
    spatial cross-attention, numbered the way diffusers reads them."""
    cross = unet.config.cross_attention_dim
    widths = unet.config.block_out_channels
    ip_layers = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        part, index = name.split(".")[:2]
        hidden = widths[-1] if part == "mid_block" else (widths if part == "down_blocks" else widths[::-1])[int(index)]
        ip_layers[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross)
        ip_layers[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross)
        key_id += 2
    image_proj = {"proj.weight": torch.randn(4 * cross, clip_dim), "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


@torch.no_grad()
def test_load_ip_adapter_drops_tar_remove_restores_and_apply_after_works():
    """load_ip_adapter re-creates every non-cross-attention processor as ``type(p)()``: our processor without
    arguments is plain attention, so TAR is off (not broken). remove_tar then restores the originals there and
    keeps the IP-Adapter processors; apply_tar after load_ip_adapter patches the same layers and TAR is on."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from vstar_kernels.diffusers.tiny import animatediff_pipeline

    pipe = animatediff_pipeline(*motion_unet_and_adapter())
    unet = pipe.unet
    originals = dict(unet.attn_processors)
    embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(1))]  # (uncond, cond) image embeddings

    def run():
        return pipe("a cat", num_inference_steps=2, num_frames=16, height=16, width=16, output_type="pt",
                    ip_adapter_image_embeds=embeds, generator=torch.Generator().manual_seed(0)).frames

    handle = apply_tar(pipe, "64D1_32D8", timesteps="all")
    pipe.load_ip_adapter(_tiny_ip_adapter_state_dict(unet), subfolder="", weight_name="", image_encoder_folder=None)
    procs = unet.attn_processors
    assert all(type(procs[f"{n}.processor"]) is TARAttnProcessor and procs[f"{n}.processor"].sigma is None
               for n in handle.layers)  # TAR dropped: re-created without arguments
    with_ip = run()
    ip_procs = {k: v for k, v in procs.items() if isinstance(v, IPAdapterAttnProcessor2_0)}
    assert ip_procs

    remove_tar(pipe)
    after = unet.attn_processors
    assert all(after[f"{n}.processor"] is originals[f"{n}.processor"] for n in handle.layers)
    assert all(after[k] is v for k, v in ip_procs.items())
    assert torch.equal(run(), with_ip)  # plain attention either way

    again = apply_tar(pipe, "64D1_32D8", timesteps="all")
    assert set(again.layers) == set(handle.layers)
    assert all(unet.attn_processors[k] is v for k, v in ip_procs.items())
    with_ip_tar = run()
    assert torch.isfinite(with_ip_tar).all() and not torch.equal(with_ip_tar, with_ip)


def test_handles_print_as_one_readable_line():
    """``print(handle)`` says what was patched in one line: counts per level and sigma, the window with round
    bounds (the paper's 440, not 439.99999999999994), the position tables; the layer paths stay in ``.layers``."""
    from vstar_kernels.diffusers import tiny

    unet, _ = tiny.tiny_animatediff_unet("animatediff")
    handle = apply_tar(unet)
    text = repr(handle)
    assert "\n" not in text and "999" not in text and len(text) < 300
    n0 = sum(level == 0 for level, _ in handle.layers.values())
    assert text.startswith(f"TARHandle({handle.num_layers} layers {{level 0: sigma 1 ({n0} layers), level 1: sigma 8 ")
    assert "window=StepWindow(first 56% of steps, else t >= 440)" in text
    assert f"{len(handle.position_tables)} position tables of 32 rows" in text
    remove_tar(unet)
    assert ("{level 0: sigma 2.5 (" in repr(apply_tar(unet, sigma=2.5, timesteps=(0, 500), positions="keep"))
            and "window=StepWindow(0 <= t <= 500), positions='keep'" in repr(tar_state(unet)))

    pipe = tiny.wan_pipeline()
    text = repr(apply_tar(pipe, sigma=1.5, blocks=[1], timesteps="all"))
    assert text == ("DiTTARHandle(1 layers (1 on transformer), sigma=1.5 latent frames, mode='relative', strength=1, "
                    "window=StepWindow(every t), blocks=[1])")


class MaterialisingProfileProcessor:
    """Test-only: temporal attention with a frame-distance profile, every term written out from the formula
    (:func:`helpers.profile_softmax`), independent of the package's processors and kernels."""

    def __init__(self, profile: FrameProfile):
        self.profile = profile

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch, frames, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(batch, frames, attn.heads, -1).transpose(1, 2).double()
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        probs = profile_softmax(q @ k.transpose(-1, -2) * attn.scale, list(range(frames)), self.profile)
        out = (probs @ v).transpose(1, 2).reshape(batch, frames, -1).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@torch.no_grad()
@pytest.mark.parametrize("frames", [16, 33])
def test_animatediff_unet_with_a_profile_matches_the_materialised_formula(frames):
    """apply_tar(unet, preset, profile=...) on AnimateDiff's motion UNet: each level's band plus a per-head bias
    table, a window with a sink frame and a decay, equal to the formula materialised per layer."""
    unet = motion_unet()
    heads = next(m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention is False).heads
    bias = torch.randn(heads, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bias[-1, 3] = -math.inf
    profile = FrameProfile.table(bias=bias) + FrameProfile.window(5, sink_frames=2) + FrameProfile.decay_beyond(3, 0.8)
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(2))
    ehs = torch.randn(frames, 7, 32, generator=torch.Generator().manual_seed(3))
    base = unet(x, 900, ehs).sample if frames <= 32 else None  # diffusers' own tables hold 32 frames
    handle = apply_tar(unet, "64D1_32D8", profile=profile, timesteps="all")
    assert handle.profile is profile and "profile=FrameProfile(" in repr(handle)
    fused = unet(x, 900, ehs).sample
    for name, (_, sigma) in handle.layers.items():  # TAR's frame-position tables stay (33 frames > 32 rows)
        unet.get_submodule(name).set_processor(MaterialisingProfileProcessor(FrameProfile.gaussian(sigma) + profile))
    torch.testing.assert_close(fused, unet(x, 900, ehs).sample, rtol=1e-4, atol=1e-5)
    if frames <= 32:
        assert not torch.allclose(fused, base, atol=1e-3)


@torch.no_grad()
def test_a_unet_runs_a_profile_alone_or_refuses_two_bands():
    """Without a preset or sigma the profile runs alone on ``levels`` (default level 0); a profile with a band beside
    a preset, strength= beside a lone profile and UltraViCo's transformer preset raise, changing nothing."""
    unet = unet3d()
    x, ehs = _unet3d_inputs()
    profile = FrameProfile.gaussian(2.0, 0.5) + FrameProfile.window(3)
    handle = apply_tar(unet, profile=profile, timesteps="all")
    assert {level for level, _ in handle.layers.values()} == {0}
    assert all(unet.get_submodule(name).processor.profile is profile for name in handle.layers)
    fused = unet(x, 900, ehs).sample
    remove_tar(unet)
    for name in handle.layers:
        unet.get_submodule(name).set_processor(MaterialisingProfileProcessor(profile))
    torch.testing.assert_close(fused, unet(x, 900, ehs).sample, rtol=1e-4, atol=1e-5)
    fresh = unet3d()
    before = dict(fresh.attn_processors)
    for kwargs, match in [(dict(preset="64D1", profile=profile), "at most one band"),
                          (dict(profile=FrameProfile.window(3), strength=2.0), "strength= and mode= shape the band"),
                          (dict(preset="ultravico"), "video transformer preset")]:
        with pytest.raises(ValueError, match=match):
            apply_tar(fresh, **kwargs)
        assert dict(fresh.attn_processors) == before
