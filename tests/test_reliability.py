"""No silent wrong result: copies, pickles and compiled models behave, and edges are exact or refused clearly.

Each test here failed on the code before issue 12 (a frozen switch in deep copies, an unpicklable hook closure, a
graph break on the timestep, NaN for a tiny sigma, ...).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_matches_reference, make_qkv, pickle_round_trip, reference_error

from vstar_kernels import synopsis_embeddings, tar_attention, tar_attention_reference
from vstar_kernels.backends import BACKENDS, Backend, extension, extension_build, torch_tar
from vstar_kernels.ops import backend_for

diffusers = pytest.importorskip("diffusers")

from vstar_kernels import apply_tar, remove_tar  # noqa: E402
from vstar_kernels.diffusers import TARAttnProcessor, tar_state  # noqa: E402
from vstar_kernels.diffusers.tiny import text_to_video_pipeline, tiny_unet3d  # noqa: E402

ALL_BACKENDS = ("triton", "extension", "torch")


def unet_inputs(frames: int = 8, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, frames, 8, 8, generator=gen), torch.randn(batch, 7, 32, generator=gen)


def run(unet, t, x, ehs):
    with torch.no_grad():
        return unet(x, torch.tensor(t), ehs).sample


# ------------------------------------------------------------------------------ patched models are ordinary models
def test_deepcopy_carries_its_own_step_window():
    unet = tiny_unet3d()
    apply_tar(unet, "64D1_32D8")  # paper window: on at t >= 440
    x, ehs = unet_inputs()
    on, off = run(unet, 900, x, ehs), run(unet, 100, x, ehs)
    assert not torch.equal(on, off)
    twin = copy.deepcopy(unet)  # made after a low-noise call: the original's switch is off now
    assert torch.equal(run(twin, 900, x, ehs), on)  # the copy's hook switches the copy's processors
    run(twin, 900, x, ehs)
    assert not tar_state(unet).switch.active  # running the copy left the original alone
    assert tar_state(twin).switch is not tar_state(unet).switch
    assert torch.equal(run(twin, 100, x, ehs), off)
    assert remove_tar(twin)  # removes the copy's hook and processors, not the original's
    assert all(not isinstance(p, TARAttnProcessor) for p in twin.attn_processors.values())
    assert torch.equal(run(unet, 900, x, ehs), on)
    assert torch.equal(run(twin, 100, x, ehs), off)  # the copy without TAR is the plain model


def test_torch_save_of_a_patched_unet():
    unet = tiny_unet3d()
    apply_tar(unet, "64D1_32D8")
    x, ehs = unet_inputs()
    on, off = run(unet, 900, x, ehs), run(unet, 100, x, ehs)
    loaded = pickle_round_trip(unet)
    assert torch.equal(run(loaded, 100, x, ehs), off) and torch.equal(run(loaded, 900, x, ehs), on)
    assert remove_tar(loaded)
    assert torch.equal(run(loaded, 100, x, ehs), off)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_switches_the_window_like_eager(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    unet = tiny_unet3d()
    apply_tar(unet, "64D1_32D8")
    x, ehs = unet_inputs(batch=2)
    steps = (999, 900, 600, 440, 439, 200, 1)
    eager = {t: run(unet, t, x, ehs) for t in steps}
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    for t in steps:
        out = run(compiled, t, x, ehs)
        torch.testing.assert_close(out, eager[t], rtol=1e-4, atol=1e-5, msg=f"t={t}")
    assert not torch.allclose(eager[999], eager[1], atol=1e-4)  # both states were exercised
    assert counter.frame_count <= 2  # at most one recompile per state (torch.cond: none at all)


def test_compiled_unet_inside_a_pipeline_follows_the_paper_window():
    """diffusers' recipe: pipe.unet = torch.compile(pipe.unet, fullgraph=True); 25 DDIM steps with CFG."""
    torch._dynamo.reset()
    kwargs = dict(num_inference_steps=25, num_frames=8, height=16, width=16, output_type="pt", guidance_scale=7.5)

    def video(pipe):
        with torch.no_grad():
            return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames

    pipe = text_to_video_pipeline()
    apply_tar(pipe)
    eager = video(pipe)
    apply_tar(pipe, timesteps="all")
    always = video(pipe)
    apply_tar(pipe)
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager", fullgraph=True)
    compiled = video(pipe)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(always, eager, atol=1e-3)  # the window really switched off inside the compiled run


@pytest.mark.parametrize("backend", ["extension", "torch"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_op_compiled_with_varying_python_floats(backend, dynamic):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 12, 2, 16, layout="fused_qkv")
    compiled = torch.compile(lambda q, k, v, sigma, strength: tar_attention(
        q, k, v, sigma=sigma, strength=strength, backend=backend), fullgraph=True, backend="aot_eager",
        dynamic=dynamic)
    for sigma, strength in ((1.0, 1.0), (2.5, 0.5), (7.0, 3.0), (0.3, 0.0)):
        out = compiled(q, k, v, sigma, strength)
        assert_matches_reference(out, q, k, v, sigma=sigma, strength=strength)


# ------------------------------------------------------------------------------------------- numerics at the edges
def _diagonal_band_reference(q, k, v, strength, mode):
    """Independent: ΔA is the identity (only gi == gj gets the bias)."""
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * q.shape[-1] ** -0.5
    eye = torch.eye(q.shape[1], k.shape[1], dtype=torch.float64)
    row_max = scores.amax(-1, keepdim=True) if mode == "relative" else 1.0
    probs = torch.softmax(scores + strength * row_max * eye, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v.double())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("sigma", [1e-30, 1e-20, 1e-5, 0.01, 1e-300])
def test_tiny_sigma_is_the_diagonal_band(backend, mode, sigma):
    q, k, v = make_qkv(2, 9, 3, 16)
    out = tar_attention(q, k, v, sigma=sigma, strength=3.0, mode=mode, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _diagonal_band_reference(q, k, v, 3.0, mode), rtol=0, atol=2e-5)
    ref = tar_attention_reference(q.double(), k.double(), v.double(), sigma=sigma, strength=3.0, mode=mode)
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize("strength", [1e39, -1e39, 3.5e38])
def test_strength_beyond_float32_is_refused_before_launch(strength, monkeypatch):
    for name in ALL_BACKENDS:  # nothing may launch
        monkeypatch.setattr(BACKENDS[name], "forward", lambda *a, **k: pytest.fail("launched"))
    q, k, v = make_qkv(1, 4, 1, 8)
    with pytest.raises(ValueError, match="strength must fit in float32"):
        tar_attention(q, k, v, sigma=1.0, strength=strength)
    with pytest.raises(ValueError, match="strength must fit in float32"):
        apply_tar(tiny_unet3d(), strength=strength)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_huge_strength_within_float32_is_computed(backend):
    q, k, v = make_qkv(1, 6, 2, 8)
    out = tar_attention(q, k, v, sigma=0.01, strength=1e30, mode="absolute", backend=backend)
    torch.testing.assert_close(out, v.contiguous(), rtol=0, atol=1e-6)  # the band dominates: each frame sees itself


@pytest.mark.parametrize(("dtype", "strength"), [(torch.float16, 1e5), (torch.bfloat16, 30.0), (torch.float16, 30.0)])
def test_torch_fallback_keeps_the_absolute_bias_in_float32(dtype, strength):
    q, k, v = make_qkv(3, 20, 2, 32, dtype=dtype, layout="projection")
    kw = dict(sigma=2.0, strength=strength, mode="absolute")
    out = tar_attention(q, k, v, backend="torch", **kw)
    assert torch.isfinite(out).all()
    err, _, atol = reference_error(q, k, v, out, **kw)
    ext_err, _, _ = reference_error(q, k, v, tar_attention(q, k, v, backend="extension", **kw), **kw)
    assert err <= 2 * ext_err + atol, (err, ext_err)
    assert_matches_reference(out, q, k, v, **kw)


def test_bf16_on_the_triton_interpreter_is_refused_with_a_reason():
    q, k, v = make_qkv(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 under TRITON_INTERPRET=1 is refused"):
        tar_attention(q, k, v, sigma=1.0, backend="triton")
    assert backend_for("cpu", torch.bfloat16, 16) == "extension"  # auto never lands there


@pytest.mark.parametrize("offset", [2**53 + 1, -(2**53) - 1, 2**63])
def test_offsets_beyond_2_53_are_refused(offset):
    q, k, v = make_qkv(1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"within ±2\^53"):
        tar_attention(q, k, v, sigma=1.0, q_offset=offset)
    with pytest.raises(ValueError, match=r"within ±2\^53"):
        tar_attention(q, k, v, sigma=1.0, k_offset=offset)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_offsets_up_to_2_53_are_exact(backend):
    """Only the difference enters: offsets near 2^53 give exactly the bias of the small ones."""
    q, k, v = make_qkv(2, 7, 2, 16, len_k=11)
    near = tar_attention(q, k, v, sigma=2.0, q_offset=2**53, k_offset=2**53 - 3, backend=backend)
    small = tar_attention(q, k, v, sigma=2.0, q_offset=3, k_offset=0, backend=backend)
    torch.testing.assert_close(near, small, rtol=0, atol=0)
    far = tar_attention(q, k, v, sigma=2.0, q_offset=-(2**53) + 3, k_offset=-(2**53), backend=backend)
    torch.testing.assert_close(far, small, rtol=0, atol=0)
    assert_matches_reference(near, q, k, v, sigma=2.0, q_offset=2**53, k_offset=2**53 - 3)


# ----------------------------------------------------------------------------------------- builds and environment
def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          timeout=600)


@pytest.mark.parametrize("no_build", ["", "1"])
def test_a_finished_build_loads_from_a_read_only_cache(no_build):
    assert extension.load() is None  # the suite's own build exists
    res = _python("""
        import vstar_kernels.backends.extension_build as build
        def refuse(*args, **kwargs):
            raise PermissionError("read-only file system")
        build.file_lock = refuse  # taking the lock (which writes a lock file) fails, as in a read-only cache
        from vstar_kernels.backends import extension
        print("LOAD", extension.load())
    """, VSTAR_KERNELS_NO_BUILD=no_build)
    assert res.returncode == 0, res.stderr
    assert "LOAD None" in res.stdout


@pytest.mark.parametrize(("value", "disabled"), [("", False), ("0", False), ("false", False), ("Off", False),
                                                 ("no", False), ("1", True), ("true", True), ("YES", True)])
def test_no_build_flag_values(value, disabled, monkeypatch):
    monkeypatch.setenv(extension_build.NO_BUILD_ENV, value)
    assert extension_build.builds_disabled() is disabled


def test_no_build_flag_rejects_other_values(monkeypatch):
    monkeypatch.setenv(extension_build.NO_BUILD_ENV, "maybe")
    with pytest.raises(ValueError, match="VSTAR_KERNELS_NO_BUILD must be 1/true/yes/on or 0/false/no/off"):
        extension_build.builds_disabled()


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-3", "0"])
def test_bad_torch_budget_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv(torch_tar.BUDGET_ENV, value)
    q, k, v = make_qkv(1, 4, 1, 8)
    with pytest.raises(ValueError, match="VSTAR_KERNELS_TORCH_BUDGET_MB must be a"):
        tar_attention(q, k, v, sigma=1.0, backend="torch")


def test_info_works_without_diffusers():
    res = _python("""
        import sys
        sys.modules["diffusers"] = None  # as if it were not installed: importing it raises ImportError
        from vstar_kernels.cli import main
        raise SystemExit(main(["info"]))
    """)
    assert res.returncode == 0, res.stderr
    assert "backends on cpu:" in res.stdout


# --------------------------------------------------------------------------------------- argument checks at the door
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"strength": math.nan}, ValueError, "strength must be finite"),
    ({"strength": "1.0"}, TypeError, "strength must be a real number"),
    ({"strength": True}, TypeError, "strength must be a real number"),
    ({"timesteps": ("a", "b")}, TypeError, "t_lo must be a real number"),
    ({"timesteps": (None, 500)}, TypeError, "t_lo must be a real number"),
    ({"timesteps": (100, math.nan)}, ValueError, "t_hi must not be NaN"),
    ({"timesteps": "Paper"}, ValueError, "timesteps must be"),
])
def test_apply_tar_checks_arguments_before_patching(kwargs, error, match):
    unet = tiny_unet3d()
    before = dict(unet.attn_processors)
    with pytest.raises(error, match=match):
        apply_tar(unet, **kwargs)
    assert all(before[name] is p for name, p in unet.attn_processors.items())
    assert tar_state(unet) is None and not unet._forward_pre_hooks


@pytest.mark.parametrize(("change", "match"), [
    (lambda q, k, v: (q, k.half(), v, 1.0), "mismatched dtype"),
    (lambda q, k, v: (q, k[:, :, :1], v, 1.0), "mismatched heads"),
    (lambda q, k, v: (q, k, v[:, :3], 1.0), "mismatched frames|same number of frames"),
    (lambda q, k, v: (q, k, v, -1.0), "sigma must be > 0"),
    (lambda q, k, v: (q, k, v, 1.0, 1e39), "strength must be finite and fit in float32"),
    (lambda q, k, v: (q.double(), k.double(), v.double(), 1.0), "dtype must be float32, float16 or bfloat16"),
])
def test_fake_kernel_checks_what_the_real_kernel_checks(change, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert extension.load() is None
    op = torch.ops.vstar_kernels.tar_attention
    args = change(*make_qkv(2, 6, 2, 8))
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        op(*args)  # the real kernel refuses
    with FakeTensorMode() as mode, pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def test_synopsis_embeddings_take_numpy_integers_and_refuse_integer_keyframes():
    keys = torch.randn(3, 4, 8)
    torch.testing.assert_close(synopsis_embeddings(keys, np.int64(9)), synopsis_embeddings(keys, 9), rtol=0, atol=0)
    with pytest.raises(TypeError, match="floating point"):
        synopsis_embeddings(torch.arange(24).view(3, 4, 2), 9)


# ------------------------------------------------------------------------------------------------------- structure
def test_every_backend_implements_the_interface():
    for name, impl in BACKENDS.items():
        assert isinstance(impl, Backend) and name == impl.NAME


def test_backend_for_matches_what_a_call_runs():
    assert backend_for("cpu", torch.float32, 40) == "extension"
    assert backend_for("cpu", torch.float64, 40) == "torch"
    assert backend_for(torch.device("cpu"), torch.float16, 160, backend="torch") == "torch"


def test_presets_need_no_diffusers():
    res = _python("""
        import sys
        sys.modules["diffusers"] = None
        from vstar_kernels.presets import PRESETS, resolve_window
        print(sorted(PRESETS)[0], resolve_window("paper").fraction)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["64D1", str(14 / 25)]
