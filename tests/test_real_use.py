"""The patched model under real use: schedulers swapped after patching, one model served from several threads,
checkpointed training steps, gradient penalties, compile before any eager call, and every order of this package's
patches (issue 22).

None of these shows up in one call on a fresh model; each test here failed on the code before issue 22.
"""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from vstar_kernels import apply_tar, remove_tar  # noqa: E402
from vstar_kernels.diffusers import (  # noqa: E402
    MaterialisedTARProcessor,
    TARAttnProcessor,
    apply_synopsis,
    extend_frame_positions,
    frame_positions_state,
    remove_synopsis,
    restore_frame_positions,
    tar_state,
    tiny,
)
from vstar_kernels.presets import PAPER_FRACTION  # noqa: E402

STEPS = 25
PAPER_STEPS = round(PAPER_FRACTION * STEPS)  # 14 of 25


# ------------------------------------------------------------------------------------ 1. schedulers swapped later
def _count_tar_steps(pipe, model, handle_switch, run) -> tuple[int, int]:
    """(calls with TAR on, calls) of ``model`` during ``run()``, read by a forward hook on the model (it runs after the
    gate, on the calling thread)."""
    calls: list[bool] = []
    hook = model.register_forward_hook(lambda *_: calls.append(handle_switch().active))
    try:
        run()
    finally:
        hook.remove()
    return sum(calls), len(calls)


UNET_SCHEDULERS = {
    "euler-karras": lambda cfg: EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True),
    "dpmpp-2m-karras": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
}


def _unet_video(pipe, steps: int = STEPS):
    with torch.no_grad():
        pipe("a cat", num_inference_steps=steps, num_frames=4, height=16, width=16, output_type="pt",
             guidance_scale=1.0, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheduler", sorted(UNET_SCHEDULERS))
def test_unet_pipeline_follows_a_scheduler_swapped_after_apply_tar(scheduler):
    pipe = tiny.text_to_video_pipeline()
    handle = apply_tar(pipe)
    pipe.scheduler = UNET_SCHEDULERS[scheduler](pipe.scheduler.config)  # swapped after apply_tar
    on, total = _count_tar_steps(pipe, pipe.unet, lambda: handle.switch, lambda: _unet_video(pipe))
    assert (on, total) == (PAPER_STEPS, STEPS)
    before = tiny.text_to_video_pipeline(pipe.unet)  # the same scheduler set before apply_tar: the same steps
    before.scheduler = UNET_SCHEDULERS[scheduler](before.scheduler.config)
    handle = apply_tar(before)
    assert _count_tar_steps(before, before.unet, lambda: handle.switch, lambda: _unet_video(before)) == (on, total)


def test_a_new_set_timesteps_is_the_schedule_in_force():
    pipe = tiny.text_to_video_pipeline()
    handle = apply_tar(pipe)
    for steps in (25, 10, 7):  # each call's own set_timesteps
        on, total = _count_tar_steps(pipe, pipe.unet, lambda: handle.switch, lambda s=steps: _unet_video(pipe, s))
        assert (on, total) == (round(PAPER_FRACTION * steps), steps)


def test_wan_pipeline_follows_a_scheduler_swapped_after_apply_tar():
    """Wan's recipe: UniPC with flow sigmas and flow shift 5 replaces the pipeline's scheduler after loading."""
    pipe = tiny.wan_pipeline()
    handle = apply_tar(pipe, sigma=1.0)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             num_train_timesteps=1000, flow_shift=5.0)

    def video():
        with torch.no_grad():
            pipe("w3 w4", height=16, width=16, num_frames=5, num_inference_steps=STEPS, guidance_scale=1.0,
                 output_type="pt", max_sequence_length=8, generator=torch.Generator().manual_seed(0))

    on, total = _count_tar_steps(pipe, pipe.transformer, lambda: handle.state().switch, video)
    assert (on, total) == (PAPER_STEPS, STEPS)


# -------------------------------------------------------------------------------------- 2. one model, two threads
def _threaded(calls: dict[str, object], repeats: int) -> dict[str, list[object]]:
    """Run each ``calls[name]()`` ``repeats`` times on its own thread, all threads started together."""
    results: dict[str, list[object]] = {name: [] for name in calls}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def worker(name: str) -> None:
        try:
            barrier.wait()
            for _ in range(repeats):
                results[name].append(calls[name]())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,), name=name) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_one_patched_unet_from_two_threads_gives_each_call_its_own_window():
    unet = tiny.tiny_unet3d()
    apply_tar(unet, "64D1_32D8")  # bare UNet: on at t >= 440
    gen = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 4, 8, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)

    def call(t: int):
        with torch.no_grad():
            return unet(x, torch.tensor(t), ehs).sample

    expected = {"on": call(900), "off": call(100)}
    assert not torch.allclose(expected["on"], expected["off"], atol=1e-4)
    results = _threaded({"on": lambda: call(900), "off": lambda: call(100)}, repeats=10)
    wrong = sum(not torch.allclose(out, expected[name], rtol=1e-5, atol=1e-6)
                for name, outs in results.items() for out in outs)
    assert wrong == 0


def test_one_patched_wan_from_threads_with_other_geometries():
    """Two geometries of the same token count (4 frames x 8x8, 2 frames x 8x16: 64 tokens) and a third token count, each
    on its own thread, TAR on and off: every output equals the same call made alone."""
    model = tiny.tiny_wan_transformer()
    apply_tar(model, sigma=1.0)  # bare transformer: on at t >= 440
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 7, 32, generator=gen)
    shapes = {"4x8x8@900": ((1, 16, 4, 8, 8), 900), "2x8x16@900": ((1, 16, 2, 8, 16), 900),
              "3x8x8@100": ((1, 16, 3, 8, 8), 100)}
    inputs = {name: (torch.randn(*shape, generator=gen), t) for name, (shape, t) in shapes.items()}

    def call(name: str):
        x, t = inputs[name]
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text).sample

    expected = {name: call(name) for name in inputs}
    results = _threaded({name: (lambda n=name: call(n)) for name in inputs}, repeats=8)
    wrong = sum(not torch.allclose(out, expected[name], rtol=1e-5, atol=1e-6)
                for name, outs in results.items() for out in outs)
    assert wrong == 0


# -------------------------------------------------------------------------------------- 3. gradient checkpointing
def _wan_step(model, calls) -> dict[str, torch.Tensor]:
    """Gradients of one training step: the forwards of ``calls`` ((shape, t) each), one summed loss, one backward."""
    gen = torch.Generator().manual_seed(0)
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for shape, t in calls:
        x = torch.randn(*shape, generator=gen)
        text = torch.randn(shape[0], 7, 32, generator=gen)
        out = model(hidden_states=x, timestep=torch.tensor([t] * shape[0]), encoder_hidden_states=text).sample
        loss = loss + out.pow(2).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("calls", [
    [((1, 16, 4, 8, 8), 900), ((1, 16, 2, 8, 16), 900)],  # two geometries of 64 tokens each
    [((1, 16, 4, 8, 8), 900), ((1, 16, 4, 8, 8), 100)],  # TAR on, then off
    [((1, 16, 3, 8, 8), 100), ((1, 16, 2, 8, 16), 900)],  # off, then on, other token counts
], ids=["geometries", "on-off", "off-on"])
def test_wan_checkpointed_training_step_equals_the_unchecked_one(calls):
    plain = tiny.tiny_wan_transformer().train()
    apply_tar(plain, sigma=1.0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()  # after apply_tar, as a training script does
    expected, got = _wan_step(plain, calls), _wan_step(checkpointed, calls)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_animatediff_checkpointed_training_step_equals_the_unchecked_one():
    unet, _ = tiny.tiny_animatediff_unet(block_out_channels=(32, 64), layers_per_block=1)
    unet.train()
    unet.enable_gradient_checkpointing()  # before apply_tar this time
    apply_tar(unet, "64D1_32D8")
    unchecked = copy.deepcopy(unet)
    unchecked.disable_gradient_checkpointing()
    frames = 6

    def step(model):
        gen = torch.Generator().manual_seed(0)
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for t in (900, 100):  # TAR on, then off
            x = torch.randn(1, 4, frames, 16, 16, generator=gen)
            ehs = torch.randn(frames, 7, 32, generator=gen)
            loss = loss + model(x, torch.tensor(t), ehs).sample.pow(2).mean()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected, got = step(unchecked), step(unet)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_remove_tar_gives_back_the_checkpoint_function():
    model = tiny.tiny_wan_transformer()
    model.enable_gradient_checkpointing()
    before = model._gradient_checkpointing_func
    apply_tar(model, sigma=1.0)
    assert model._gradient_checkpointing_func is not before  # wrapped: recomputes keep their call's state
    remove_tar(model)
    assert model._gradient_checkpointing_func is before


# ---------------------------------------------------------------------------------------- 4. a gradient penalty
@pytest.mark.parametrize("model_kind", ["unet3d", "wan"])
def test_gradient_penalty_through_a_patched_model(model_kind):
    """A loss with a gradient penalty (double backward through TAR) on the default backend equals the same step
    through a pure-PyTorch path (the materialised reference processor / the torch backend)."""
    if model_kind == "unet3d":
        fused = tiny.tiny_unet3d()
        apply_tar(fused, "64D1_32D8", timesteps="all")
        reference = copy.deepcopy(fused)
        apply_tar(reference, "64D1_32D8", timesteps="all", processor=MaterialisedTARProcessor)
        gen = torch.Generator().manual_seed(0)
        x, ehs = torch.randn(1, 4, 5, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)

        def forward(model, inp):
            return model(inp, torch.tensor(900), ehs).sample
    else:
        fused = tiny.tiny_wan_transformer()
        apply_tar(fused, sigma=1.0, timesteps="all")
        reference = copy.deepcopy(fused)
        apply_tar(reference, sigma=1.0, timesteps="all", backend="torch")
        gen = torch.Generator().manual_seed(0)
        x, ehs = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)

        def forward(model, inp):
            return model(hidden_states=inp, timestep=torch.tensor([900]), encoder_hidden_states=ehs).sample

    def step(model):
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        # the model's other attention layers run PyTorch's SDPA, whose CPU flash kernel has no double backward
        with sdpa_kernel(SDPBackend.MATH):
            out = forward(model, inp)
            grad, = torch.autograd.grad(out.pow(2).sum(), inp, create_graph=True)
            assert grad.requires_grad  # the penalty is differentiable, not detached
            (out.pow(2).mean() + grad.pow(2).sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected, got = step(reference), step(fused)
    assert expected.keys() == got.keys() and expected
    # fp32 through a deep second-order graph: relative to each gradient's largest entry, plus a floor relative to the
    # largest gradient of all (gradients that are zero by structure, e.g. a bias before a GroupNorm, are rounding)
    largest = max(grad.abs().max().item() for grad in expected.values())
    for name in expected:
        error = (got[name] - expected[name]).abs().max().item()
        assert error <= 1e-5 * expected[name].abs().max().item() + 1e-6 * largest, (name, error)


# ------------------------------------------------------------------------- 5. compile before any eager call (DiTs)
def _wan_call(model, t: int):
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen), timestep=torch.tensor([t]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=gen))


@pytest.mark.slow
def test_wan_compiled_fullgraph_before_any_eager_call():
    """diffusers' recipe: patch, compile, call; the window flips between calls without a recompile."""
    torch._dynamo.reset()
    model = tiny.tiny_wan_transformer()
    apply_tar(model, sigma=1.0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = {t: compiled(**_wan_call(model, t)).sample for t in (900, 100, 900)}
    with torch.no_grad():
        eager = {t: model(**_wan_call(model, t)).sample for t in (900, 100)}
    for t in (900, 100):
        torch.testing.assert_close(got[t], eager[t], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager[900], eager[100], atol=1e-4)


@pytest.mark.slow
def test_wan_regional_compilation_before_any_eager_call():
    """``compile_repeated_blocks(fullgraph=True)``: one compile of the block, none when TAR switches off."""
    torch._dynamo.reset()
    model = tiny.tiny_wan_transformer()
    apply_tar(model, sigma=1.0)
    with torch.no_grad():
        eager = {t: model(**_wan_call(model, t)).sample for t in (900, 100)}
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = {t: model(**_wan_call(model, t)).sample for t in (900, 100, 900)}
    for t in (900, 100):
        torch.testing.assert_close(got[t], eager[t], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- 6. every order of this package's patches
PATCHES = ("positions", "synopsis", "frame_parallel", "tar")


def _apply(name: str, unet, embeds) -> None:
    from vstar_kernels.distributed import enable_frame_parallel

    if name == "positions":
        extend_frame_positions(unet, "interpolate")  # the mode apply_tar sets by default
    elif name == "synopsis":
        apply_synopsis(unet, embeds)
    elif name == "frame_parallel":
        enable_frame_parallel(unet)
    else:
        apply_tar(unet, "64D1_32D8", timesteps="all")


def _remove(name: str, unet) -> None:
    from vstar_kernels.distributed import disable_frame_parallel

    {"positions": restore_frame_positions, "synopsis": remove_synopsis, "frame_parallel": disable_frame_parallel,
     "tar": remove_tar}[name](unet)


def _in_force(name: str, unet) -> bool:
    from vstar_kernels.diffusers.shared.components import SYNOPSIS_STATE_ATTR as SYNOPSIS
    from vstar_kernels.distributed import frame_parallel_state

    return {"positions": lambda: any(frame_positions_state(unet).values()),
            "synopsis": lambda: SYNOPSIS in unet.__dict__,
            "frame_parallel": lambda: frame_parallel_state(unet) is not None,
            "tar": lambda: tar_state(unet) is not None and any(
                isinstance(p, TARAttnProcessor) for p in unet.attn_processors.values())}[name]()


@pytest.mark.parametrize("first,second", list(itertools.permutations(PATCHES, 2)))
def test_every_order_of_two_patches(first, second, world_of_one):
    """Any two of positions, synopsis, frame parallelism and TAR, applied in either order, give the same model
    (AnimateDiff at 40 frames where positions are extended: past its 32-row tables); removing them last-in-first-out
    or first-in-first-out gives the plain model back."""
    unet, _ = tiny.tiny_animatediff_unet(block_out_channels=(32, 64), layers_per_block=1)
    frames = 40 if {first, second} & {"positions", "tar"} else 8  # past the 32-row tables where one extends them
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, 8, 8, generator=gen)
    ehs = torch.randn(frames, 7, 32, generator=gen)
    embeds = torch.randn(frames, 7, 32, generator=gen)

    def run():
        with torch.no_grad():
            return unet(x, torch.tensor(900), ehs).sample

    plain_state = {n: m.processor for n, m in unet.named_modules() if hasattr(m, "processor")}
    outputs = []
    for order in ((first, second), (second, first)):
        for name in order:
            _apply(name, unet, embeds)
        assert all(_in_force(name, unet) for name in order), order
        outputs.append(run())
        for name in reversed(order) if order == (first, second) else order:
            _remove(name, unet)
        assert not any(_in_force(name, unet) for name in PATCHES)
        assert {n: m.processor for n, m in unet.named_modules() if hasattr(m, "processor")} == plain_state
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert torch.isfinite(outputs[0]).all()


def test_set_default_attn_processor_after_remove_tar():
    """diffusers refuses ``set_default_attn_processor`` while custom processors are set (its own ValueError); the
    documented order is ``remove_tar`` first, which makes it work."""
    unet = tiny.tiny_unet3d()
    apply_tar(unet)
    with pytest.raises(ValueError):
        unet.set_default_attn_processor()
    remove_tar(unet)
    unet.set_default_attn_processor()
    assert not any(isinstance(p, TARAttnProcessor) for p in unet.attn_processors.values())


def test_ddim_pipeline_still_counts_fourteen_of_twenty_five():
    pipe = tiny.text_to_video_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    handle = apply_tar(pipe)
    assert _count_tar_steps(pipe, pipe.unet, lambda: handle.switch, lambda: _unet_video(pipe)) == (PAPER_STEPS, STEPS)
