"""TAR on video diffusion transformers (Wan, CogVideoX, LTX-Video, HunyuanVideo), built offline from their released
configurations, narrowed.

The reference is independent of vstar-kernels' routing and kernels: the *unpatched* model runs with a
TorchFunctionMode that, inside each self-attention module only, replaces ``scaled_dot_product_attention`` by a
float64 materialised softmax whose bias is built here from explicit per-token latent frames (text tokens: none).
Every block's self-attention output and the model output must match the patched model's.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import re
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers")

from helpers import profile_softmax

from vstar_kernels import FrameProfile
from vstar_kernels.diffusers import apply_tar, remove_tar, tar_state, tiny
from vstar_kernels.diffusers.dit.processor import DiTTARProcessor


@dataclass
class Case:
    """One model: builder, forward kwargs, the self-attention modules and each token's latent frame."""

    name: str
    build: object
    inputs: object  # model -> forward kwargs
    frames: object  # sequence length -> list of frame or None per token
    attention: str  # attribute of a block's self-attention


def _wan_inputs(model, batch=1):
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 16, 5, 8, 12, generator=gen), timestep=torch.tensor([700] * batch),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen))


def _cog_inputs(model, batch=1):
    gen = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(batch, 4, 16, 8, 10, generator=gen),
                encoder_hidden_states=torch.randn(batch, 226, 32, generator=gen), timestep=torch.tensor([700] * batch),
                image_rotary_emb=tiny.cogvideox_rotary_embedding(model, 4, 8, 10))


def _ltx_inputs(model, batch=1):
    gen = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(batch, 4 * 3 * 5, 128, generator=gen),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen), timestep=torch.tensor([700] * batch),
                encoder_attention_mask=torch.ones(batch, 7), num_frames=4, height=3, width=5)


def _hunyuan_inputs(model, batch=1):
    gen = torch.Generator().manual_seed(4)
    mask = torch.ones(batch, 9)
    mask[0, 6:] = 0  # padded text, as the pipeline pads prompts
    if batch > 1:
        mask[1, 4:] = 0  # a different valid length per batch element
    return dict(hidden_states=torch.randn(batch, 16, 3, 8, 6, generator=gen), timestep=torch.tensor([700] * batch),
                encoder_hidden_states=torch.randn(batch, 9, 32, generator=gen), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 8, generator=gen), guidance=torch.tensor([3.0] * batch))


def _frames(video_frames: int, per_frame: int, text: int, text_first: bool):
    def frames(length: int) -> list[int | None]:
        video = [t // per_frame for t in range(video_frames * per_frame)]
        assert length == len(video) + text, (length, len(video), text)
        return [None] * text + video if text_first else video + [None] * text

    return frames


CASES = {
    # Wan: 5 latent frames of (8/2)(12/2) patches, no text in self-attention
    "wan": Case("wan", tiny.tiny_wan_transformer, _wan_inputs, _frames(5, 24, 0, False), "attn1"),
    # CogVideoX: 226 text tokens first, then 4 frames of (8/2)(10/2)
    "cogvideox": Case("cogvideox", tiny.tiny_cogvideox_transformer, _cog_inputs, _frames(4, 20, 226, True), "attn1"),
    # LTX: 4 frames of 3 x 5 tokens (patch 1), no text in self-attention
    "ltx": Case("ltx", tiny.tiny_ltx_transformer, _ltx_inputs, _frames(4, 15, 0, False), "attn1"),
    # HunyuanVideo: 3 frames of (8/2)(6/2) patches, then 9 text tokens (padding masked)
    "hunyuan": Case("hunyuan", tiny.tiny_hunyuan_transformer, _hunyuan_inputs, _frames(3, 12, 9, False), "attn"),
}


def materialised_tar(q, k, v, frames, *, sigma=None, strength=1.0, mode="relative", profile=None, attn_mask=None,
                     scale=None):
    """(batch, heads, tokens, dim) attention with the frame-distance band (or a FrameProfile's terms, written out
    here from the formula), materialised in float64."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = q64 @ k64.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    if profile is not None:
        return (profile_softmax(scores, frames, profile) @ v64).to(q.dtype)
    band = torch.tensor([[0.0 if a is None or b is None else math.exp(-((a - b) ** 2) / (2 * sigma**2))
                          for b in frames] for a in frames], dtype=torch.float64)
    coeff = strength * scores.amax(-1, keepdim=True) if mode == "relative" else strength
    return (torch.softmax(scores + coeff * band, -1) @ v64).to(q.dtype)


class ReferenceAttention(TorchFunctionMode):
    """Inside the self-attention modules (``inside`` is set by hooks), SDPA becomes :func:`materialised_tar`."""

    def __init__(self, case: Case, **tar) -> None:
        super().__init__()
        self.case, self.tar, self.inside, self.calls = case, tar, False, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.inside:
            names = ("query", "key", "value")
            q, k, v = (*args[:3], *(kwargs.pop(n) for n in names[len(args[:3]):]))
            self.calls += 1
            return materialised_tar(q, k, v, self.case.frames(q.shape[2]), attn_mask=kwargs.get("attn_mask"),
                                    scale=kwargs.get("scale"), **self.tar)
        return func(*args, **kwargs)


def self_attention_modules(model, case: Case) -> dict[str, torch.nn.Module]:
    """Each transformer block's self-attention (not HunyuanVideo's text refiner, not cross-attention)."""
    pattern = re.compile(rf"(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.{case.attention}")
    return {name: module for name, module in model.named_modules() if pattern.fullmatch(name)}


def run_recording(model, case: Case, inputs: dict, mode: ReferenceAttention | None = None):
    """(model output, {module path: its output}) of one forward."""
    outputs, handles = {}, []
    for name, module in self_attention_modules(model, case).items():
        def pre(_m, _a, mode=mode):
            if mode is not None:
                mode.inside = True

        def post(_m, _a, out, name=name, mode=mode):
            if mode is not None:
                mode.inside = False
            outputs[name] = out[0] if isinstance(out, tuple) else out

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            if mode is None:
                result = model(**inputs).sample
            else:
                with mode:
                    result = model(**inputs).sample
    finally:
        for h in handles:
            h.remove()
    return result, outputs


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.mark.parametrize(("mode", "sigma", "strength"), [("relative", 2.0, 1.0), ("absolute", 0.7, 2.0)])
def test_every_block_matches_the_frame_distance_reference(case, mode, sigma, strength):
    model = case.build()
    inputs = case.inputs(model)
    reference = ReferenceAttention(case, sigma=sigma, strength=strength, mode=mode)
    expected, expected_blocks = run_recording(model, case, inputs, reference)
    blocks = self_attention_modules(model, case)
    assert reference.calls == len(blocks) >= 2, "the reference must replace every self-attention call"

    handle = apply_tar(model, sigma=sigma, strength=strength, mode=mode, timesteps="all")
    assert set(handle.layers) == set(blocks)
    out, blocks_out = run_recording(model, case, inputs)
    for name in blocks:
        torch.testing.assert_close(blocks_out[name], expected_blocks[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # and the band mattered: plain attention is far from it
    plain = copy.deepcopy(model)
    remove_tar(plain)
    assert (run_recording(plain, case, inputs)[0] - expected).abs().max() > 1e-3


def test_strength_zero_equals_diffusers(case):
    model = case.build()
    inputs = case.inputs(model)
    expected, _ = run_recording(model, case, inputs)
    apply_tar(model, sigma=2.0, strength=0.0, timesteps="all")
    torch.testing.assert_close(run_recording(model, case, inputs)[0], expected, rtol=1e-5, atol=1e-5)


def test_remove_restores_processors_and_output_exactly(case):
    model = case.build()
    inputs = case.inputs(model)
    before = {name: module.processor for name, module in self_attention_modules(model, case).items()}
    expected, _ = run_recording(model, case, inputs)
    apply_tar(model, sigma=1.0, timesteps="all")
    installed = [m.processor for m in self_attention_modules(model, case).values()]
    assert all(isinstance(p, DiTTARProcessor) for p in installed)
    run_recording(model, case, inputs)
    routes = {p._route.module for p in installed}
    assert len(routes) == len({type(p.original) for p in installed}) and routes <= set(sys.modules)  # one per class
    assert remove_tar(model) and not remove_tar(model)
    assert tar_state(model) is None
    assert all(m.processor is before[n] for n, m in self_attention_modules(model, case).items())
    assert not model._forward_pre_hooks
    assert torch.equal(run_recording(model, case, inputs)[0], expected)


def test_outside_the_step_window_is_bit_identical(case):
    model = case.build()
    inputs = dict(case.inputs(model), timestep=torch.tensor([100]))
    expected, _ = run_recording(model, case, inputs)
    apply_tar(model, sigma=2.0)  # "paper": on for t >= 440 of 1000 without a scheduler
    assert torch.equal(run_recording(model, case, inputs)[0], expected)
    inputs["timestep"] = torch.tensor([900])
    assert not torch.equal(run_recording(model, case, inputs)[0], run_recording(case.build(), case, inputs)[0])


def test_blocks_selects_blocks(case):
    model = case.build()
    names = list(self_attention_modules(model, case))
    handle = apply_tar(model, sigma=2.0, blocks=[-1])
    assert list(handle.layers) == [names[-1]]
    modules = self_attention_modules(model, case)
    assert isinstance(modules[names[-1]].processor, DiTTARProcessor)
    assert not any(isinstance(modules[n].processor, DiTTARProcessor) for n in names[:-1])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(preset="64D1_32D8"), ValueError, "preset= applies to video UNets"),
    (dict(sigma=2.0, levels=(0,)), ValueError, "levels= applies"),
    (dict(), ValueError, "needs sigma="),
    (dict(sigma=2.0, blocks=[99]), ValueError, "out of range"),
    (dict(sigma=2.0, blocks=3), TypeError, "sequence of block indices"),
    (dict(sigma=2.0, blocks=[0, 0]), ValueError, "twice"),
    (dict(sigma=0.0), ValueError, "sigma"),
    (dict(sigma=2.0, mode="banded"), ValueError, "mode"),
    (dict(sigma=2.0, timesteps="sometimes"), ValueError, "timesteps"),
])
def test_bad_arguments_change_nothing(kwargs, error, match):
    model = CASES["wan"].build()
    before = [m.processor for m in self_attention_modules(model, CASES["wan"]).values()]
    with pytest.raises(error, match=match):
        apply_tar(model, **kwargs)
    assert [m.processor for m in self_attention_modules(model, CASES["wan"]).values()] == before
    assert tar_state(model) is None and not model._forward_pre_hooks


def test_a_foreign_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = CASES["wan"].build()
    model.blocks[1].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(TypeError, match="AttnProcessor2_0"):
        apply_tar(model, sigma=2.0)
    assert not isinstance(model.blocks[0].attn1.processor, DiTTARProcessor)


def test_hunyuan_per_element_text_padding():
    """Batch of two with different valid text lengths: the key-padding mask splits the batch."""
    case = CASES["hunyuan"]
    model = case.build()
    inputs = _hunyuan_inputs(model, batch=2)
    reference = ReferenceAttention(case, sigma=1.5, strength=1.0, mode="relative")
    expected, _ = run_recording(model, case, inputs, reference)
    apply_tar(model, sigma=1.5, timesteps="all")
    torch.testing.assert_close(run_recording(model, case, inputs)[0], expected, rtol=1e-4, atol=1e-4)


def test_ltx_needs_its_token_grid():
    case = CASES["ltx"]
    model = case.build()
    apply_tar(model, sigma=2.0, timesteps="all")
    inputs = dict(case.inputs(model), num_frames=None)
    with pytest.raises(ValueError, match="num_frames, height and width"):
        run_recording(model, case, inputs)


def test_layout_from_geometry_and_mismatch():
    """The op's layout per text position; a sequence that is not frames x patches (plus text) is refused, never
    mis-banded."""
    from vstar_kernels.diffusers.dit.processor import DiTState
    from vstar_kernels.diffusers.dit.video_transformers import FrameGeometry

    state = DiTState(geometry=FrameGeometry(frames=3, tokens_per_frame=10))
    model = CASES["wan"].build()
    original = model.blocks[0].attn1.processor

    def processor(text):
        return DiTTARProcessor(original, sigma=1.0, strength=1.0, mode="relative", backend="auto", text=text,
                               state=state)

    assert processor("none").layout(30, 30) == dict(tokens_per_frame=10, video_start=0, video_tokens=30)
    assert processor("first").layout(256, 256) == dict(tokens_per_frame=10, video_start=226, video_tokens=None)
    assert processor("last").layout(39, 39) == dict(tokens_per_frame=10, video_start=0, video_tokens=30)
    for text, lengths in (("none", (31, 31)), ("first", (29, 29)), ("last", (39, 35))):
        with pytest.raises(ValueError, match="video tokens"):
            processor(text).layout(*lengths)
    with pytest.raises(RuntimeError, match="geometry"):
        DiTTARProcessor(original, sigma=1.0, strength=1.0, mode="relative", backend="auto", text="none",
                        state=DiTState()).layout(30, 30)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_backends(backend):
    case = CASES["cogvideox"]
    model = case.build()
    inputs = case.inputs(model)
    expected, _ = run_recording(model, case, inputs, ReferenceAttention(case, sigma=2.0, strength=1.0,
                                                                        mode="relative"))
    apply_tar(model, sigma=2.0, timesteps="all", backend=backend)
    torch.testing.assert_close(run_recording(model, case, inputs)[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [dict(sigma=2.0), dict(profile=FrameProfile.gaussian(2.0) + FrameProfile.window(
    2, sink_frames=1) + FrameProfile.table(bias=torch.tensor([0.0, 0.3, -0.2])))], ids=["sigma", "profile"])
def test_copies_pickles_and_to_keep_tar(bias):
    """deepcopy, pickling and .to(float64) of a patched model keep TAR (a profile's tables travel with it)."""
    case = CASES["wan"]
    model = case.build()
    inputs = case.inputs(model)
    apply_tar(model, timesteps="all", **bias)
    expected, _ = run_recording(model, case, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).to(torch.float64)):
        out, _ = run_recording(clone, case, {k: v.to(clone.dtype) if v.is_floating_point() else v
                                             for k, v in inputs.items()})
        torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-4)
        assert tar_state(clone) is not None and remove_tar(clone)
    assert tar_state(model) is not None  # the original keeps its own


@pytest.mark.parametrize("bias", [dict(sigma=2.0), dict(profile=FrameProfile.window(2, sink_frames=1)
                                                          + FrameProfile.decay_beyond(1, 0.8))],
                         ids=["sigma", "profile"])
def test_torch_compile_fullgraph(bias):
    torch._dynamo.reset()
    case = CASES["wan"]
    model = case.build()
    inputs = case.inputs(model)
    apply_tar(model, timesteps="all", **bias)
    expected, _ = run_recording(model, case, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["wan", "ltx", "hunyuan"])
@pytest.mark.parametrize("regional", [False, True], ids=["whole", "repeated-blocks"])
def test_compiled_before_any_eager_call(name, regional):
    """diffusers' recipe (patch, compile, call) with no eager call first, whole-model ``fullgraph=True`` and regional
    ``compile_repeated_blocks``: the window closing between calls recompiles nothing, outputs equal eager.
    HunyuanVideo (whose forward always builds a boolean text mask) runs a batch of two elements with different text
    lengths: the op's varlen keys, traced without a host sync. (diffusers' own test_compile_works_with_aot,
    test_torch_compile_recompilation_and_graph_break and test_torch_compile_repeated_blocks patterns.)"""
    torch._dynamo.reset()
    case = CASES[name]
    model = case.build()
    apply_tar(model, sigma=2.0)  # "paper" on a bare transformer: on at t >= 440
    batch = 2 if name == "hunyuan" else 1
    inputs_of = (lambda m: _hunyuan_inputs(m, batch=2)) if name == "hunyuan" else case.inputs
    calls = {t: {**inputs_of(model), "timestep": torch.tensor([t] * batch)} for t in (700, 100)}
    if regional:
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        runner = model
    else:
        runner = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = {t: runner(**inputs).sample for t, inputs in calls.items()}
        again = runner(**calls[700]).sample
    torch._dynamo.reset()
    with torch.no_grad():
        eager = {t: model(**inputs).sample for t, inputs in calls.items()}
    for t in calls:
        torch.testing.assert_close(got[t], eager[t], rtol=1e-5, atol=1e-5, msg=f"t={t}")
    torch.testing.assert_close(again, eager[700], rtol=1e-5, atol=1e-5)
    remove_tar(model)
    with torch.no_grad():
        plain = {t: model(**inputs).sample for t, inputs in calls.items()}
    assert torch.equal(eager[100], plain[100]) and not torch.allclose(eager[700], plain[700], atol=1e-5)  # on, off


def test_wan_pipeline_end_to_end():
    pipe = tiny.wan_pipeline()
    kwargs = dict(prompt="w3 w4 w5", negative_prompt="w6", height=32, width=32, num_frames=17, num_inference_steps=3,
                  output_type="pt", max_sequence_length=16)

    def run():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames

    baseline = run()
    handle = apply_tar(pipe, sigma=1.0)
    assert handle.num_layers == len(pipe.transformer.blocks) and tar_state(pipe) is handle
    calls = []
    for module in self_attention_modules(pipe.transformer, CASES["wan"]).values():
        module.register_forward_hook(lambda *a: calls.append(handle.state().switch.active))
    with_tar = run()
    assert with_tar.shape == baseline.shape == (1, 17, 3, 32, 32) and torch.isfinite(with_tar).all()
    # "paper": TAR on for the first round(0.56 * 3) = 2 of 3 steps (CFG runs the transformer twice per step)
    per_step = 2 * len(pipe.transformer.blocks)
    assert calls == [True] * (2 * per_step) + [False] * per_step
    assert not torch.equal(with_tar, baseline)
    # 17 frames -> 5 latent frames (4x temporal VAE); 32 px -> 4 latent (8x) -> 2 x 2 patches
    assert handle.state().geometry.frames == 5 and handle.state().geometry.tokens_per_frame == 4
    assert remove_tar(pipe)
    assert torch.equal(run(), baseline)


def test_wan22_pipeline_patches_both_experts():
    """Wan 2.2 A14B runs two transformers (high-noise and low-noise experts): apply_tar on the pipeline patches both,
    tar_state / remove_tar cover both."""
    pipe = tiny.wan_pipeline()
    pipe.register_modules(transformer_2=tiny.tiny_wan_transformer())
    pipe.register_to_config(boundary_ratio=0.5)
    handle = apply_tar(pipe, sigma=1.0, blocks=[0])
    assert set(handle.layers) == {"transformer.blocks.0.attn1", "transformer_2.blocks.0.attn1"}
    assert tar_state(pipe.transformer) is handle and tar_state(pipe.transformer_2) is handle
    assert handle.state("transformer") is not handle.state("transformer_2")  # each expert's own switch
    frames = pipe("w3", height=32, width=32, num_frames=9, num_inference_steps=2, output_type="pt",
                  max_sequence_length=8, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(frames).all()
    assert remove_tar(pipe)
    assert not any(isinstance(m.processor, DiTTARProcessor) for t in (pipe.transformer, pipe.transformer_2)
                   for m in t.modules() if hasattr(m, "processor"))


# ------------------------------------------------------------------------------------------ frame-distance profiles
def _profile_for(model, case: Case, mode: str) -> FrameProfile:
    """A band, per-head bias tables (one -inf distance for head 0), a window with a sink frame and a decay."""
    heads = next(iter(self_attention_modules(model, case).values())).heads
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(heads, 4, generator=gen, dtype=torch.float64)
    bias[0, 2] = -math.inf
    return (FrameProfile.gaussian(1.0, 1.5, mode) + FrameProfile.table(bias=bias) + FrameProfile.window(2, 1)
            + FrameProfile.decay_beyond(1, 0.7))


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_a_profile_matches_the_materialised_formula(case, mode):
    """apply_tar(profile=...) on every block equals the unpatched model with a float64 materialised attention of
    the formula (text tokens unbiased, HunyuanVideo's padded text masked)."""
    model = case.build()
    inputs = case.inputs(model, batch=2)
    profile = _profile_for(model, case, mode)
    reference_mode = ReferenceAttention(case, profile=profile)
    expected, expected_blocks = run_recording(model, case, inputs, reference_mode)
    assert reference_mode.calls == len(expected_blocks)
    handle = apply_tar(model, profile=profile, timesteps="all")
    assert handle.profile is profile and handle.sigma == 1.0
    got, got_blocks = run_recording(model, case, inputs)
    for name in expected_blocks:
        torch.testing.assert_close(got_blocks[name], expected_blocks[name], rtol=2e-4, atol=2e-5, msg=name)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5)
    baseline, _ = run_recording(case.build(), case, inputs)
    assert not torch.allclose(got, baseline, atol=1e-4)  # the profile did something
    assert remove_tar(model)
    torch.testing.assert_close(run_recording(model, case, inputs)[0], baseline, rtol=0, atol=0)


def test_profile_arguments():
    """sigma adds a band to a profile; strength/mode without sigma, two bands, a UNet preset on a transformer and a
    profile of the wrong type raise before anything is patched."""
    model = tiny.tiny_wan_transformer()
    window = FrameProfile.window(2)
    handle = apply_tar(model, sigma=2.0, strength=0.5, profile=window)
    assert (handle.profile.sigma, handle.profile.strength, handle.profile.radius) == (2.0, 0.5, 2)
    assert "window(radius=2" in repr(handle)
    remove_tar(model)
    plain = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    for kwargs, error, match in [
        (dict(profile=window, strength=2.0), ValueError, "strength= and mode= shape the band of sigma="),
        (dict(profile=FrameProfile.gaussian(1.0), sigma=2.0), ValueError, "two Gaussian bands"),
        (dict(preset="64D1_32D8", profile=window), ValueError, "preset= applies to video UNets"),
        (dict(profile="window"), TypeError, "profile must be a vstar_kernels.FrameProfile"),
        (dict(profile=FrameProfile.table(bias=torch.zeros(5, 3))), None, None),
    ]:
        if error is None:  # a table for the wrong number of heads fails at the first call, naming the heads
            apply_tar(model, timesteps="all", **kwargs)
            with pytest.raises(ValueError, match="rows, but the call has"):
                run_recording(model, CASES["wan"], _wan_inputs(model))
            remove_tar(model)
            continue
        with pytest.raises(error, match=match):
            apply_tar(model, **kwargs)
        assert {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")} == plain


def test_a_gaussian_profile_is_the_sigma_path():
    """apply_tar(profile=FrameProfile.gaussian(...)) installs exactly what sigma= installs: same output bits."""
    model = tiny.tiny_wan_transformer()
    inputs = _wan_inputs(model)
    apply_tar(model, sigma=1.5, strength=2.0, mode="absolute", timesteps="all")
    expected, _ = run_recording(model, CASES["wan"], inputs)
    handle = apply_tar(model, profile=FrameProfile.gaussian(1.5, 2.0, "absolute"), timesteps="all")
    assert handle.profile is None and handle.sigma == 1.5
    assert torch.equal(run_recording(model, CASES["wan"], inputs)[0], expected)


@pytest.mark.parametrize(("build", "window"), [
    (tiny.tiny_wan_transformer, 10),  # 81 frames -> 21 latent frames
    (tiny.tiny_cogvideox_transformer, 6),  # 49 frames -> 13
    (tiny.tiny_ltx_transformer, 8),  # 121 frames, 8x temporal compression -> 16
    (tiny.tiny_hunyuan_transformer, 16),  # 129 frames -> 33
])
def test_ultravico_windows_follow_each_training_length(build, window):
    profile = FrameProfile.ultravico(build())
    expected = FrameProfile.decay_beyond(window, 0.9)
    assert torch.equal(profile.positive_scale, expected.positive_scale)
    assert f"decay_beyond(window={window}, factor=0.9)" in repr(profile)


def test_ultravico_window_of_wan22_ti2v_and_cogvideox15():
    """Wan 2.2 TI2V-5B (48 latent channels) was trained at 121 frames (31 latent frames); CogVideoX 1.5 (temporal
    patch 2) at 81 frames: 21 latent frames, 10 after the patch."""
    wan = tiny.tiny_wan_transformer()
    wan.register_to_config(in_channels=48)
    assert FrameProfile.ultravico(wan).positive_scale.shape[1] == 15 + 2
    cog = tiny.tiny_cogvideox_transformer()
    cog.register_to_config(patch_size_t=2)
    assert FrameProfile.ultravico(cog).positive_scale.shape[1] == 5 + 2
    with pytest.raises(ValueError, match="needs a video transformer"):
        FrameProfile.ultravico(tiny.tiny_unet3d())


@pytest.mark.parametrize("ratio", [2, 4])
def test_wan_pipeline_beyond_its_training_length_with_ultravico(ratio):
    """preset="ultravico" and FrameProfile.ultravico(pipe) + TAR run end to end at 2x and 4x Wan's 81 training
    frames ((21 r - 1) * 4 + 1 frames, UltraViCo's own lengths); the two spellings give the same video, and
    remove_tar gives the plain one back."""
    pipe = tiny.wan_pipeline()
    kwargs = dict(prompt="w3 w4", height=32, width=32, num_frames=(21 * ratio - 1) * 4 + 1, num_inference_steps=2,
                  output_type="pt", max_sequence_length=8)

    def run():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames

    baseline = run()
    handle = apply_tar(pipe, preset="ultravico", sigma=2.0)
    preset_video = run()
    assert handle.state().geometry.frames == 21 * ratio
    assert preset_video.shape == baseline.shape == (1, kwargs["num_frames"], 3, 32, 32)
    assert torch.isfinite(preset_video).all() and not torch.equal(preset_video, baseline)
    apply_tar(pipe, profile=FrameProfile.ultravico(pipe) + FrameProfile.gaussian(2.0))
    assert torch.equal(run(), preset_video)
    assert remove_tar(pipe)
    assert torch.equal(run(), baseline)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_a_training_step_with_a_profile_matches_the_materialised_gradients(name):
    """The gradients of a loss through every patched block (input and a projection weight) equal those through the
    materialised formula: the op's backward with masks, scales and per-head tables inside a real model."""
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(model)
    profile = _profile_for(model, case, "relative")
    weight = next(iter(self_attention_modules(model, case).values())).to_q.weight
    reference = ReferenceAttention(case, profile=profile)
    hooks = []
    for module in self_attention_modules(model, case).values():
        hooks.append(module.register_forward_pre_hook(lambda *_: setattr(reference, "inside", True)))
        hooks.append(module.register_forward_hook(lambda *_: setattr(reference, "inside", False)))

    def grads(mode=None):
        model.zero_grad()
        x = inputs["hidden_states"].clone().requires_grad_()
        with mode if mode is not None else contextlib.nullcontext():
            out = model(**{**inputs, "hidden_states": x}).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return x.grad, weight.grad.clone()

    expected = grads(reference)
    for hook in hooks:
        hook.remove()
    apply_tar(model, profile=profile, timesteps="all")
    for got, want in zip(grads(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-4, atol=5e-5)
