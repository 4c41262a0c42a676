"""Smoke runs of the benchmark harness at toy sizes (the real runs live in bench/results/), and its helpers."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vstar_kernels.bench.measure import OOM, failure_status, run_child
from vstar_kernels.bench.providers import FLEX_COMPILE_ENV, PROVIDERS, flex_compiled, make_case
from vstar_kernels.bench.sweep import analytic, device_peak_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]
# FlexAttention compiles once per shape under torch.compile (minutes on a 2-core CPU): the suite runs it eagerly
# (same results) unless VSTAR_BENCH_FLEX_COMPILE=1 asks for the compiled provider, which test_flex_compiles runs.
FLEX_COMPILE = os.environ.get(FLEX_COMPILE_ENV) == "1"


@pytest.fixture(autouse=True)
def _flex_eager_unless_asked(monkeypatch):
    """In this process and in the benchmark subprocesses (they inherit the environment)."""
    monkeypatch.setenv(FLEX_COMPILE_ENV, "1" if FLEX_COMPILE else "0")


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_every_provider_computes_tar_where_it_can():
    """Each provider's output equals the op's (the benchmark compares like with like)."""
    for mode in ("relative", "absolute"):
        case = make_case(96, 12, 2, 40, mode, sigma=3.0, strength=2.0)
        expected = PROVIDERS["torch"].build(case)()
        for name, provider in PROVIDERS.items():
            reason = provider.unavailable(case)
            if reason is not None:
                assert name in ("flex", "flex_two_pass", "triton", "xformers"), (name, reason)
                continue
            out = provider.build(case)()
            if name == "sdpa":  # the floor: plain attention, no bias
                assert not torch.allclose(out, expected, atol=1e-3)
            else:
                torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-5, msg=f"{name} {mode}")


def test_flex_runs_compiled_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(FLEX_COMPILE_ENV)
    assert flex_compiled()
    for value, compiled in (("0", False), ("off", False), ("1", True)):
        monkeypatch.setenv(FLEX_COMPILE_ENV, value)
        assert flex_compiled() == compiled


@pytest.mark.skipif(not FLEX_COMPILE, reason=f"compiles FlexAttention (minutes on a CPU): set {FLEX_COMPILE_ENV}=1")
def test_flex_compiles():
    """The compiled FlexAttention provider computes absolute TAR (the suite's other tests run it eagerly)."""
    case = make_case(64, 16, 2, 16, "absolute", sigma=3.0, strength=2.0)
    torch.testing.assert_close(PROVIDERS["flex"].build(case)(), PROVIDERS["torch"].build(case)(), rtol=2e-4,
                               atol=2e-5)


def test_forward_backward_thunks_give_the_gradient_of_the_fused_projection():
    """With --backward every provider computes d(loss)/d(fused QKV) of its own forward; the TAR providers agree with
    the float64 reference's autograd."""
    from vstar_kernels import tar_attention_reference
    from vstar_kernels.bench.providers import forward_backward

    for mode in ("relative", "absolute"):
        case = make_case(96, 12, 2, 16, mode, sigma=3.0, strength=2.0, requires_grad=True)
        leaf = case.q._base
        grad_out = torch.randn((*case.q.shape[:3], 16), generator=torch.Generator().manual_seed(1))
        fused64 = leaf.detach().double().requires_grad_()
        q, k, v = (t.view(case.q.shape) for t in fused64.split(2 * 16, dim=-1))
        out = tar_attention_reference(q, k, v, sigma=3.0, strength=2.0, mode=mode)
        (expected,) = torch.autograd.grad(out, fused64, grad_out.double())
        for name in ("naive", "sdpa_bias", "extension", "torch"):
            grad = forward_backward(PROVIDERS[name].build(case), case)()
            assert grad.shape == leaf.shape
            torch.testing.assert_close(grad.double(), expected, rtol=1e-3, atol=1e-4, msg=f"{name} {mode}")
    with pytest.raises(ValueError, match="requires_grad=True"):
        forward_backward(PROVIDERS["torch"].build(make_case(96, 12, 2, 16, "relative")), make_case(96, 12, 2, 16,
                                                                                                "relative"))


def test_bench_backward_smoke(tmp_path):
    cmd = [sys.executable, "-m", "vstar_kernels.cli", "bench", "--backward", "--shapes", "animatediff-h8-d40",
           "--frames", "8", "--modes", "relative", "--providers", "sdpa", "extension", "torch", "--tokens", "64",
           "--rounds", "2", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(tmp_path / "sweep_backward.csv")
    assert [r["provider"] for r in rows] == ["sdpa", "extension", "torch"]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 and r["peak_mib"] for r in rows)
    assert (tmp_path / "sweep_backward_time_cpu.png").is_file() and not (tmp_path / "sweep.csv").exists()


def test_analytic_minimum_bytes_and_flops():
    min_bytes, gflop = analytic(batch=3, frames=16, heads=5, head_dim=40, dtype=torch.float16)
    assert min_bytes == 4 * 3 * 16 * 5 * 40 * 2
    assert gflop == pytest.approx(4 * 3 * 5 * 16 * 16 * 40 / 1e9)
    assert device_peak_bandwidth_gbs(torch.device("cpu")) is None


def test_failure_status_classifies_out_of_memory():
    assert failure_status(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == OOM
    assert failure_status(MemoryError()) == OOM
    assert failure_status(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory")) == OOM
    assert failure_status(ValueError("bad shape\nmore")) == "error: bad shape"


def test_child_killed_by_the_os_is_recorded_as_oom(tmp_path, monkeypatch):
    (tmp_path / "killed_child.py").write_text(f"import os\nos.kill(os.getpid(), {int(signal.SIGKILL)})\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert run_child("killed_child", {}) == {"status": OOM}


def test_bench_command_smoke(tmp_path):
    """vstar-kernels bench at toy sizes: rows for every provider (FlexAttention saying why it has no relative mode;
    eager here, unless VSTAR_BENCH_FLEX_COMPILE=1), ratios to SDPA, the analytic columns, and the time plot. Without
    memory: a subprocess per provider and point took most of this test's time; the backward, DiT and end-to-end
    smoke runs measure memory in subprocesses."""
    cmd = [sys.executable, "-m", "vstar_kernels.cli", "bench", "--shapes", "animatediff-h8-d40", "--frames", "8", "16",
           "--tokens", "64", "--rounds", "2", "--memory", "none", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("FlexAttention runs eagerly" in res.stderr) != FLEX_COMPILE
    rows = _rows(tmp_path / "sweep.csv")
    assert len(rows) == 2 * 2 * len(PROVIDERS)  # frames x modes x providers
    by = {(r["frames"], r["mode"], r["provider"]): r for r in rows}
    assert by[("8", "relative", "flex")]["status"].startswith("unavailable: relative mode needs the row max")
    assert by[("8", "absolute", "flex")]["status"] == "ok"
    assert by[("16", "relative", "xformers")]["status"].startswith("unavailable")
    for frames in ("8", "16"):
        for mode in ("relative", "absolute"):
            assert float(by[(frames, mode, "sdpa")]["ratio_to_sdpa"]) == 1.0
            ext = by[(frames, mode, "extension")]
            assert ext["status"] == "ok" and float(ext["median_ms"]) > 0
            assert int(ext["min_bytes"]) == 4 * int(ext["batch"]) * int(frames) * 8 * 40 * 4
    assert all(r["peak_mib"] == "" for r in rows)  # --memory none
    assert {r["run_id"] for r in rows} == {rows[0]["run_id"]} and rows[0]["torch"] == torch.__version__
    assert (tmp_path / "sweep_time_cpu.png").stat().st_size > 10_000


@pytest.mark.parametrize("args", [["--frames", "0"], ["--tokens", "0"], ["--device", "cuda"]])
def test_bench_command_bad_arguments(args):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "bench", *args], capture_output=True, text=True)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr


@pytest.mark.parametrize(("module", "options"), [("rich", []), ("matplotlib", []), ("rich", ["--no-plot"])])
def test_bench_without_its_extra_refuses_before_any_work(monkeypatch, tmp_path, module, options):
    """Only [diffusers] installed: one line naming the bench extra, before the first point is measured."""
    from vstar_kernels.bench import sweep
    from vstar_kernels.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # what an absent module looks like to find_spec and import
    monkeypatch.setattr(sweep, "measure_point", lambda *a, **k: pytest.fail("the sweep started before the check"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--frames", "8", "--tokens", "64", *options, "--out", str(tmp_path / "out")])
    message = str(exc.value.code)
    assert message == f"error: the sweep needs {module}, not installed: pip install 'vstar-kernels[bench]'"
    assert not (tmp_path / "out").exists()


def test_bench_without_matplotlib_runs_with_no_plot(monkeypatch, tmp_path):
    from vstar_kernels.bench import sweep
    from vstar_kernels.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ran = []
    monkeypatch.setattr(sweep, "run", lambda args: ran.append(args.no_plot))
    assert main(["bench", "--no-plot", "--out", str(tmp_path)]) == 0 and ran == [True]


def test_bench_help_gives_defaults_and_the_cost_of_a_run(capsys):
    from vstar_kernels.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for default in ("(default: 16 32 64 128 256 512)", "(default: 8192)", "(default: 10)", "(default: first)",
                    "(default: bench-results)", "(default: relative absolute)", "(default: all)"):
        assert default in text, default
    assert "72 points" in text and "2 CPU cores" in text and "TBD" not in text


def test_microbenchmarks_collect_and_run_once():
    """The pytest-benchmark file runs (benchmarks disabled: one call each) at a toy size."""
    env = {**os.environ, "VSTAR_BENCH_TOKENS": "64"}
    cmd = [sys.executable, "-m", "pytest", "bench/test_microbench.py", "--benchmark-disable", "-q", "-p",
           "no:cacheprovider", "-k", "animatediff-h8-d40-16- and not flex"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout


def test_microbenchmarks_without_pytest_benchmark_name_the_extra():
    code = ("import sys; sys.modules['pytest_benchmark'] = None; import pytest; "  # as if it were not installed
            "sys.exit(pytest.main(['bench/test_microbench.py', '--benchmark-only', '-p', 'no:cacheprovider']))")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode != 0
    assert "needs pytest-benchmark, not installed: pip install 'vstar-kernels[bench]'" in res.stdout + res.stderr


def test_end_to_end_smoke(tmp_path):
    """bench.e2e at 40 frames (past AnimateDiff's released 32-row position tables) on an 8x8 latent: a row per
    (model, processor) and the plot."""
    cmd = [sys.executable, "-m", "bench.e2e", "--frames", "40", "--latent", "8", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(tmp_path / "e2e.csv")
    assert {(r["model"], r["processor"]) for r in rows} == {
        (m, p) for m in ("unet3d", "animatediff") for p in ("none", "naive", "apply_tar")}
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in rows)
    assert (tmp_path / "e2e_cpu.png").is_file()


def test_extension_table_smoke(tmp_path, monkeypatch, capsys):
    """bench.extension_table at toy sizes: a CSV row per (pass, dtype, mode, shape, provider) with the machine's
    columns, SDPA rows at ratio 1, every table headed by the machine, and a summary line per (kind, pass, dtype)."""
    from vstar_kernels.backends import extension

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(extension, "cpu_gemm_info", lambda: {"isa": "TEST", "amx": False}, raising=False)
    from bench.extension_table import CSV_FIELDS, main

    out = tmp_path / "t.csv"
    assert main(["--frames", "8", "16", "--head-dims", "16", "--tokens", "64", "--heads", "2", "--rounds", "1",
                 "--dtypes", "float32", "bfloat16", "--modes", "relative", "--backward", "--backward-rounds", "1",
                 "--dit", "--dit-lengths", "64", "--dit-heads", "1", "--dit-head-dim", "16", "--csv", str(out),
                 "--markdown", str(tmp_path / "t.md")]) == 0
    with out.open() as handle:
        assert tuple(next(csv.reader(handle))) == CSV_FIELDS
    rows = _rows(out)
    shapes = [("temporal", "8", "1"), ("temporal", "16", "1"), ("dit", "64", "4")]
    expected = [(kind, p, dtype, length, per, provider) for p in ("forward", "forward+backward")
                for dtype in ("float32", "bfloat16") for kind, length, per in shapes
                for provider in ("sdpa", "extension")]
    assert sorted((r["kind"], r["pass"], r["dtype"], r["length"], r["tokens_per_frame"], r["provider"])
                  for r in rows) == sorted(expected)
    assert all(float(r["ratio_to_sdpa"]) == 1.0 for r in rows if r["provider"] == "sdpa")
    assert all(float(r["median_ms"]) > 0 and r["gemm_paths"] == "isa=TEST;amx=False" and r["isa"] for r in rows)
    assert {(r["frames"], r["batch"]) for r in rows if r["kind"] == "dit"} == {("16", "1")}
    printed = capsys.readouterr().out
    assert printed.count("extension GEMM paths: isa=TEST;amx=False") == 8  # 2 kinds x 2 passes x 2 dtypes
    assert printed.count("(target ") == 8 and (tmp_path / "t.md").read_text().count("(target ") == 8


def test_providers_agree_on_a_video_transformer_layout():
    """The long-row sweep compares like with like too: every provider biases by latent-frame distance."""
    for mode in ("relative", "absolute"):
        case = make_case(24, 24, 2, 16, mode, sigma=1.0, strength=2.0, tokens_per_frame=4)
        expected = PROVIDERS["torch"].build(case)()
        for name in ("naive", "sdpa_bias", "extension"):
            torch.testing.assert_close(PROVIDERS[name].build(case)(), expected, rtol=2e-4, atol=2e-5,
                                       msg=f"{name} {mode}")
        plain = make_case(24, 24, 2, 16, mode, sigma=1.0, strength=2.0)
        assert not torch.allclose(PROVIDERS["torch"].build(plain)(), expected, atol=1e-3)


def test_dit_sweep_smoke(tmp_path, monkeypatch):
    """--dit: one sequence per point, L = frames x tokens per frame, the layout columns, the modelled share of key
    tiles the Triton kernel skips, materialising providers skipped past the cap, and the plots."""
    from vstar_kernels.bench import sweep

    monkeypatch.setitem(sweep.DIT_SERIES, "tiny", sweep.DiTSeries("tiny", 1, 16, ((4, 8), (16, 32)), sigma=0.5))
    monkeypatch.setattr(sweep, "MATERIALISED_CAP_GIB", 1e-6)
    args = sweep.build_parser().parse_args(["--dit", "tiny", "--modes", "relative", "--providers", "sdpa", "naive",
                                            "extension", "--rounds", "2", "--out", str(tmp_path)])
    assert sweep.run_from_args(args) == 0
    rows = _rows(tmp_path / "sweep_dit.csv")
    assert [(r["frames"], r["tokens_per_frame"], r["provider"]) for r in rows] == [
        (L, per, p) for L, per in (("32", "8"), ("512", "32")) for p in ("sdpa", "naive", "extension")]
    by = {(r["frames"], r["provider"]): r for r in rows}
    assert by[("512", "naive")]["status"].startswith("unavailable: materialises")
    assert by[("512", "extension")]["status"] == "ok" and float(by[("512", "extension")]["ratio_to_sdpa"]) > 0
    assert all(r["batch"] == "1" and r["sigma"] == "0.5" for r in rows)
    # sigma 0.5: frames 8+ apart have an exactly zero band; 16 frames of 32 tokens in 64-key tiles skip some
    assert float(by[("512", "extension")]["triton_band_tiles_skipped"]) > 0.0
    assert float(by[("32", "extension")]["triton_band_tiles_skipped"]) == 0.0  # 4 frames: all within reach
    assert (tmp_path / "sweep_dit_time_cpu.png").is_file()


# ---------------------------------------------------------------------------------------- frame-distance profiles
def test_profile_providers_compute_the_profile_where_they_can():
    """Every profile provider's output equals the op's (like with like): a window with a sink, a bias table, a decay
    (which an additive mask cannot express), in a transformer's layout."""
    from vstar_kernels import FrameProfile
    from vstar_kernels.bench.profile_providers import PROFILE_PROVIDERS, kept_share, make_profile_case

    profiles = {
        "window": FrameProfile.window(1, sink_frames=1),
        "table": FrameProfile.table(bias=torch.tensor([0.0, 0.5, -0.5, float("-inf")])),
        "decay": FrameProfile.decay_beyond(1, 0.5) + FrameProfile.window(3),
    }
    for label, profile in profiles.items():
        case = make_profile_case(6, 4, 2, 16, profile)
        expected = PROFILE_PROVIDERS["torch"].build(case)()
        for name, provider in PROFILE_PROVIDERS.items():
            reason = provider.unavailable(case)
            if reason is not None:
                assert (name, label) in {("sdpa_mask", "decay"), ("triton", label)}, (name, label, reason)
                continue
            out = provider.build(case)()
            if name in ("sdpa", "extension_tar"):  # the floor and the band alone: other attention
                assert not torch.allclose(out, expected, atol=1e-3), (name, label)
            else:
                torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-5, msg=f"{name} {label}")
    # 6 frames, radius 1, frame 0 a sink: rows keep 2, 3, 3, 3, 3 and 2 neighbours, plus the sink for rows 2-5
    assert kept_share(profiles["window"], 6) == pytest.approx((2 + 3 + 4 + 4 + 4 + 3) / 36)


def test_profile_sweep_smoke(tmp_path, monkeypatch):
    """--profiles: a row per provider and point with the kept share and the window's cost target; materialising
    providers past the cap say why."""
    from vstar_kernels import FrameProfile
    from vstar_kernels.bench import profile_sweep, sweep

    series = profile_sweep.ProfileSeries("tiny", ((4, 8), (8, 16)), lambda frames: FrameProfile.window(1, 1),
                                         head_dim=16)
    monkeypatch.setitem(profile_sweep.PROFILE_SERIES, "tiny", series)
    monkeypatch.setattr(profile_sweep, "MATERIALISED_CAP_GIB", 1e-4)
    args = sweep.build_parser().parse_args(["--profiles", "tiny", "--providers", "sdpa", "sdpa_mask", "extension",
                                            "--rounds", "2", "--out", str(tmp_path), "--no-plot"])
    assert sweep.run_from_args(args) == 0
    rows = _rows(tmp_path / "sweep_profiles.csv")
    assert [(r["length"], r["provider"]) for r in rows] == [
        (L, p) for L in ("32", "128") for p in ("sdpa", "sdpa_mask", "extension")]
    by = {(r["length"], r["provider"]): r for r in rows}
    assert by[("128", "sdpa_mask")]["status"].startswith("unavailable: materialises")
    assert by[("128", "extension")]["status"] == "ok" and float(by[("128", "extension")]["ratio_to_sdpa"]) > 0
    share = float(by[("128", "extension")]["kept_share"])
    assert share == pytest.approx((2 + 3 + 4 * 5 + 3) / 64)  # 8 frames, radius 1, frame 0 a sink for rows 2-7
    assert float(by[("128", "extension")]["window_target"]) == pytest.approx(1.2 * share + 0.05, abs=1e-4)
    assert (rows[0]["device_name"] and rows[0]["device_name"] != "x86_64") or not Path("/proc/cpuinfo").exists()
