"""CUDA-only checks of the Triton kernels and the extension's CUDA kernels, forward and backward: bf16, gradients
against the float64 reference, batch*heads beyond the 65,535 grid limit, a timed run.

They skip cleanly on machines without CUDA (every machine of this project today). Under TRITON_INTERPRET=1 the
Triton backend is CPU-only, so run these with ``TRITON_INTERPRET=0 pytest tests/test_cuda.py`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv

from vstar_kernels import tar_attention
from vstar_kernels.backends import triton_tar

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(triton_tar.INTERPRETER, reason="TRITON_INTERPRET=1 runs Triton on CPU tensors only"),
]


def _cuda(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.cuda() for t in tensors)


@pytest.mark.parametrize("backend", ["triton", "extension"])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("frames", "dim"), [(16, 40), (33, 64), (128, 80), (200, 160), (300, 64), (17, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(backend, mode, frames, dim, dtype):
    q, k, v = _cuda(*make_qkv(4, frames, 5, dim, dtype=dtype, layout="fused_qkv"))
    kw = dict(sigma=2.0, strength=1.0, mode=mode, q_offset=3)
    out = tar_attention(q, k, v, backend=backend, **kw)
    assert_matches_reference(out.cpu(), *(t.cpu() for t in (q, k, v)), **kw)


def test_cuda_auto_picks_triton():
    q, k, v = _cuda(*make_qkv(2, 16, 2, 64, dtype=torch.float16))
    out = tar_attention(q, k, v, sigma=1.0)
    ref = tar_attention(q, k, v, sigma=1.0, backend="triton")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", ["triton", "extension"])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_cuda_batch_heads_beyond_65535(backend, mode):
    """batch*heads = 70,000 on grid axis 0 (xformers / SDPA-efficient / FlexAttention stop at 65,535)."""
    q, k, v = _cuda(*make_qkv(8750, 16, 8, 40, dtype=torch.float16, layout="projection"))
    kw = dict(sigma=1.0, strength=1.0, mode=mode)
    out = tar_attention(q, k, v, backend=backend, **kw)
    idx = torch.tensor([0, 4321, 8749])  # check sequences at the start, middle and end of the grid
    assert torch.isfinite(out).all()
    assert_matches_reference(out[idx].cpu(), *(t[idx].cpu() for t in (q, k, v)), **kw)


@pytest.mark.parametrize("backend", ["triton", "extension"])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize(("frames", "dim", "len_k", "q_offset"), [
    (16, 40, None, 0), (19, 80, 23, 4), (160, 64, None, 0), (1, 40, None, 0), (33, 160, None, 2), (17, 256, None, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_gradients_match_the_float64_reference(backend, mode, frames, dim, len_k, q_offset, dtype):
    """The fused backward kernels (Triton fp16/bf16, the .cu's two kernels; Triton fp32 takes the torch backward)."""
    q, k, v = _cuda(*make_qkv(2, frames, 3, dim, dtype=dtype, len_k=len_k, layout="fused_qkv"
                              if len_k is None else "projection"))
    assert_grads_match_reference(backend, q, k, v, sigma=2.0, strength=1.5, mode=mode, q_offset=q_offset)


@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_cuda_gradients_with_tied_row_maxima(backend):
    """Identical key frames (a static first frame) tie the row max: its gradient is split among them."""
    q, k, v = make_qkv(2, 40, 2, 64, dtype=torch.float16, seed=4)
    k = k.clone()
    k[:, 25] = k[:, 3]
    k[:, 37] = k[:, 3]
    q = q.clone()
    q[:, :6] = k[:, 3:4] * 2
    assert_grads_match_reference(backend, *_cuda(q, k, v), sigma=3.0, strength=2.0)


@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_cuda_backward_batch_heads_beyond_65535(backend):
    q, k, v = (t.requires_grad_() for t in _cuda(*make_qkv(8750, 16, 8, 40, dtype=torch.float16)))
    grad_out = torch.randn_like(q)
    dq, dk, dv = torch.autograd.grad(tar_attention(q, k, v, sigma=1.0, backend=backend), (q, k, v), grad_out)
    idx = torch.tensor([0, 4321, 8749])
    leaves = [t[idx].detach().cpu().double().requires_grad_() for t in (q, k, v)]
    from vstar_kernels import tar_attention_reference

    ref = torch.autograd.grad(tar_attention_reference(*leaves, sigma=1.0), leaves, grad_out[idx].cpu().double())
    for g, r in zip((dq, dk, dv), ref, strict=True):
        torch.testing.assert_close(g[idx].cpu().double(), r, rtol=2e-2, atol=2e-2)


def test_cuda_timed_run_reports_kernel_and_sdpa_time():
    """Times the kernel and plain SDPA with CUDA events; reports them, asserts only that both ran correctly."""
    q, k, v = _cuda(*make_qkv(4096, 64, 5, 64, dtype=torch.float16))
    kw = dict(sigma=1.0, strength=1.0, mode="relative")
    times = {}
    for name, fn in {
        "triton": lambda: tar_attention(q, k, v, backend="triton", **kw),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))),
    }.items():
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 10
    print(f"relative TAR (triton) {times['triton']:.3f} ms, plain SDPA {times['sdpa']:.3f} ms")
    assert all(t > 0 for t in times.values())


# ------------------------------------------------------------------------------------ streams, devices, sanitizer
@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_cuda_runs_on_the_current_non_default_stream(backend):
    """The side stream first spins, then writes the inputs, then calls the op: a kernel launched on any other stream
    would read the zeros that are there before the spin ends, and the output would be wrong."""
    src = _cuda(*make_qkv(64, 24, 8, 40, dtype=torch.float16, layout="projection"))
    q, k, v = (torch.zeros_like(t) for t in src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of spinning on the side stream
        for dst, s in zip((q, k, v), src, strict=True):
            dst.copy_(s)
        out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    side.synchronize()
    assert_matches_reference(out.cpu(), *(t.cpu() for t in src), sigma=2.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_cuda_runs_on_the_inputs_device_not_the_current_one(backend):
    q, k, v = (t.to("cuda:1") for t in make_qkv(16, 17, 8, 80, dtype=torch.float16, layout="fused_qkv"))
    torch.cuda.set_device(0)
    before = torch.cuda.memory_allocated(0)
    q.requires_grad_()
    out = tar_attention(q, k, v, sigma=2.0, backend=backend)
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    torch.cuda.synchronize(1)
    assert out.device == dq.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0 and torch.cuda.memory_allocated(0) == before
    assert_matches_reference(out.detach().cpu(), *(t.detach().cpu() for t in (q, k, v)), sigma=2.0)


def _compute_sanitizer() -> str | None:
    import os
    import shutil

    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found is None and root and os.path.isfile(f"{root}/bin/compute-sanitizer"):
            found = f"{root}/bin/compute-sanitizer"
    return found


@pytest.mark.slow
@pytest.mark.skipif(_compute_sanitizer() is None, reason="compute-sanitizer not found")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_cuda_kernels_are_clean_under_compute_sanitizer(tool, backend):
    """Forward and backward over head_dim {40, 80, 160, 256} x frames {1, 17, 300} (tests/sanitizer_worker.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("sanitizer_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    proc = subprocess.run([_compute_sanitizer(), "--tool", tool, "--error-exitcode", "99", sys.executable,
                           str(worker), backend], capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cuda_bandwidth_report(tmp_path):
    """bench/bandwidth.py at F = 128 and 256 with batch·heads >= 10^4: every cell ran, is correct, and reports a
    bandwidth. The figures go in the closing note; the test asserts no speed."""
    import csv

    from bench import bandwidth

    assert bandwidth.main(["--out", str(tmp_path), "--repeats", "5"]) == 0
    with open(tmp_path / "bandwidth.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {int(r["frames"]) for r in rows} == {128, 256}
    assert all(int(r["batch_heads"]) >= 10_000 for r in rows)
    assert all(float(r["gb_per_s"]) > 0 and r["correct"] == "True" for r in rows)
