"""Video synopsis prompting on video transformers (Wan T2V and I2V, LTX-Video): latent frame f's video tokens attend
to the text of frame f.

The reference is independent of the per-frame regrouping under test: the unpatched model in float64 whose
cross-attention processor runs the *original* processor once per frame f, on every video token, with frame f's
projected text as the context, and keeps the output of frame f's tokens (a cross-attention is independent per
query, so this is the per-frame attention by selection instead of by reshape).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("diffusers")

from vstar_kernels import apply_tar, remove_tar
from vstar_kernels.diffusers import apply_synopsis, remove_synopsis, tiny
from vstar_kernels.diffusers.dit.synopsis import DiTSynopsisProcessor

FRAMES, HEIGHT, WIDTH = 3, 8, 6  # latent frames; 4 x 3 patches of 2 x 2 per frame for Wan


class PerFrameReference:
    """The reference cross-attention: the original processor once per frame on all video tokens, frame f's text
    (projected by the model) as the context, frame f's tokens kept. Conditions the batch rows in ``rows``."""

    def __init__(self, inner, text, bias, per_frame: int, rows):
        self.inner, self.text, self.bias, self.per_frame, self.rows = inner, text, bias, per_frame, rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb).clone()
        shared = encoder_hidden_states.shape[1] - self.text.shape[1]
        for row in self.rows:
            for frame in range(self.text.shape[0]):
                context = torch.cat([encoder_hidden_states[row:row + 1, :shared], self.text[frame:frame + 1]], 1)
                mask = None if self.bias is None else self.bias[frame:frame + 1]
                full = self.inner(attn, hidden_states[row:row + 1], context, mask, rotary_emb)
                span = slice(frame * self.per_frame, (frame + 1) * self.per_frame)
                out[row, span] = full[0, span]
        return out


def _models():
    return {
        "wan": lambda: tiny.tiny_wan_transformer(),
        "wan-i2v": lambda: tiny.tiny_wan_i2v_transformer(),
        "ltx": lambda: tiny.tiny_ltx_transformer(),
    }


def _inputs(name: str, context: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    gen = torch.Generator().manual_seed(5)
    batch = context.shape[0]
    if name == "ltx":
        return dict(hidden_states=torch.randn(batch, FRAMES * HEIGHT * WIDTH, 128, generator=gen),
                    encoder_hidden_states=context, timestep=torch.tensor([700] * batch),
                    encoder_attention_mask=mask, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    channels = 36 if name == "wan-i2v" else 16
    kw = dict(hidden_states=torch.randn(batch, channels, FRAMES, HEIGHT, WIDTH, generator=gen),
              timestep=torch.tensor([700] * batch), encoder_hidden_states=context)
    if name == "wan-i2v":  # 257 CLIP image tokens, shared by every frame
        kw["encoder_hidden_states_image"] = torch.randn(batch, 257, 16, generator=gen)
    return kw


def _frame_prompts(name: str):
    """Per-latent-frame raw text embeddings (frames, tokens, text_dim) and LTX's text masks (5, 8 and 3 of 8 kept)."""
    gen = torch.Generator().manual_seed(6)
    tokens = 512 if name == "wan-i2v" else 8  # Wan I2V's processor takes the last 512 context tokens as the text
    embeds = torch.randn(FRAMES, tokens, 32, generator=gen)
    if name != "ltx":
        return embeds, None
    mask = torch.zeros(FRAMES, tokens, dtype=torch.int64)
    for frame, kept in enumerate((5, 8, 3)):
        mask[frame, :kept] = 1
    return embeds, mask


def _projection(model, name):
    return model.caption_projection if name == "ltx" else model.condition_embedder.text_embedder


def _reference(base, name, embeds, mask, kw, rows):
    """The float64 reference output and every block's cross-attention output."""
    model = copy.deepcopy(base).double()
    text = _projection(model, name)(embeds.double())
    bias = None if mask is None else ((1 - mask.double()) * -10000.0)[:, None]
    blocks = model.transformer_blocks if name == "ltx" else model.blocks
    per_frame = HEIGHT * WIDTH if name == "ltx" else (HEIGHT // 2) * (WIDTH // 2)
    for block in blocks:
        block.attn2.set_processor(PerFrameReference(block.attn2.processor, text, bias, per_frame, rows))
    return _run(model, {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()})


def _run(model, kw):
    blocks = model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks
    outputs = []
    handles = [block.attn2.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in blocks]
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    for handle in handles:
        handle.remove()
    return out, outputs


@pytest.mark.parametrize("name", ["wan", "wan-i2v", "ltx"])
def test_every_cross_attention_and_the_output_match_the_per_frame_reference(name):
    """A batch of two rows: the first state (conditioned per frame) and another prompt (unchanged)."""
    base = _models()[name]().eval()
    embeds, mask = _frame_prompts(name)
    other = torch.randn(1, *embeds.shape[1:], generator=torch.Generator().manual_seed(9))
    context = torch.cat([embeds[:1], other])
    batch_mask = None if mask is None else torch.stack([mask[0], torch.ones_like(mask[0])])
    kw = _inputs(name, context, batch_mask)
    want, want_blocks = _reference(base, name, embeds, mask, kw, rows=[0])
    model = copy.deepcopy(base)
    handle = apply_synopsis(model, embeds, mask)
    assert len(handle.layers) == 2 and all(layer.endswith("attn2") for layer in handle.layers)
    got, got_blocks = _run(model, kw)
    for ref, out in zip(want_blocks, got_blocks, strict=True):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    plain, _ = _run(base, kw)
    assert (got[0] - plain[0]).abs().max() > 1e-2  # the per-frame text is seen
    assert torch.equal(got[1], plain[1])  # the other prompt's row: bit-identical to the unpatched model


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_another_prompt_runs_unchanged_and_remove_restores_exactly(name):
    base = _models()[name]().eval()
    embeds, mask = _frame_prompts(name)
    negative = _inputs(name, torch.zeros(1, *embeds.shape[1:]), None if mask is None else torch.ones_like(mask[:1]))
    positive = _inputs(name, embeds[:1], None if mask is None else mask[:1])
    model = copy.deepcopy(base)
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    apply_synopsis(model, embeds, mask)
    assert torch.equal(_run(model, negative)[0], _run(base, negative)[0])
    conditioned = _run(model, positive)[0]
    assert not torch.equal(conditioned, _run(base, positive)[0])
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_run(twin, positive)[0], conditioned)
    assert remove_synopsis(model)
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(after[n] is originals[n] for n in originals)
    assert torch.equal(_run(model, positive)[0], _run(base, positive)[0])
    assert not remove_synopsis(model)


@pytest.mark.parametrize("order", ["tar-first", "synopsis-first"])
@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_composes_with_tar_in_both_orders_and_both_remove_exactly(name, order):
    base = _models()[name]().eval()
    embeds, mask = _frame_prompts(name)
    kw = _inputs(name, embeds[:1], None if mask is None else mask[:1])
    results = {}
    for sequence in ("tar-first", "synopsis-first"):
        model = copy.deepcopy(base)
        steps = [lambda m: apply_tar(m, sigma=0.8, strength=1.5, timesteps="all"),
                 lambda m: apply_synopsis(m, embeds, mask)]
        for step in steps if sequence == "tar-first" else steps[::-1]:
            step(model)
        results[sequence] = model
    model = results[order]
    both = _run(model, kw)[0]
    assert torch.equal(both, _run(results["synopsis-first" if order == "tar-first" else "tar-first"], kw)[0])
    only_tar = copy.deepcopy(base)
    apply_tar(only_tar, sigma=0.8, strength=1.5, timesteps="all")
    only_synopsis = copy.deepcopy(base)
    apply_synopsis(only_synopsis, embeds, mask)
    remove_synopsis(model)
    assert torch.equal(_run(model, kw)[0], _run(only_tar, kw)[0])
    remove_tar(model)
    originals = {n: m.processor for n, m in base.named_modules() if hasattr(m, "processor")}
    for n, m in model.named_modules():
        if hasattr(m, "processor"):
            assert type(m.processor) is type(originals[n]) and not isinstance(m.processor, DiTSynopsisProcessor)
    assert torch.equal(_run(model, kw)[0], _run(base, kw)[0])


def test_a_frame_count_that_disagrees_with_the_embeddings_raises():
    model = tiny.tiny_wan_transformer().eval()
    embeds, _ = _frame_prompts("wan")
    apply_synopsis(model, embeds[:2])
    with pytest.raises(ValueError, match=r"2 per-frame embeddings .* this call has 3 latent frames"):
        _run(model, _inputs("wan", embeds[:1]))


def test_joint_attention_models_and_bad_inputs_raise_clearly():
    with pytest.raises(NotImplementedError, match="inside the self-attention"):
        apply_synopsis(tiny.tiny_hunyuan_transformer(), torch.randn(3, 8, 32))
    with pytest.raises(NotImplementedError, match="inside the self-attention"):
        apply_synopsis(tiny.tiny_cogvideox_transformer(), torch.randn(3, 8, 32))
    wan = tiny.tiny_wan_transformer()
    with pytest.raises(ValueError, match="takes 32"):
        apply_synopsis(wan, torch.randn(3, 8, 31))
    with pytest.raises(ValueError, match="LTX-Video"):
        apply_synopsis(wan, torch.randn(3, 8, 32), torch.ones(3, 8))
    with pytest.raises(ValueError, match="latent frames, tokens, text_dim"):
        apply_synopsis(wan, torch.randn(8, 32))
    assert not any(isinstance(m.processor, DiTSynopsisProcessor) for m in wan.modules() if hasattr(m, "processor"))


# ------------------------------------------------------------------------------------------ frames and pipelines
def test_video_frames_map_to_latent_frames_by_the_vae_compression():
    """Wan (4n+1 -> n+1) and LTX-Video (8n+1 -> n+1): the rows are latent frames, each keyframe at the latent frame
    holding its evenly spaced video frame; an invalid length names the nearest valid ones."""
    from vstar_kernels import synopsis_embeddings

    keyframes = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 2, 4).clone()
    wan = tiny.tiny_wan_transformer()
    rows = synopsis_embeddings(keyframes, 17, pipe=wan)  # 17 frames -> 5 latent; keyframes at 0, 8, 16 -> 0, 2, 4
    assert rows.shape == (5, 2, 4)
    torch.testing.assert_close(rows[:, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))
    rows = synopsis_embeddings(keyframes[:2], 13, pipe=wan)  # keyframes at video 0 and 12 -> latent 0 and 3
    torch.testing.assert_close(rows[:, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    ltx = tiny.tiny_ltx_transformer()
    rows = synopsis_embeddings(keyframes, 25, pipe=ltx)  # 25 -> 4 latent; video 0, 12, 24 -> latent 0, 2, 3
    torch.testing.assert_close(rows[:, 0, 0], torch.tensor([0.0, 0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="nearest valid lengths are 17 and 21"):
        synopsis_embeddings(keyframes, 18, pipe=wan)
    with pytest.raises(ValueError, match="nearest valid lengths are 9 and 17"):
        synopsis_embeddings(keyframes, 10, pipe=ltx)
    with pytest.raises(ValueError, match="two keyframes in one of the 2 latent frames"):
        synopsis_embeddings(keyframes, 5, pipe=wan)
    assert synopsis_embeddings(keyframes, 5).shape[0] == 5  # no pipeline (a UNet): video frames


@pytest.mark.parametrize("family", ["wan", "ltx", "unet"])
def test_synopsis_prompt_embeds_equal_the_pipelines_own_encode_prompt(family):
    """Each state through the pipeline's encode_prompt by hand (no grad, no CFG, as its __call__ does), then
    synopsis_embeddings: the same tensors, bit for bit; LTX-Video's masks follow (a keyframe's own at its latent
    frame, the union between)."""
    from vstar_kernels import synopsis_embeddings
    from vstar_kernels.diffusers import synopsis_prompt_embeds

    pipe = {"wan": tiny.wan_pipeline, "ltx": tiny.ltx_pipeline, "unet": tiny.text_to_video_pipeline}[family]()
    states = ["w3 w4", "w5 w6 w7 w8", "w9"]
    frames = {"wan": 13, "ltx": 25, "unet": 6}[family]
    got = synopsis_prompt_embeds(pipe, states, frames)
    by_hand, masks = [], []
    with torch.no_grad():
        for state in states:
            if family == "unet":
                by_hand.append(pipe.encode_prompt(state, pipe.device, 1, False)[0])
            elif family == "wan":
                by_hand.append(pipe.encode_prompt(state, do_classifier_free_guidance=False, max_sequence_length=512)[0])
            else:
                out = pipe.encode_prompt(state, do_classifier_free_guidance=False, max_sequence_length=128)
                by_hand.append(out[0])
                masks.append(out[1])
    want = synopsis_embeddings(torch.cat(by_hand), frames, pipe=pipe if family != "unet" else None)
    assert torch.equal(got.embeds, want)
    if family != "ltx":
        assert got.attention_mask is None
        return
    masks = torch.cat(masks)  # keyframes at latent 0, 2, 3 of 4
    assert torch.equal(got.attention_mask[0], masks[0]) and torch.equal(got.attention_mask[2], masks[1])
    assert torch.equal(got.attention_mask[3], masks[2])
    assert torch.equal(got.attention_mask[1], torch.maximum(masks[0], masks[1]))


def _record_calls(transformer):
    """Every forward's (kwargs, output) of ``transformer``, kept for a replay on the unpatched model."""
    calls = []

    def hook(_module, args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("negative", ["w6 w7", None])
def test_a_wan_pipeline_with_cfg_conditions_per_frame_and_its_unconditional_passes_are_unchanged(negative):
    """WanPipeline, CFG (guidance 5) and a negative prompt (or the empty default), 3 steps, per-frame prompts from
    synopsis_prompt_embeds: every conditional call is conditioned per frame (it differs from the unpatched
    transformer on the same inputs) and every unconditional call is bit-identical to it."""
    from vstar_kernels.diffusers import synopsis_prompt_embeds

    pipe = tiny.wan_pipeline()
    base = copy.deepcopy(pipe.transformer)
    states = ["w3 w4", "w5 w6 w7 w8", "w9"]
    apply_synopsis(pipe, synopsis_prompt_embeds(pipe, states, 9))
    calls, hook = _record_calls(pipe.transformer)
    with torch.no_grad():
        pipe(states[0], negative_prompt=negative, num_frames=9, height=32, width=32, num_inference_steps=3,
             guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(calls) == 6
    conditional = [index % 2 == 0 for index in range(6)]  # the pipeline's order: conditional, then unconditional
    for (kwargs, output), cond in zip(calls, conditional, strict=True):
        with torch.no_grad():
            plain = base(**kwargs)[0]
        if cond:
            assert (output - plain).abs().max() > 1e-3
        else:
            assert torch.equal(output, plain)


def test_a_wan_pipeline_without_cfg_conditions_every_call():
    from vstar_kernels.diffusers import synopsis_prompt_embeds

    pipe = tiny.wan_pipeline()
    base = copy.deepcopy(pipe.transformer)
    apply_synopsis(pipe, synopsis_prompt_embeds(pipe, ["w3 w4", "w9"], 9))
    calls, hook = _record_calls(pipe.transformer)
    with torch.no_grad():
        pipe("w3 w4", num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(calls) == 2
    for kwargs, output in calls:
        with torch.no_grad():
            assert (output - base(**kwargs)[0]).abs().max() > 1e-3


def test_an_ltx_pipeline_batches_cfg_and_only_its_positive_rows_are_conditioned():
    """LTXPipeline stacks [negative, positive] in one call: row 1 is conditioned, row 0 bit-identical."""
    from vstar_kernels.diffusers import synopsis_prompt_embeds

    pipe = tiny.ltx_pipeline()
    base = copy.deepcopy(pipe.transformer)
    apply_synopsis(pipe, synopsis_prompt_embeds(pipe, ["w3 w4", "w5 w6 w7"], 17))
    calls, hook = _record_calls(pipe.transformer)
    with torch.no_grad():
        pipe("w3 w4", negative_prompt="w8", num_frames=17, height=64, width=64, num_inference_steps=2,
             guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(calls) == 2
    for kwargs, output in calls:
        with torch.no_grad():
            plain = base(**kwargs)[0]
        assert torch.equal(output[0], plain[0])
        assert (output[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_compiled_fullgraph_with_tar_equals_eager_and_does_not_recompile_between_cfg_branches(name):
    """torch.compile(fullgraph=True) of a transformer with TAR and a synopsis: a batch of both kinds of rows, the
    conditional call and the unconditional call give eager's numbers bit for bit; the two branches of one shape
    share one graph (torch.cond), so the unconditional call after the conditional one does not recompile."""
    base = _models()[name]().eval()
    embeds, mask = _frame_prompts(name)
    model = copy.deepcopy(base)
    apply_tar(model, sigma=0.8, strength=1.5, timesteps="all")
    apply_synopsis(model, embeds, mask)
    other = torch.randn(1, *embeds.shape[1:], generator=torch.Generator().manual_seed(9))
    ones = None if mask is None else torch.ones_like(mask[:1])
    mixed = _inputs(name, torch.cat([embeds[:1], other]), None if mask is None else torch.cat([mask[:1], ones]))
    conditional = _inputs(name, embeds[:1], None if mask is None else mask[:1])
    unconditional = _inputs(name, other, ones)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for kw in (mixed, conditional):
            assert torch.equal(compiled(**kw, return_dict=False)[0], model(**kw, return_dict=False)[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(**unconditional, return_dict=False)[0]
        assert torch.equal(got, model(**unconditional, return_dict=False)[0])
        only_tar = copy.deepcopy(base)
        apply_tar(only_tar, sigma=0.8, strength=1.5, timesteps="all")
        assert torch.equal(got, only_tar(**unconditional, return_dict=False)[0])  # the synopsis left it alone


def test_to_float64_keeps_the_synopsis_exact():
    """``.to(torch.float64)`` of a patched Wan: the embeddings follow the call's dtype, the first row still
    matches the pipeline's cast prompt, and the output is the float64 reference's."""
    base = tiny.tiny_wan_transformer().eval()
    embeds, _ = _frame_prompts("wan")
    kw = _inputs("wan", embeds[:1].double())
    kw["hidden_states"] = kw["hidden_states"].double()
    want, _ = _reference(base, "wan", embeds, None, kw, rows=[0])
    model = copy.deepcopy(base)
    apply_synopsis(model, embeds)
    model.to(torch.float64)
    got, _ = _run(model, kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_wan22_two_experts_are_both_conditioned():
    """Wan 2.2 A14B's pipeline (boundary 0.5: the first step on transformer, the second on transformer_2): both
    experts carry the synopsis, and each one's conditional call differs from the unpatched expert's."""
    from diffusers import WanPipeline

    from vstar_kernels.diffusers import synopsis_prompt_embeds

    pipe = tiny.wan_pipeline()
    second = tiny.tiny_wan_transformer()
    with torch.no_grad():
        for param in second.parameters():
            param.mul_(0.9)
    pipe = WanPipeline(**{**pipe.components, "transformer_2": second}, boundary_ratio=0.5)
    bases = [copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.transformer_2)]
    handle = apply_synopsis(pipe, synopsis_prompt_embeds(pipe, ["w3 w4", "w9"], 9))
    assert sum(layer.startswith("transformer_2.") for layer in handle.layers) == 2
    recorded = [_record_calls(pipe.transformer), _record_calls(pipe.transformer_2)]
    with torch.no_grad():
        pipe("w3 w4", negative_prompt="w6", num_frames=9, height=32, width=32, num_inference_steps=2,
             guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    for (calls, hook), base in zip(recorded, bases, strict=True):
        hook.remove()
        assert len(calls) == 2  # one step each: conditional, then unconditional
        with torch.no_grad():  # unpatched, the same inputs give the same bits: any change is the synopsis'
            assert (calls[0][1] - base(**calls[0][0])[0]).abs().max() > 1e-5
            assert torch.equal(calls[1][1], base(**calls[1][0])[0])


def test_gradient_checkpointing_recomputes_each_call_with_its_own_text():
    """Training with checkpointed blocks: the conditional and the unconditional forward run first, then one backward
    through both (the recompute of the conditional call must see the per-frame text, not the last call's). The
    gradients equal the unchecked model's."""
    base = tiny.tiny_wan_transformer()
    embeds, _ = _frame_prompts("wan")
    other = torch.randn(1, *embeds.shape[1:], generator=torch.Generator().manual_seed(9))
    grads = []
    for checkpointed in (False, True):
        model = copy.deepcopy(base).train()
        apply_synopsis(model, embeds)
        if checkpointed:
            model.enable_gradient_checkpointing()
        cond = model(**_inputs("wan", embeds[:1]), return_dict=False)[0]
        uncond = model(**_inputs("wan", other), return_dict=False)[0]
        (cond.square().mean() + 0.5 * uncond.square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for unchecked, checked in zip(*grads, strict=True):
        torch.testing.assert_close(checked, unchecked, rtol=1e-5, atol=1e-6)


def _ltx_padded_call(embeds: torch.Tensor, kept: int) -> dict:
    """An LTXPipeline-like call of [another prompt, the first state] whose text mask keeps ``kept`` tokens of the
    first state's (the padding LTXPipeline always masks) and 6 of the other's."""
    gen = torch.Generator().manual_seed(11)
    context = torch.cat([torch.randn(1, *embeds.shape[1:], generator=gen), embeds[:1]])
    mask = torch.zeros(2, embeds.shape[1], dtype=torch.int64)
    mask[0, :6], mask[1, :kept] = 1, 1
    return _inputs("ltx", context, mask)


def test_ltx_raw_frame_embeddings_without_a_mask_keep_the_calls_text_mask():
    """A synopsis of raw per-frame embeddings and no frame_attention_mask, called with a padded text mask: every
    frame's text keeps the tokens the call keeps. With every frame's state equal to the prompt the output equals the
    unpatched model (float64); with different frames it equals the per-frame reference under the call's mask."""
    base = _models()["ltx"]().eval()
    embeds, _ = _frame_prompts("ltx")
    same = embeds[:1].double().expand(FRAMES, -1, -1).clone()
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in _ltx_padded_call(same, kept=3).items()}
    model = copy.deepcopy(base).double()
    apply_synopsis(model, same)
    got, plain = _run(model, kw)[0], _run(copy.deepcopy(base).double(), kw)[0]
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)

    kw = _ltx_padded_call(embeds, kept=3)
    mask = kw["encoder_attention_mask"][1:].expand(FRAMES, -1)  # the call's mask, on every frame's text
    want, want_blocks = _reference(base, "ltx", embeds, mask, kw, rows=[1])
    model = copy.deepcopy(base)
    apply_synopsis(model, embeds)
    got, got_blocks = _run(model, kw)
    for ref, out in zip(want_blocks, got_blocks, strict=True):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    unmasked, _ = _reference(base, "ltx", embeds, None, kw, rows=[1])
    assert (got[1].double() - unmasked[1]).abs().max() > 1e-2  # the padding is really masked
    assert torch.equal(got[0], _run(base, kw)[0][0])  # the other prompt's row: bit-identical


def test_ltx_raw_frame_embeddings_without_a_mask_keep_the_calls_text_mask_when_compiled():
    base = _models()["ltx"]().eval()
    embeds, _ = _frame_prompts("ltx")
    kw = _ltx_padded_call(embeds, kept=3)
    model = copy.deepcopy(base)
    apply_synopsis(model, embeds)
    eager = _run(model, kw)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(**kw, return_dict=False)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    mask = kw["encoder_attention_mask"][1:].expand(FRAMES, -1)
    want, _ = _reference(base, "ltx", embeds, mask, kw, rows=[1])
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
