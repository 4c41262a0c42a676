"""Video Synopsis Prompting: per-frame embeddings, per-frame conditioning of diffusers UNets, the synopsis parser."""

from __future__ import annotations

import pytest
import torch

from vstar_kernels import generate_synopsis, parse_synopsis, synopsis_embeddings
from vstar_kernels.synopsis import keyframe_indices


# ---------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize(("k", "frames"), [(2, 2), (3, 9), (4, 16), (5, 128), (4, 300), (7, 1000)])
def test_exact_at_keyframes_and_linear_between(k, frames):
    keys = torch.randn(k, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    out = synopsis_embeddings(keys, frames)
    assert out.shape == (frames, 3, 8) and out.dtype == torch.float64
    idx = keyframe_indices(k, frames)
    assert idx[0] == 0 and idx[-1] == frames - 1 and bool((idx[1:] > idx[:-1]).all())
    expected_idx = [round(i * (frames - 1) / (k - 1)) for i in range(k)]  # evenly spaced, independently
    assert idx.tolist() == expected_idx
    for i, f in enumerate(idx.tolist()):
        assert torch.equal(out[f], keys[i])
    for i in range(k - 1):  # every frame between two keyframes is their linear blend
        lo, hi = idx[i].item(), idx[i + 1].item()
        for f in range(lo, hi + 1):
            w = (f - lo) / (hi - lo)
            torch.testing.assert_close(out[f], (1 - w) * keys[i] + w * keys[i + 1], rtol=1e-12, atol=1e-12)


def test_same_mode_holds_each_keyframe_until_the_next():
    keys = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 2, 4).contiguous()
    out = synopsis_embeddings(keys, 11, mode="same")
    assert out[:, 0, 0].tolist() == [0.0] * 5 + [1.0] * 5 + [2.0]


def test_single_keyframe_repeats_and_bad_inputs():
    key = torch.randn(1, 4, 6)
    out = synopsis_embeddings(key, 200)
    assert out.shape == (200, 4, 6) and torch.equal(out, key.expand(200, -1, -1))
    assert out.data_ptr() != key.data_ptr()  # a tensor of its own, not a view
    with pytest.raises(ValueError, match="do not fit"):
        synopsis_embeddings(torch.randn(5, 2, 2), 4)
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        synopsis_embeddings(key, 0)
    with pytest.raises(ValueError, match=r"\(K, tokens, dim\)"):
        synopsis_embeddings(torch.randn(4, 6), 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        synopsis_embeddings(key, 8, mode="cubic")


def test_half_precision_keeps_dtype_and_keyframes():
    keys = torch.randn(3, 2, 4).half()
    out = synopsis_embeddings(keys, 129)
    assert out.dtype == torch.float16
    assert torch.equal(out[0], keys[0]) and torch.equal(out[64], keys[1]) and torch.equal(out[128], keys[2])


# ---------------------------------------------------------------------------------------------- parser
WELL_FORMED = "1. a snowy field\n2. a green meadow\n3. a golden wheat field"
MALFORMED = [
    ("Sure! Here are the states:\n\n1) a snowy field\n2) a green meadow\n3) a golden wheat field\nHope it helps!",
     None),
    ('- "a snowy field"\n- “a green meadow”\n* a golden wheat field', None),
    ("State 1: a snowy field\nState 2 - a green meadow\nstate 3) a golden wheat field", None),
    ("(1) a snowy field\n(2) a green meadow\n(3) a golden wheat field\n(4) an extra state", None),
    ("**1.** a snowy field\n**2.** a green meadow\n**3.** a golden wheat field", "markdown"),
    ("States:\na snowy field\na green meadow\na golden wheat field", None),
    ("  1.   a snowy field,  \n\n 2.a green meadow\n3 . a golden wheat field", None),
]
STATES = ["a snowy field", "a green meadow", "a golden wheat field"]


def test_parser_well_formed():
    assert parse_synopsis(WELL_FORMED) == STATES
    assert parse_synopsis(WELL_FORMED, 2) == STATES[:2]


@pytest.mark.parametrize(("answer", "kind"), MALFORMED)
def test_parser_malformed(answer, kind):
    assert parse_synopsis(answer, 3) == STATES


def test_generate_synopsis_with_a_deterministic_fake_llm():
    prompts = []

    def llm(prompt: str) -> str:
        prompts.append(prompt)
        return "Here you go:\n1. a leafless tree\n2. a budding tree\n3. a tree in full leaf\nThat's all."

    assert generate_synopsis("a tree in spring", llm, 3) == ["a leafless tree", "a budding tree", "a tree in full leaf"]
    assert prompts[0].rstrip().endswith("Prompt: a tree in spring\nStates (3):")
    assert "1. a leafless tree in a snowy field" in prompts[0]  # the in-context example
    with pytest.raises(ValueError, match="expected 4 states, found 3"):
        generate_synopsis("a tree in spring", llm, 4)
    with pytest.raises(TypeError, match="must return a str"):
        generate_synopsis("x", lambda _p: None, 1)
    with pytest.raises(ValueError, match="non-empty"):
        generate_synopsis("  ", llm, 1)


# ---------------------------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")


def _capture_cross_attention_contexts(unet, names):
    seen = {}
    for name in names:
        module = unet.get_submodule(name)
        processor = module.processor

        def spy(attn, hidden_states, encoder_hidden_states=None, *args, _p=processor, _n=name, **kwargs):
            seen.setdefault(_n, encoder_hidden_states)
            return _p(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

        module.set_processor(spy)
    return seen


def _unets():
    from test_diffusers_integration import motion_unet, unet3d

    return {"unet3d": unet3d, "motion": motion_unet}


@pytest.mark.parametrize("model", ["unet3d", "motion"])
@pytest.mark.parametrize("cfg", [False, True])
@torch.no_grad()
def test_each_frame_sees_its_embedding_and_uncond_keeps_its_own(model, cfg):
    from vstar_kernels import apply_synopsis, remove_synopsis
    from vstar_kernels.diffusers.unet.synopsis import SynopsisCrossAttnProcessor

    unet = _unets()[model]()
    frames, batch = 8, (2 if cfg else 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, frames, 8, 8, generator=gen)
    text = torch.randn(batch, 7, 32, generator=gen)  # (uncond, cond) with CFG
    ehs = text.repeat_interleave(frames, dim=0) if model == "motion" else text
    frame_embeds = synopsis_embeddings(torch.randn(3, 7, 32, generator=gen), frames)
    originals = dict(unet.attn_processors)
    base = unet(x, 900, ehs).sample

    handle = apply_synopsis(unet, frame_embeds)
    assert handle.layers and all(isinstance(unet.get_submodule(n).processor, SynopsisCrossAttnProcessor)
                                 for n in handle.layers)
    assert all(unet.get_submodule(n).is_cross_attention for n in handle.layers)
    inner = {n: unet.get_submodule(n).processor.inner for n in handle.layers}
    for n in handle.layers:  # spy on what reaches the real processor
        unet.get_submodule(n).processor.inner = _Spy(inner[n])
    out = unet(x, 900, ehs).sample
    assert not torch.allclose(out, base)
    for n in handle.layers:
        ctx = unet.get_submodule(n).processor.inner.context.view(batch, frames, 7, 32)
        torch.testing.assert_close(ctx[-1], frame_embeds)  # the conditional item: embedding f at frame f
        if cfg:
            assert torch.equal(ctx[0], text[0].expand(frames, -1, -1))  # unconditional: untouched
        unet.get_submodule(n).processor.inner = inner[n]

    assert remove_synopsis(unet)
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(unet(x, 900, ehs).sample, base)
    assert not remove_synopsis(unet)


class _Spy:
    def __init__(self, inner):
        self.inner, self.context = inner, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.context = encoder_hidden_states
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


@torch.no_grad()
def test_composes_with_tar_and_both_remove_cleanly():
    from vstar_kernels import apply_synopsis, apply_tar, remove_synopsis, remove_tar

    unet = _unets()["unet3d"]()
    originals = dict(unet.attn_processors)
    gen = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    frame_embeds = synopsis_embeddings(torch.randn(2, 7, 32, generator=gen), 8)
    base = unet(x, 900, ehs).sample
    tar = apply_tar(unet, "64D1_32D8", timesteps="all")
    syn = apply_synopsis(unet, frame_embeds)
    assert not set(tar.layers) & set(syn.layers)
    both = unet(x, 900, ehs).sample
    remove_tar(unet)
    only_synopsis = unet(x, 900, ehs).sample
    assert not torch.allclose(both, only_synopsis)
    remove_synopsis(unet)
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(unet(x, 900, ehs).sample, base)


@pytest.mark.parametrize("model", ["unet3d", "motion"])
@pytest.mark.parametrize("batch", [1, 2])  # 2: a CFG batch (uncond, cond)
@pytest.mark.parametrize(("synopsis_frames", "call_frames"), [(8, 16), (6, 8), (16, 8)])
def test_frame_count_mismatch_is_a_clear_error(model, batch, synopsis_frames, call_frames):
    """16 frames with an 8-frame synopsis used to condition half the video (and shift the CFG halves) silently."""
    from vstar_kernels import apply_synopsis

    unet = _unets()[model]()
    apply_synopsis(unet, torch.randn(synopsis_frames, 7, 32))
    text = torch.randn(batch, 7, 32)
    ehs = text.repeat_interleave(call_frames, dim=0) if model == "motion" else text
    pattern = rf"synopsis has {synopsis_frames} per-frame embeddings but this call has {call_frames} frames"
    with pytest.raises(ValueError, match=pattern), torch.no_grad():
        unet(torch.randn(batch, 4, call_frames, 8, 8), 900, ehs)
