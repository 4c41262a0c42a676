"""The C++ extension backend: what the shared correctness matrix (test_op_correctness.py) does not cover.

bf16, long key rows (score strips of a few rows), the op's own validation (TORCH_CHECK), torch.library's opcheck,
torch.compile(fullgraph=True), "auto" on CPU, frame-distance profiles in the long-row kernel (key groups, skipped
when no row keeps them) and the kernel op's profile arguments, and the build switches (disabled build, failed
build) in subprocesses with their own cache folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_grads_match_reference, assert_matches_reference, make_qkv, on_one_and_two_threads

from vstar_kernels import FrameProfile, ops, tar_attention
from vstar_kernels.backends import extension
from vstar_kernels.contract import make_params
from vstar_kernels.ops import select_backend
from vstar_kernels.reference import tar_attention_reference

MODES = ("relative", "absolute")


@pytest.fixture(scope="module")
def op():
    assert extension.load() is None, extension.status()
    return torch.ops.vstar_kernels.tar_attention


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("frames", "dim", "layout"), [(16, 40, "projection"), (33, 80, "fused_qkv"),
                                                        (128, 64, "heads_first"), (7, 160, "permuted")])
def test_bf16(op, mode, frames, dim, layout):
    q, k, v = make_qkv(2, frames, 3, dim, dtype=torch.bfloat16, layout=layout)
    kw = dict(sigma=2.0, strength=2.0, mode=mode, q_offset=3)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_key_rows_use_narrow_strips(op, mode, dtype):
    """Lk = 3000: the per-thread score strip shrinks to 6 query rows; Lq = 9 leaves a 3-row remainder block."""
    q, k, v = make_qkv(1, 9, 2, 40, len_k=3000, dtype=dtype)
    kw = dict(sigma=50.0, strength=1.0, mode=mode, q_offset=1500)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


def test_auto_on_cpu_picks_the_extension(op):
    q = torch.zeros(1, 4, 1, 8)
    assert select_backend(q, make_params(8, sigma=1.0), "auto") is extension
    q64 = q.double()
    assert select_backend(q64, make_params(8, sigma=1.0), "auto").NAME == "torch"  # fp64 stays exact


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": float("nan")}, "sigma must be > 0"),
        ({"strength": float("inf")}, "strength must be finite"),
        ({"mode": "both"}, "mode must be 'relative' or 'absolute'"),
        ({"scale": -1.0}, "scale must be > 0"),
    ],
)
def test_op_checks_its_scalars(op, args, match):
    q, k, v = make_qkv(1, 4, 1, 8)
    kw = dict(sigma=1.0, strength=1.0, mode="relative", scale=1.0, q_offset=0, k_offset=0) | args
    with pytest.raises(RuntimeError, match=match):
        op(q, k, v, kw["sigma"], kw["strength"], kw["mode"], kw["scale"], kw["q_offset"], kw["k_offset"])


def test_op_checks_its_tensors(op):
    q, k, v = make_qkv(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op(q[0], k, v, 1.0)
    with pytest.raises(RuntimeError, match="mismatched dtypes"):
        op(q, k.half(), v, 1.0)
    with pytest.raises(RuntimeError, match="mismatched heads"):
        op(q, k[:, :, :1], v, 1.0)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        op(q.double(), k.double(), v.double(), 1.0)


def test_opcheck(op):
    """torch.library's own consistency checks: schema, fake (meta) kernel, dispatch under FakeTensor and AOT."""
    q, k, v = make_qkv(2, 12, 3, 40, layout="fused_qkv")
    torch.library.opcheck(op, (q, k, v, 2.0, 1.0, "relative", 0.2, 4, 0))
    torch.library.opcheck(op, (q, k, v, 2.0, 1.0, "absolute", 0.2, 0, 0))


def test_kernel_op_opcheck_with_chunks_row_max_and_lse(op):
    """The backend's op (folded layout, given row max, lse): torch.library's checks, inputs without grad."""
    q, k, v = make_qkv(2, 12, 3, 40, len_k=9, layout="permuted")
    kernel = torch.ops.vstar_kernels.tar_attention_kernel
    params = make_params(40, sigma=2.0, tokens_per_frame=4, video_start=3, q_token_offset=6, k_token_offset=1)
    layout = params.kernel_layout_args(12, 9)
    assert layout[1] < 0  # the query chunk begins inside a frame
    row_max = torch.randn(2, 3, 12).transpose(1, 2)  # any strides
    for extra in ((None, False), (row_max, True), (None, True)):
        torch.library.opcheck(kernel, (q, k, v, 2.0, 1.0, "relative", 0.2, params.offset_delta, *layout, *extra))
    torch.library.opcheck(torch.ops.vstar_kernels.tar_attention_kernel_backward,
                          (torch.randn(2, 12, 3, 40), q, k, v, 2.0, 1.0, "absolute", 0.2, 3, *layout))


@pytest.mark.parametrize(("change", "match"), [
    (dict(layout=(0, 0, 0, 12, 9)), "tokens_per_frame must be in"),
    (dict(layout=(4, -4, 0, 12, 9)), "video_start_q must be in"),
    (dict(layout=(4, 0, 0, 12, 10)), "video_end_k must be in"),
    (dict(offset_delta=2**54), "offset_delta must be within"),
    (dict(row_max=torch.zeros(2, 12, 3, dtype=torch.float64)), "row_max must be float32"),
    (dict(row_max=torch.zeros(2, 11, 3)), "row_max must have shape"),
    (dict(row_max=torch.zeros(2, 12, 3), mode="absolute"), "relative"),
])
def test_kernel_op_checks_its_layout_and_row_max(op, change, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(2, 12, 3, 8, len_k=9)
    kw = dict(mode="relative", offset_delta=0, layout=(4, 1, 1, 12, 9), row_max=None) | change
    args = (q, k, v, 1.0, 1.0, kw["mode"], 0.3, kw["offset_delta"], *kw["layout"], kw["row_max"], True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vstar_kernels.tar_attention_kernel(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=match):
        torch.ops.vstar_kernels.tar_attention_kernel(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                       for a in args])


@pytest.mark.parametrize("mode", MODES)
def test_long_rows_in_chunks_merge_to_the_whole_call(op, mode):
    """Key chunks of 1000+ tokens run the long-row kernel (key groups from the keys' own folded start): chunks cut
    inside frames, the global row max given, partials merged through their lse."""
    q, k, v = make_qkv(1, 2300, 2, 16, seed=8)
    kw = dict(sigma=1.5, strength=1.7, mode=mode, q_offset=3, k_offset=1, tokens_per_frame=100, video_start=13,
              video_tokens=2200)
    q0, q1, spans = 37, 90, ((0, 1137), (1137, 2300))
    rows = q[:, q0:q1]
    row_max = None
    if mode == "relative":
        row_max = torch.stack([ops.tar_row_max(rows, k[:, a:b]) for a, b in spans]).amax(0)
    parts = [tar_attention(rows, k[:, a:b], v[:, a:b], q_token_offset=q0, k_token_offset=a, row_max=row_max,
                           return_lse=True, backend="extension", **kw) for a, b in spans]
    merged, _ = ops.merge_partials(*zip(*parts, strict=True))
    truth = tar_attention_reference(q.double(), k.double(), v.double(), **kw)[:, q0:q1]
    assert (merged.double() - truth).abs().max().item() < 1e-5


def test_two_threads_give_the_one_thread_bits(op):
    """The kernels split (batch, head, query block) items over at::parallel_for threads. Under pytest-xdist every
    worker runs one intra-op thread (conftest.py), so the split is exercised here: on two threads the frame-axis and
    long-row forwards and the backward return exactly the one-thread tensors (which the rest of the suite checks
    against the reference)."""
    short = make_qkv(2, 33, 3, 40, layout="fused_qkv"), {}
    long = make_qkv(1, 1100, 2, 16, seed=3), dict(tokens_per_frame=100, video_start=0, video_tokens=1100)

    def run() -> list[torch.Tensor]:
        tensors = []
        for mode in MODES:
            for (q, k, v), layout in (short, long):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = tar_attention(*leaves, sigma=2.0, strength=1.5, mode=mode, backend="extension", **layout)
                grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
                tensors += [out, *torch.autograd.grad(out, leaves, grad_out)]
        return tensors

    one, two = on_one_and_two_threads(run)
    assert len(one) == len(two) == 16
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


# ------------------------------------------------------------------------------- frame-distance profiles, long rows
def _long_profiles(heads: int) -> dict[str, FrameProfile]:
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(heads, 6, generator=gen, dtype=torch.float64)
    bias[:, -1] = -torch.inf  # 5+ frames apart: masked
    bias[0, 2] = -torch.inf  # head 0 skips distance 2
    scale = 0.5 + torch.rand(heads, 4, generator=gen, dtype=torch.float64)
    return {
        "window-sinks": FrameProfile.window(1, sink_frames=2) + FrameProfile.gaussian(2.0, 1.5),
        "bias-masked": FrameProfile.table(bias=bias),
        "scale-per-head": FrameProfile.table(positive_scale=scale) + FrameProfile.gaussian(1.5),
        "composed": (FrameProfile.gaussian(1.5, 2.0) + FrameProfile.table(bias=bias[:, :4].clamp(min=-1.0))
                     + FrameProfile.window(2, sink_frames=1) + FrameProfile.decay_beyond(1, 0.7)),
    }


def _with_mode(profile: FrameProfile, mode: str) -> FrameProfile:
    if profile.sigma is None:
        return profile
    rest = FrameProfile(bias=profile.bias, positive_scale=profile.positive_scale, radius=profile.radius,
                        sink_frames=profile.sink_frames)
    return rest + FrameProfile.gaussian(profile.sigma, profile.strength, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["window-sinks", "bias-masked", "scale-per-head", "composed"])
@pytest.mark.parametrize("layout", [dict(tokens_per_frame=100), dict(tokens_per_frame=90, video_start=37),
                                    dict(tokens_per_frame=110, video_tokens=1100)])
def test_long_rows_with_profiles_match_the_reference(op, mode, name, layout):
    """Rows of 1200 keys take the long-row kernel (key groups per frame): windows with sinks, per-head masking bias
    tables, per-head scales, compositions; text tokens before or after the video (they see every key)."""
    heads = 2
    profile = _with_mode(_long_profiles(heads)[name], mode)
    q, k, v = make_qkv(1, 1200, heads, 16, seed=12, magnitude=1.5)
    kw = dict(profile=profile, q_offset=1, **layout)
    assert_matches_reference(tar_attention(q, k, v, backend="extension", **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_row_chunks_with_a_window_merge_to_the_whole(op, dtype):
    """Key chunks of 1000+ tokens cut inside frames with a window: some query rows keep no key of a chunk (zeros,
    lse -inf, whole key groups skipped), the relative row max over the kept keys of every chunk given, partials
    merged."""
    profile = FrameProfile.window(2, sink_frames=1) + FrameProfile.gaussian(1.5, 1.7)
    q, k, v = make_qkv(1, 3300, 2, 16, dtype=dtype, seed=8)
    kw = dict(tokens_per_frame=100, video_start=13)
    q0, q1, spans = 2800, 3300, ((0, 1137), (1137, 2750), (2750, 3300))
    rows = q[:, q0:q1]
    chunk = dict(kw, q_token_offset=q0)
    row_max = torch.stack([ops.tar_row_max(rows, k[:, a:b], profile=profile, k_token_offset=a, **chunk)
                           for a, b in spans]).amax(0)
    parts = [tar_attention(rows, k[:, a:b], v[:, a:b], profile=profile, k_token_offset=a, row_max=row_max,
                           return_lse=True, backend="extension", **chunk) for a, b in spans]
    out, lse = parts[1]
    dead = torch.isneginf(lse)
    assert dead.any() and not dead.all()  # the middle chunk is outside some rows' windows (no sink, no text there)
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    merged, _ = ops.merge_partials(*zip(*parts, strict=True))
    truth = tar_attention_reference(rows.double(), k.double(), v.double(), profile=profile, **chunk)
    assert (merged.double() - truth).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_long_rows_with_a_profile_on_two_threads_give_the_one_thread_bits(op):
    """The long-row kernel's key-group skipping is per task (a block of query rows): the thread split changes
    nothing."""
    profile = FrameProfile.window(1, sink_frames=1) + FrameProfile.decay_beyond(0, 0.8) + FrameProfile.gaussian(2.0)
    q, k, v = make_qkv(2, 1100, 2, 16, seed=3)
    kw = dict(profile=profile, tokens_per_frame=100, video_start=20, backend="extension")

    def run() -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = tar_attention(*leaves, **kw)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    one, two = on_one_and_two_threads(run)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_long_rows_profile_gradients_match_the_reference(op):
    """The backward of a windowed call over long rows (the whole-row backward kernel, masks and scales)."""
    profile = (FrameProfile.window(2, sink_frames=1) + FrameProfile.decay_beyond(1, 0.6)
               + FrameProfile.gaussian(2.0))
    q, k, v = make_qkv(1, 1050, 2, 16, seed=4)
    assert_grads_match_reference("extension", q, k, v, profile=profile, tokens_per_frame=75, video_start=25)


def test_kernel_op_opcheck_with_a_profile(op):
    """The kernel ops with their profile arguments: torch.library's checks."""
    q, k, v = make_qkv(2, 12, 3, 40, len_k=9, layout="permuted")
    params = make_params(40, sigma=2.0, tokens_per_frame=4, video_start=3, q_token_offset=6, k_token_offset=1)
    layout = params.kernel_layout_args(12, 9)
    bias = torch.randn(3, 4)
    bias[1, 3] = -torch.inf
    scale = torch.rand(1, 4) + 0.5
    kernel = torch.ops.vstar_kernels.tar_attention_kernel
    for tables, ints in (((bias, None), [4, 4, 1, 0]), ((None, scale), [4, 0, -1, 0]), ((None, None), [1, 0, 2, 1])):
        torch.library.opcheck(kernel, (q, k, v, 2.0, 1.0, "relative", 0.2, params.offset_delta, *layout, None, True,
                                       None, *tables, ints))
    torch.library.opcheck(torch.ops.vstar_kernels.tar_attention_kernel_backward,
                          (torch.randn(2, 12, 3, 40), q, k, v, 2.0, 1.0, "relative", 0.2, 3, *layout, None, bias,
                           None, [4, 4, 1, 0]))


@pytest.mark.parametrize(("tables", "ints", "match"), [
    ((torch.zeros(2, 4), None), [4, 4, -1, 0], "profile bias must be a contiguous float32 \\(3, 4\\)"),
    ((None, torch.ones(1, 4, dtype=torch.float64)), [4, 0, -1, 0], "profile scale must be a contiguous float32"),
    ((torch.zeros(3, 4).t(), None), [4, 4, -1, 0], "must be a contiguous float32"),
    ((None, None), [4, 2, -1, 0], "head_stride must be 0"),
    ((None, None), [0, 0, -1, 0], "table_len must be >= 1"),
    ((None, None), [1, 0, -2, 0], "radius must be >= 0, or -1"),
    ((None, None), [1, 0, -1], "profile must be \\(table_len, head_stride, radius, sink_limit\\)"),
    ((torch.zeros(1, 1), None), None, "profile tables need the profile's integers"),
])
def test_kernel_op_checks_its_profile(op, tables, ints, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(2, 12, 3, 8, len_k=9)
    args = (q, k, v, 1.0, 1.0, "relative", 0.3, 0, 4, 1, 1, 12, 9, None, False, None, *tables, ints)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vstar_kernels.tar_attention_kernel(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=match):
        torch.ops.vstar_kernels.tar_attention_kernel(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                       for a in args])


def test_profiles_run_on_the_extension(op):
    """A profile beyond a Gaussian band runs on the extension (no refusal), "auto" on CPU picks it."""
    q = torch.zeros(1, 4, 2, 8)
    profiles = (FrameProfile.window(2), FrameProfile.table(bias=torch.zeros(2, 3)), FrameProfile.decay_beyond(1, 0.5))
    for profile in profiles:
        params = make_params(8, profile=profile)
        assert extension.unsupported_reason(ops.InputSpec.of(q), params) is None
        assert select_backend(q, params, "auto") is extension


def test_torch_compile_fullgraph(op):
    """tar_attention(..., backend="extension") inside a compiled function: one graph, same numbers as eager."""
    torch._dynamo.reset()

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        qkv = (x @ w).view(x.shape[0], x.shape[1], 3, 4, 16)
        q, k, v = qkv.unbind(2)
        out = tar_attention(q, k, v, sigma=2.0, strength=1.0, backend="extension")
        return out.reshape(x.shape[0], x.shape[1], 64) * 2.0

    x = torch.randn(6, 24, 32, generator=torch.Generator().manual_seed(0))
    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), block(x, w), rtol=1e-5, atol=1e-5)
    compiled_inductor = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x, w), block(x, w), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- build switches (subprocesses)
_PROBE = textwrap.dedent(
    """
    import warnings, torch
    from vstar_kernels import tar_attention
    q = k = v = torch.randn(1, 8, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = tar_attention(q, k, v, sigma=1.0)
        tar_attention(q, k, v, sigma=1.0)
    ref = tar_attention(q, k, v, sigma=1.0, backend="torch")
    print("AUTO_EQUALS_TORCH", torch.equal(auto, ref))
    print("WARNINGS", len([w for w in caught if "falls back" in str(w.message)]))
    for w in caught:
        print("WARNING_TEXT", str(w.message).replace(chr(10), " | "))
    try:
        tar_attention(q, k, v, sigma=1.0, backend="extension")
    except RuntimeError as exc:
        print("EXPLICIT_RAISES", str(exc).replace(chr(10), " | "))
    """
)


def _probe(tmp_path: Path, **env: str) -> str:
    full_env = {**os.environ, "VSTAR_KERNELS_CACHE": str(tmp_path / "cache"), **env}
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full_env, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_build_disabled_falls_back_to_torch(tmp_path):
    out = _probe(tmp_path, VSTAR_KERNELS_NO_BUILD="1")
    assert "AUTO_EQUALS_TORCH True" in out
    assert "WARNINGS 0" in out  # a disabled build is a choice, not a failure
    assert "EXPLICIT_RAISES backend 'extension' cannot run this call: VSTAR_KERNELS_NO_BUILD=1" in out
    assert not any((tmp_path / "cache").glob("*/*.so"))


def _broken_compiler(tmp_path: Path) -> Path:
    """A C++ compiler that answers version probes like g++ (an argument that *is* a probe flag) and fails every
    compile. Matching "-v" anywhere would take a path such as -I/opt/my-venv/... for a probe and compile for real."""
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\nfor arg in "$@"; do case "$arg" in -v|--version|-dM|-dumpversion|-dumpfullversion)'
                      ' exec g++ "$@";; esac; done\n'
                      "echo 'fatal error: this compiler is broken on purpose'\nexit 1\n")
    broken.chmod(0o755)
    return broken


def test_the_broken_compiler_is_broken_from_any_venv_path(tmp_path):
    broken = _broken_compiler(tmp_path)
    (tmp_path / "x.cpp").write_text("int main() { return 0; }\n")
    compile_ = subprocess.run([str(broken), "-I/opt/my-venv/include", "-isystem", "/srv/x-venv/torch/include",
                               "-c", str(tmp_path / "x.cpp"), "-o", str(tmp_path / "x.o")], capture_output=True,
                              text=True)
    assert compile_.returncode == 1 and "broken on purpose" in compile_.stdout
    assert not (tmp_path / "x.o").exists()
    assert subprocess.run([str(broken), "--version"], capture_output=True).returncode == 0


def test_failed_build_warns_once_with_the_compiler_error_and_explicit_raises(tmp_path):
    broken = _broken_compiler(tmp_path)
    out = _probe(tmp_path, CXX=str(broken))
    assert "AUTO_EQUALS_TORCH True" in out
    assert "WARNINGS 1" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING_TEXT"))
    assert "broken on purpose" in warning
    explicit = next(line for line in out.splitlines() if line.startswith("EXPLICIT_RAISES"))
    assert "building or loading the C++ extension failed" in explicit and "broken on purpose" in explicit


def test_parallel_first_use_builds_once(tmp_path):
    """Two processes hitting a cold cache at once: the file lock lets one build; the other waits and loads it."""
    env = {**os.environ, "VSTAR_KERNELS_CACHE": str(tmp_path / "cache")}
    env.pop("VSTAR_KERNELS_NO_BUILD", None)
    code = ("import torch; from vstar_kernels import tar_attention as t; q = torch.randn(1, 8, 2, 16); "
            "print(float((t(q, q, q, sigma=1.0, backend='extension') - t(q, q, q, sigma=1.0, backend='torch'))"
            ".abs().max()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert all(float(out.strip()) < 1e-5 for out, _ in results)
    assert sum(err.count("building the C++ extension") for _, err in results) == 1
    assert len(list((tmp_path / "cache").glob("*/vstar_kernels_ext.so"))) == 1


def test_ahead_of_time_build(tmp_path):
    """VSTAR_KERNELS_BUILD_EXT=1 builds vstar_kernels/_C into the wheel; the package loads it without a JIT build."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VSTAR_KERNELS_BUILD_EXT": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True, env=env, timeout=900,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    assert list((tmp_path / "site" / "vstar_kernels").glob("_C*.so"))
    assert (tmp_path / "site" / "vstar_kernels" / "csrc" / "tar_attention.h").is_file()
    run_env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "VSTAR_KERNELS_NO_BUILD": "1",
               "VSTAR_KERNELS_CACHE": str(tmp_path / "empty-cache")}
    code = "from vstar_kernels.backends import extension as e; print(e.load(), e.status()['location'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("None ") and "_C" in res.stdout
