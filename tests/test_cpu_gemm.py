"""The CPU kernels' GEMM engines (csrc/cpu_gemm.h): every engine this machine runs, against the float64 reference.

- ``brgemm_native``: bf16/fp16 operands on ``at::native::cpublas::brgemm``, B packed for AMX where oneDNN packs it,
  else cpublas' unpacked fallback (so the reduced-precision products, P rounded to the dtype, run here too);
- ``brgemm_f32``: fp32 operands (bf16/fp16 widened) on ``cpublas::brgemm``;
- ``microkernel``: the hand-written fp32 kernel.

Each runs the whole-row kernel (temporal attention), the long-row kernel (a transformer's 3D attention) and the
backward, in fp32/bf16/fp16, odd F, head_dim 40/80/160, both modes, strided inputs, offsets, varlen keys and a
profile. The AVX2 build of the extension (``ATEN_CPU_CAPABILITY=avx2``, oneDNN and MKL held to AVX2) runs in a
subprocess; the AMX path (packed B) only on a CPU where oneDNN packs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv, on_one_and_two_threads

from vstar_kernels import FrameProfile, tar_attention
from vstar_kernels.backends import extension

pytestmark = pytest.mark.skipif(extension.load() is not None, reason=f"extension unavailable: {extension.load()}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _engines_here() -> list[str]:
    if extension.load() is not None:
        return []
    info = extension.cpu_gemm_info()
    engines = ["microkernel"]
    if info["brgemm_f32"]:
        engines.append("brgemm_f32")
        if info["native_bf16"] and info["native_f16"]:
            engines.append("brgemm_native")
    return engines


ENGINES = _engines_here()


@pytest.fixture(params=ENGINES)
def engine(request):
    extension.set_cpu_gemm(request.param)
    yield request.param
    extension.set_cpu_gemm("auto")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("frames", "dim"), [(7, 40), (33, 80), (17, 160), (64, 33)])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_whole_row_forward_matches_reference(engine, dtype, frames, dim, mode):
    q, k, v = make_qkv(3, frames, 2, dim, dtype=dtype, layout="fused_qkv", seed=frames + dim)
    kw = dict(sigma=2.5, strength=1.5, mode=mode, q_offset=2, k_offset=5)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_row_varlen_keys_and_large_inputs(engine, dtype):
    """Odd key counts (the native engine pads the reduction to even) and NaN planted past them: never read."""
    q, k, v = make_qkv(3, 21, 2, 40, dtype=dtype, layout="heads_first", magnitude=8.0, seed=3)
    lengths = torch.tensor([21, 7, 12])
    k, v = k.clone(), v.clone()
    k[1, 7:] = float("nan")
    v[1, 7:] = float("nan")
    kw = dict(sigma=1.7, strength=2.0, mode="relative")
    out = tar_attention(q, k, v, backend="extension", k_lengths=lengths, **kw)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths.tolist()):
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]
        assert_matches_reference(out[b:b + 1], qb, kb, vb, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_long_rows_match_reference(engine, dtype, mode):
    """A transformer's 3D attention: 1,100 tokens in frames of 100, text first; a profile on top."""
    q, k, v = make_qkv(1, 1100, 2, 80, dtype=dtype, layout="projection", seed=11)
    profile = FrameProfile.gaussian(2.0, strength=1.5, mode=mode) + FrameProfile.decay_beyond(3, 0.9)
    kw = dict(profile=profile, tokens_per_frame=100, video_start=100)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows_with_varlen_keys_stop_mid_frame(engine, dtype):
    """Key counts that end inside a frame and inside a 256-key tile (odd ones too), NaN planted past them."""
    q, k, v = make_qkv(3, 1290, 1, 40, dtype=dtype, layout="fused_qkv", seed=13)
    lengths = torch.tensor([1290, 1031, 1100])
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    kw = dict(sigma=1.5, strength=1.5, mode="relative", tokens_per_frame=300, video_start=90)
    out = tar_attention(q, k, v, backend="extension", k_lengths=lengths, **kw)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths.tolist()):
        assert_matches_reference(out[b:b + 1], q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("frames", "dim"), [(9, 40), (33, 80), (16, 160)])
def test_backward_matches_reference(engine, dtype, frames, dim):
    q, k, v = make_qkv(2, frames, 2, dim, dtype=dtype, layout="fused_qkv", seed=frames)
    assert_grads_match_reference("extension", q, k, v, sigma=2.0, strength=1.5, mode="relative", q_offset=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_with_varlen_keys(engine, dtype):
    """Odd key counts: the native backward pads its reductions to even with zeros; NaN past them never read."""
    q, k, v = make_qkv(2, 19, 2, 40, dtype=dtype, layout="fused_qkv", seed=4)
    lengths = torch.tensor([19, 7])
    k, v = k.clone(), v.clone()
    k[1, 7:] = float("nan")
    v[1, 7:] = float("nan")
    kw = dict(sigma=1.5, strength=2.0, mode="relative", backend="extension")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = tar_attention(*leaves, k_lengths=lengths, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][1, 7:] == 0).all() and (grads[2][1, 7:] == 0).all()
    for b, n in enumerate(lengths.tolist()):
        part = [q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]]
        sub = [t.detach().requires_grad_() for t in part]
        ref_grads = torch.autograd.grad(tar_attention(*sub, **kw), sub, grad_out[b:b + 1])
        for got, want in zip((grads[0][b:b + 1], grads[1][b:b + 1, :n], grads[2][b:b + 1, :n]), ref_grads,
                             strict=True):
            torch.testing.assert_close(got, want)  # the same kernel on the truncated keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_on_long_rows(engine, dtype):
    """1,100 keys: the backward's long-row blocks (64 query rows) and the engine's blocks of 256 keys, text first."""
    q, k, v = make_qkv(1, 1100, 1, 40, dtype=dtype, layout="projection", seed=21)
    assert_grads_match_reference("extension", q, k, v, sigma=2.0, strength=1.5, mode="relative", tokens_per_frame=100,
                                 video_start=100)


def test_backward_with_profile_and_text(engine):
    q, k, v = make_qkv(1, 70, 2, 40, layout="projection", seed=5)
    profile = FrameProfile.window(2, sink_frames=1) + FrameProfile.gaussian(1.5)
    assert_grads_match_reference("extension", q, k, v, profile=profile, tokens_per_frame=10, video_start=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_threads_give_the_one_thread_bits(engine, dtype):
    """Each engine runs single-threaded inside the kernels' tasks (at::parallel_for over batch, head and query
    block): two threads change no bit of the whole-row and long-row forwards or the backward."""
    cases = ((make_qkv(2, 33, 2, 40, dtype=dtype, layout="fused_qkv"), {}),
             (make_qkv(1, 1100, 2, 16, dtype=dtype, seed=3), dict(tokens_per_frame=100, video_start=50)))

    def run() -> list[torch.Tensor]:
        tensors = []
        for (q, k, v), layout in cases:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = tar_attention(*leaves, sigma=2.0, strength=1.5, backend="extension", **layout)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            tensors += [out, *torch.autograd.grad(out, leaves, grad_out)]
        return tensors

    one, two = on_one_and_two_threads(run)
    assert len(one) == len(two) == 8
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_engines_agree_with_each_other_in_fp32():
    """The same call on every engine: fp32 results within rounding of each other (different summation orders)."""
    q, k, v = make_qkv(4, 96, 2, 64, layout="fused_qkv", seed=8)
    outs = []
    for name in ENGINES:
        extension.set_cpu_gemm(name)
        outs.append(tar_attention(q, k, v, sigma=3.0, backend="extension"))
    extension.set_cpu_gemm("auto")
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_info_names_the_isa_amx_and_each_dtypes_engine():
    info = extension.cpu_gemm_info()
    assert info["isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["amx_tile"] == torch.cpu._is_amx_tile_supported()
    assert info["override"] == "auto"
    for dtype in ("float32", "bfloat16", "float16"):
        assert str(info[dtype]).split(" ")[0].split("+")[0] in extension.CPU_GEMM_ENGINES
    # fp32: the engine on AVX-512 builds, the micro-kernel on AVX2 builds (measured faster there) and where it fails
    want = "brgemm_f32" if info["brgemm_f32"] and info["isa"] == "AVX512" else "microkernel"
    assert str(info["float32"]).split(" ")[0] == want
    if not info["onednn_packs"]:  # without AMX, bf16/fp16 are widened: MKL's bf16 GEMM is slower than fp32's here
        assert str(info["bfloat16"]).split(" ")[0] == str(info["float32"]).split(" ")[0]
    else:
        assert str(info["bfloat16"]).startswith("brgemm_native+packed")


def test_forcing_an_engine_is_reported_and_restored():
    extension.set_cpu_gemm("microkernel")
    try:
        info = extension.cpu_gemm_info()
        assert info["override"] == "microkernel"
        assert all(info[d] == "microkernel" for d in ("float32", "bfloat16", "float16"))
    finally:
        extension.set_cpu_gemm("auto")
    assert extension.cpu_gemm_info()["override"] == "auto"


def test_unknown_engines_raise_before_anything_runs(monkeypatch):
    with pytest.raises(ValueError, match="unknown CPU GEMM engine 'amx'"):
        extension.set_cpu_gemm("amx")
    with pytest.raises(RuntimeError, match="unknown CPU GEMM engine"):
        torch.ops.vstar_kernels.set_cpu_gemm("fast")
    monkeypatch.setenv(extension.CPU_GEMM_ENV, "fastest")
    with pytest.raises(ValueError, match="VSTAR_KERNELS_CPU_GEMM must be one of"):
        extension.requested_cpu_gemm()


@pytest.mark.skipif(not extension.cpu_gemm_info()["onednn_packs"] if extension.load() is None else True,
                    reason="the AMX path (bf16/fp16 B packed by oneDNN) needs a CPU with AMX: not this one")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_amx_packed_path_matches_reference(dtype):
    if dtype == torch.float16 and not extension.cpu_gemm_info()["float16"].startswith("brgemm_native+packed"):
        pytest.skip("oneDNN packs bf16 but not fp16 on this CPU")
    extension.set_cpu_gemm("auto")
    for frames, dim in ((7, 40), (64, 80), (130, 160)):
        q, k, v = make_qkv(2, frames, 2, dim, dtype=dtype, layout="fused_qkv", seed=frames)
        kw = dict(sigma=2.0, strength=1.5, mode="relative")
        assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


AVX2_SCRIPT = """
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv, on_one_and_two_threads
from vstar_kernels import tar_attention
from vstar_kernels.backends import extension

assert extension.load() is None, extension.load()
info = extension.cpu_gemm_info()
assert info["isa"] == "AVX2" and info["float32"] == "microkernel", info
for engine in ("microkernel", "brgemm_f32", "brgemm_native"):
    extension.set_cpu_gemm(engine)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for frames, dim, tpf in ((7, 40, 1), (33, 160, 1), (1100, 80, 100)):
            q, k, v = make_qkv(1, frames, 2, dim, dtype=dtype, layout="fused_qkv", seed=frames)
            kw = dict(sigma=2.0, strength=1.5, mode="relative", tokens_per_frame=tpf)
            assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)
    q, k, v = make_qkv(2, 17, 2, 40, layout="fused_qkv")
    assert_grads_match_reference("extension", q, k, v, sigma=2.0, mode="relative")
print("avx2 ok")
"""


@pytest.mark.skipif(sys.platform != "linux" or not torch.cpu._is_avx2_supported(), reason="an x86 CPU with AVX2")
def test_avx2_build_matches_reference():
    """The extension built for AVX2 (the ISA switch of extension_build: torch's ATEN_CPU_CAPABILITY), with oneDNN
    and MKL held to AVX2 as on an AVX2-only CPU, on every engine."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env.pop(extension.CPU_GEMM_ENV, None)
    proc = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "avx2 ok" in proc.stdout, proc.stderr[-4000:]
