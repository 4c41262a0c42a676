"""Frame parallelism over torch.distributed (gloo, CPU): torchrun with 2 and 3 processes against the single-process
output and gradients, gradcheck of the differentiable collectives, and the single-process API (world of 1, errors
before any collective)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import rank_reports, run_output, torchrun

from vstar_kernels.distributed import disable_frame_parallel, enable_frame_parallel, split_sizes
from vstar_kernels.distributed.layout import TIMEOUT_ENV, timeout

WORKER = Path(__file__).with_name("frame_parallel_worker.py")


def _torchrun(nproc: int, *args: str, report_dir: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return torchrun(WORKER, nproc, *args, report_dir=report_dir, timeout_s=timeout_s)


def _reports(report_dir: Path) -> list[dict]:
    return rank_reports(report_dir)


@pytest.mark.parametrize(("nproc", "args"), [
    (2, ("--frames", "7", "--size", "16", "16")),                  # UNet3D: odd frames, even positions
    (3, ("--frames", "8", "--size", "6", "6", "--batch", "1")),    # one sample: received shares used in place
    (3, ("--frames", "11", "--size", "10", "10", "--tar")),        # TAR on; 100 and 25 positions over 3 ranks
    (3, ("--frames", "5", "--size", "2", "4")),                    # 1x2 positions < 3 ranks: replicated level
    (2, ("--frames", "1", "--size", "8", "8")),                    # fewer frames than ranks: whole UNet per rank
    (3, ("--family", "animatediff", "--frames", "37", "--size", "16", "16", "--tar")),  # past the 32 positions
    (2, ("--frames", "12", "--size", "8", "8", "--synopsis", "--tar")),  # per-frame prompts, CFG: rows line up
    (2, ("--family", "animatediff", "--frames", "9", "--size", "8", "8")),
    (3, ("--family", "i2vgen", "--frames", "11", "--size", "8", "8", "--tar")),  # first-frame context, fps
    (2, ("--family", "i2vgen", "--frames", "6", "--size", "8", "8")),
    (3, ("--family", "svd", "--frames", "11", "--size", "10", "10", "--tar")),   # frames on dim 1, frame index
    (3, ("--family", "svd", "--frames", "7", "--size", "2", "4", "--batch", "1")),  # a replicated level
    (2, ("--pipeline", "--frames", "9", "--size", "2", "2", "--tar")),  # TextToVideoSD: CFG batch, VAE split
    (3, ("--pipeline", "--family", "animatediff", "--frames", "10", "--size", "4", "4", "--tar")),
    (2, ("--pipeline", "--family", "svd", "--frames", "9", "--size", "4", "4", "--tar")),  # image in, EDM steps
], ids=lambda v: str(v) if isinstance(v, int) else "-".join(a.lstrip("-") for a in v))
def test_frame_parallel_equals_one_process(nproc, args, tmp_path):
    proc = _torchrun(nproc, *args, report_dir=tmp_path)
    reports = _reports(tmp_path)
    assert proc.returncode == 0, run_output(proc)
    assert sorted(r["rank"] for r in reports) == list(range(nproc))
    for r in reports:
        assert r["world"] == nproc
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["scale"]), r
        assert r["repeat_equal"] and r["restored"], r


@pytest.mark.parametrize("args", [
    ("--frames", "5", "--size", "8", "8"),                                        # UNet3D, fp32, frames 3 + 2
    ("--family", "animatediff", "--frames", "5", "--size", "16", "16"),           # AnimateDiff, fp32
    ("--family", "animatediff", "--frames", "5", "--size", "8", "8", "--double"),  # a replicated 1x1 level, float64
], ids=lambda v: "-".join(a.lstrip("-") for a in v))
def test_backward_gradients_equal_one_process(args, tmp_path):
    """loss = output.pow(2).mean(), backward on every rank: every parameter's and input's gradient equals the
    single-process one on every rank, without and with TAR; the recording forward equals the no_grad one bit for bit;
    AnimateDiff with gradient checkpointing on is refused while training, not while inferring."""
    proc = _torchrun(2, "--backward", *args, report_dir=tmp_path)
    reports = _reports(tmp_path)
    assert proc.returncode == 0, run_output(proc)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        for case in (r["plain"], r["tar"]):
            assert case["worst_ratio"] <= 1.0 and case["compared"] > 0 and not case["none_mismatch"], (r["rank"], case)
            assert case["recording_equals_no_grad"], case
        if "animatediff" in args:
            assert "frame parallelism" in r["checkpointing_error"], r
            assert "gradient checkpointing" in r["checkpointing_error"], r
            assert r["checkpointing_inference_ok"], r


def test_collectives_are_differentiable_gradcheck(tmp_path):
    """float64 gradcheck across 2 processes of the layout switch (one and two samples), the inner gather, the
    all-reduce and SplitGroupNorm in the position layout, each between enter_replicated and gather_output; the
    gradient sum over ranks keeps None for an unused tensor; not recording gives the same numbers."""
    proc = _torchrun(2, "--functions", "--frames", "3", report_dir=tmp_path)
    reports = _reports(tmp_path)
    assert proc.returncode == 0, run_output(proc)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert len(r["checks"]) == 7 and all(r["checks"].values()), r


def test_a_failing_rank_fails_the_run_instead_of_hanging(tmp_path):
    proc = _torchrun(2, "--frames", "6", "--size", "8", "8", "--fail-rank", "1", report_dir=tmp_path, timeout_s=180)
    assert proc.returncode != 0, run_output(proc)
    assert "rank fails" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("rank*.json"))  # no rank finished as if nothing happened


def test_close_process_group_names_a_group_something_still_holds(world_of_one):
    """close_process_group destroys the default group; a group that an object still references (here a RankGroup,
    as a model's frame-parallel state or a device mesh holds one) outlives it and is named (issue 29: such a group
    is freed at interpreter shutdown, after the peers have gone)."""
    from vstar_kernels.distributed.layout import close_process_group, resolve_group

    held = resolve_group(None, torch.device("cpu"))
    alive = close_process_group()
    assert not dist.is_initialized()
    assert len(alive) == 1 and "gloo, 1 ranks" in alive[0], alive
    assert held.world == 1 and close_process_group() == []  # nothing left to close


def test_close_process_group_frees_every_group_nothing_holds(world_of_one):
    from vstar_kernels.distributed.layout import close_process_group, resolve_group

    sub = dist.new_group([0])
    assert resolve_group(sub, torch.device("cpu")).world == 1
    del sub
    assert close_process_group() == []
    assert not dist.is_initialized()


def test_split_sizes_are_contiguous_and_as_even_as_possible():
    assert split_sizes(7, 2) == [4, 3]
    assert split_sizes(11, 3) == [4, 4, 3]
    assert split_sizes(2, 3) == [1, 1, 0]
    for n in range(0, 40):
        for world in range(1, 6):
            sizes = split_sizes(n, world)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_timeout_is_validated(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout().total_seconds() == 12.5
    for bad in ("0", "-3", "inf", "nan", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            timeout()


def test_without_a_process_group_or_torchrun_a_clear_error(monkeypatch):
    from vstar_kernels.diffusers.tiny import tiny_unet3d

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torchrun"):
        enable_frame_parallel(tiny_unet3d())


def test_unsupported_model_and_bad_group_are_refused():
    from vstar_kernels.diffusers.tiny import tiny_unet2d, tiny_unet3d

    with pytest.raises(TypeError, match="UNet3DConditionModel, UNetMotionModel, I2VGenXLUNet"):
        enable_frame_parallel(tiny_unet2d())  # an image UNet: no frames to split
    with pytest.raises(TypeError, match="ProcessGroup"):
        enable_frame_parallel(tiny_unet3d(), group="world")


def test_world_of_one_is_a_no_op_and_disable_restores(world_of_one):
    from vstar_kernels.diffusers.tiny import tiny_unet3d

    unet = tiny_unet3d()
    sample, ehs = torch.randn(1, 4, 5, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        ref = unet(sample, 10, ehs).sample
        state = enable_frame_parallel(unet)
        assert (state.rg.rank, state.rg.world) == (0, 1)
        assert type(unet).__name__ == "FrameParallelUNet3D"
        assert torch.equal(unet(sample, 10, ehs).sample, ref)
        assert disable_frame_parallel(unet) and not disable_frame_parallel(unet)
    assert type(unet).__name__ == "UNet3DConditionModel"
    assert all(type(m).__module__.startswith(("diffusers", "torch")) for m in unet.modules())


def test_torchrun_demo_writes_the_video_once_on_rank_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "vstar_kernels.cli", "demo", "--frames", "13", "--steps", "1", "--size", "16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, run_output(proc)
    assert proc.stdout.count("wrote ") == 1 and (tmp_path / "video.gif").is_file()
    assert not (tmp_path / "attention.png").exists()
    assert "rank 0: peak memory" in proc.stdout and "rank 1: peak memory" in proc.stdout
    assert proc.stdout.count("vstar-kernels demo: 13 frames") == 1


def test_bench_frame_parallel_smoke(tmp_path):
    """The benchmark end to end on a tiny case: a row per world size, memory per rank, the communication model."""
    import csv

    from bench.frame_parallel import communication_model, main

    assert main(["--frames", "6", "--world", "1", "2", "--latent", "8", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "frame_parallel.csv").open()))
    assert [(r["world"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")]
    assert all(float(r["peak_mib_max_rank"]) > 0 for r in rows)
    temporal = int(rows[0]["temporal_bytes"])
    assert temporal > 0 and int(rows[1]["alltoall_bytes_model"]) == temporal  # 2 switches x (P - 1) / P at P = 2
    assert (tmp_path / "frame_parallel_cpu.png").stat().st_size > 0
    assert communication_model(1000, 10, 4) == (1500, 30)


def test_split_group_norm_equals_group_norm_on_one_rank(world_of_one):
    """The moments path (var_mean, float64 all-reduce, fused x * a + b) against group_norm in fp32, with the
    precision-aware criterion: at most twice the error of torch's own GroupNorm in the input dtype, plus an ulp."""
    from vstar_kernels.distributed.frame_parallel import _NORM_GROUP, SplitGroupNorm
    from vstar_kernels.distributed.layout import resolve_group

    rg = resolve_group(None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        ref = torch.nn.GroupNorm(4, 8, eps=1e-6)
        ref.weight.data, ref.bias.data = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
        x = (torch.randn(2, 8, 5, 1, 7, generator=gen) * 3 + 10).to(dtype)  # offset: one-pass variance must hold
        split = SplitGroupNorm(4, 8, eps=1e-6)
        split.load_state_dict(ref.state_dict())
        split, ref = split.to(dtype), ref.to(dtype)
        token = _NORM_GROUP.set(rg)
        try:
            out = split(x)
        finally:
            _NORM_GROUP.reset(token)
        expected = torch.nn.functional.group_norm(x.double(), 4, ref.weight.double(), ref.bias.double(), 1e-6)
        assert out.dtype == dtype
        err = (out.double() - expected).abs().max().item()
        torch_err = (ref(x).double() - expected).abs().max().item()
        ulp = torch.finfo(dtype).eps * expected.abs().max().item()
        assert err <= 2 * torch_err + ulp, (dtype, err, torch_err)


def test_a_frame_parallel_model_copies_compiles_and_refuses_pickling_clearly(world_of_one):
    """deepcopy keeps it frame-parallel on the same group; .to() and torch.compile(fullgraph=True) give the same
    output; pickling raises a TypeError that says what to do (a process group cannot be pickled)."""
    import copy
    import pickle

    from vstar_kernels.diffusers.tiny import tiny_unet3d
    from vstar_kernels.distributed import frame_parallel_state

    unet = tiny_unet3d()
    enable_frame_parallel(unet)
    sample, ehs = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        ref = unet(sample, 10, ehs).sample
        twin = copy.deepcopy(unet)
        assert frame_parallel_state(twin).rg.group is frame_parallel_state(unet).rg.group
        assert torch.equal(twin(sample, 10, ehs).sample, ref)
        assert torch.equal(unet.to(torch.float64).to(torch.float32)(sample, 10, ehs).sample, ref)
        compiled = torch.compile(unet, fullgraph=True)
        torch.testing.assert_close(compiled(sample, 10, ehs).sample, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="disable_frame_parallel"):
        pickle.dumps(unet)
    assert disable_frame_parallel(twin) and disable_frame_parallel(unet)
    assert len(pickle.dumps(unet)) > 0
