"""TAR under diffusers' own context parallelism (Ulysses, Ring, both) on CPU with gloo, against one process.

Each case launches tests/context_parallel_worker.py under torchrun; every rank compares the context-parallel TAR
output (or gradients) of a tiny Wan 2.1 / LTX-Video built from the released layout with the single-process TAR
output (fp32, 1e-4). The sequence-parallel pieces (shard arithmetic, checks before any collective) are tested here
in one process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import rank_reports, run_output, torchrun

from vstar_kernels.distributed import sequence_parallel
from vstar_kernels.distributed.layout import RankGroup
from vstar_kernels.distributed.sequence_parallel import SequenceMesh, TwoSegmentShards, check_call, two_segment_tar

pytest.importorskip("diffusers")
WORKER = Path(__file__).with_name("context_parallel_worker.py")


def _torchrun(nproc: int, *args: str, report_dir: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return torchrun(WORKER, nproc, *args, report_dir=report_dir, timeout_s=timeout_s)


def _reports(report_dir: Path, nproc: int, proc: subprocess.CompletedProcess) -> list[dict]:
    reports = rank_reports(report_dir)
    assert sorted(r["rank"] for r in reports) == list(range(nproc)), run_output(proc)
    return reports


# (nproc, worker arguments): Wan's 3 x 8 x 8 latent is 48 tokens, 16 per frame: every split of 2 or 4 cuts a frame.
# The backend is "auto" (the C++ extension on a CPU) unless a case names one.
CASES = [
    pytest.param(2, ("--ulysses", "2"), id="wan-ulysses2"),
    pytest.param(4, ("--ulysses", "4", "--order", "cp-first"), id="wan-ulysses4-cp-first"),
    pytest.param(2, ("--ring", "2"), id="wan-ring2"),
    pytest.param(4, ("--ring", "4", "--order", "cp-first"), id="wan-ring4-cp-first"),
    pytest.param(4, ("--ulysses", "2", "--ring", "2"), id="wan-unified2x2"),
    pytest.param(2, ("--ring", "2", "--anything", "--size", "8", "6"), id="wan-ring-anything"),
    pytest.param(2, ("--ulysses", "2", "--anything", "--backend", "triton"), id="wan-ulysses-anything-triton"),
    pytest.param(2, ("--ring", "2", "--backend", "torch"), id="wan-ring2-torch"),
    pytest.param(2, ("--ring", "2", "--backend", "triton"), id="wan-ring2-triton"),
    pytest.param(2, ("--model", "wan-i2v", "--ulysses", "2"), id="wan-i2v-ulysses2"),
    pytest.param(2, ("--model", "wan-i2v", "--ring", "2", "--order", "cp-first"), id="wan-i2v-ring2-cp-first"),
    # LTX: 3 x 4 x 4 is 48 tokens of 16 per frame, every split of 2 or 4 cuts a frame; 8 text tokens, the last 3
    # padding with --text-mask (the cross-attention's text gathered by TAR's patch where diffusers cannot run it)
    pytest.param(2, ("--model", "ltx", "--ulysses", "2", "--frames", "3", "--size", "4", "4"), id="ltx-ulysses2"),
    pytest.param(4, ("--model", "ltx", "--ulysses", "4", "--frames", "3", "--size", "4", "4", "--order", "cp-first",
                     "--text-mask"), id="ltx-ulysses4-cp-first-text-mask"),
    pytest.param(2, ("--model", "ltx", "--ring", "2", "--frames", "3", "--size", "4", "4", "--text-mask"),
                 id="ltx-ring2-text-mask"),
    pytest.param(4, ("--model", "ltx", "--ring", "4", "--frames", "3", "--size", "4", "4", "--order", "cp-first"),
                 id="ltx-ring4-cp-first"),
    pytest.param(4, ("--model", "ltx", "--ulysses", "2", "--ring", "2", "--frames", "3", "--size", "4", "4",
                     "--text-mask"), id="ltx-unified2x2-text-mask"),
    # HunyuanVideo under this package's plan: 3 x 8 x 8 latent, patch 2: 48 video tokens of 16 per frame, then 8
    # text tokens of which the last 3 (5 for the second batch element) are padding; every rank's text shard holds
    # a different share of it. --plain-cp: the plan without TAR equals one process too
    pytest.param(2, ("--model", "hunyuan", "--ulysses", "2", "--text-mask", "--batch", "2", "--plain-cp"),
                 id="hunyuan-ulysses2-text-mask"),
    pytest.param(4, ("--model", "hunyuan", "--ulysses", "4", "--text-mask", "--plain-cp", "--order", "cp-first"),
                 id="hunyuan-ulysses4-cp-first-text-mask"),
    pytest.param(2, ("--model", "hunyuan", "--ring", "2", "--text-mask", "--batch", "2"),
                 id="hunyuan-ring2-text-mask"),
    pytest.param(4, ("--model", "hunyuan", "--ulysses", "2", "--ring", "2", "--text-mask", "--order", "cp-first"),
                 id="hunyuan-unified2x2-cp-first-text-mask"),
]


@pytest.mark.parametrize(("nproc", "args"), CASES)
def test_context_parallel_tar_equals_one_process(nproc, args, tmp_path):
    proc = _torchrun(nproc, *args, report_dir=tmp_path)
    for report in _reports(tmp_path, nproc, proc):
        assert report["ok"], report
        for mode in ("relative", "absolute"):
            check = report["checks"][mode]
            assert check["max_err"] <= 1e-4 * max(1.0, check["scale"]), (mode, check)
            assert check["tar_changes_output"] > 1e-2  # the band is visible at this sigma
            if "--text-mask" in args:  # the padding is masked, not attended: 10x the tolerance at least
                assert check["mask_changes_output"] > 1e-3 * max(1.0, check["scale"])
            if "--plain-cp" in args:  # the model's CP without TAR (a plan this package ships) is one process's too
                assert check["plain_cp_err"] <= 1e-4 * max(1.0, check["scale"])
    assert proc.returncode == 0, run_output(proc)


# A frame-distance profile (band, per-head bias tables, a window of radius 1 with a sink frame, a decay) under CP:
# Ulysses splits the per-head tables over the ranks; Ring (8 latent frames of 2 x 2 tokens over 4 ranks: 2 frames
# per span) skips the key spans further than the window from every query of a span, except the sink's span 0.
PROFILE_CASES = [
    pytest.param(2, ("--ulysses", "2", "--profile"), id="wan-ulysses2"),
    pytest.param(4, ("--ring", "4", "--profile", "--frames", "8", "--size", "4", "4"), id="wan-ring4-window"),
    pytest.param(4, ("--ulysses", "2", "--ring", "2", "--profile", "--frames", "6", "--order", "cp-first"),
                 id="wan-unified2x2"),
    pytest.param(2, ("--model", "hunyuan", "--ulysses", "2", "--profile", "--text-mask"), id="hunyuan-ulysses2"),
    pytest.param(2, ("--model", "ltx", "--ring", "2", "--profile", "--frames", "3", "--size", "4", "4"),
                 id="ltx-ring2"),
]


@pytest.mark.parametrize(("nproc", "args"), PROFILE_CASES)
def test_context_parallel_with_a_profile_equals_one_process(nproc, args, tmp_path):
    proc = _torchrun(nproc, *args, report_dir=tmp_path)
    reports = _reports(tmp_path, nproc, proc)
    for report in reports:
        assert report["ok"], report
        for mode in ("relative", "absolute"):
            check = report["checks"][mode]
            assert check["max_err"] <= 1e-4 * max(1.0, check["scale"]), (mode, check)
            assert check["tar_changes_output"] > 1e-2
    if args[:2] == ("--ring", "4"):
        # per block: rank 0 computes its own span and span 1; rank 2 its own, both neighbours and the sink's span
        calls = {r["rank"]: r["checks"]["relative"]["ring_attention_calls"] for r in reports}
        assert calls[0] > 0 and 2 * calls[0] == calls[2] and calls[1] == calls[3] == 3 * calls[0] // 2, calls
    assert proc.returncode == 0, run_output(proc)


@pytest.mark.parametrize("args", [
    pytest.param(("--ulysses", "2", "--ultravico", "2"), id="ulysses-2x"),
    pytest.param(("--ring", "2", "--ultravico", "4"), id="ring-4x"),
])
def test_ultravico_with_tar_in_a_wan_pipeline_under_cp_equals_one_process(args, tmp_path):
    """preset="ultravico" + TAR's band in a WanPipeline at 2x and 4x its 81 training frames (165 and 333 frames:
    42 and 84 latent frames) under Ulysses and Ring: the single-process latents."""
    proc = _torchrun(2, "--pipeline", *args, report_dir=tmp_path)
    ratio = int(args[-1])
    for report in _reports(tmp_path, 2, proc):
        assert report["ok"], report
        check = report["checks"]["pipeline"]
        assert check["max_err"] <= 1e-4 * max(1.0, check["scale"]), check
        assert check["shape"][2] == 21 * ratio  # latent frames
    assert proc.returncode == 0, run_output(proc)


@pytest.mark.parametrize(("nproc", "args"), [
    pytest.param(2, ("--ulysses", "2"), id="ulysses2"),
    pytest.param(2, ("--ring", "2"), id="ring2-gathered"),
    pytest.param(4, ("--ulysses", "2", "--ring", "2"), id="unified2x2"),
    pytest.param(2, ("--model", "ltx", "--ring", "2", "--frames", "3", "--size", "4", "4", "--text-mask"),
                 id="ltx-ring2-text-mask"),
    pytest.param(4, ("--model", "hunyuan", "--ulysses", "2", "--ring", "2", "--text-mask"),
                 id="hunyuan-unified2x2-text-mask"),
])
def test_context_parallel_tar_gradients_equal_one_process(nproc, args, tmp_path):
    proc = _torchrun(nproc, "--backward", *args, report_dir=tmp_path)
    for report in _reports(tmp_path, nproc, proc):
        assert report["ok"], report
        for mode in ("relative", "absolute"):
            check = report["checks"][mode]
            assert check["grad_input_err"] <= 1e-4 * max(1.0, check["scale"]), check
            assert check["grad_weight_err"] <= 1e-4 * max(1.0, check["scale"]), check
    assert proc.returncode == 0, run_output(proc)


@pytest.mark.parametrize("model", ["wan", "hunyuan"])
def test_outside_the_window_and_after_remove_tar_diffusers_cp_is_bit_identical(model, tmp_path):
    proc = _torchrun(2, "--model", model, "--ulysses", "2", "--outside-window", "--remove", report_dir=tmp_path)
    for report in _reports(tmp_path, 2, proc):
        assert report["ok"], report
        for mode in ("relative", "absolute"):
            assert report["checks"][mode]["bit_identical_to_diffusers_cp"] is True
            assert report["checks"][mode]["removed_equals_diffusers_cp"] is True
    assert proc.returncode == 0, run_output(proc)


@pytest.mark.parametrize("args", [
    pytest.param(("--ring", "2", "--order", "tar-first"), id="ring-tar-first"),
    pytest.param(("--ring", "2", "--order", "cp-first"), id="ring-cp-first"),
    pytest.param(("--ulysses", "2", "--experts", "2"), id="ulysses-wan22-two-experts"),
])
def test_a_wan_pipeline_runs_end_to_end_under_cp_with_tar(args, tmp_path):
    """WanPipeline (CFG, 2 steps, latents out) with TAR under CP: the single-process latents. Wan 2.2's two experts
    (boundary 0.5: the first step on one, the second on the other) are both patched and both parallel."""
    proc = _torchrun(2, "--pipeline", *args, report_dir=tmp_path)
    experts = 2 if "--experts" in args else 1
    for report in _reports(tmp_path, 2, proc):
        assert report["ok"], report
        check = report["checks"]["pipeline"]
        assert check["max_err"] <= 1e-4 * max(1.0, check["scale"]), check
        assert report["checks"]["patched_layers"] == 2 * experts
        assert len(report["checks"]["calls_per_expert"]) == experts
        assert all(calls >= 1 for calls in report["checks"]["calls_per_expert"])
    assert proc.returncode == 0, run_output(proc)


def test_hunyuan_plan_without_the_refiner_mask_hook_raises_rather_than_masking_wrongly(tmp_path):
    proc = _torchrun(2, "--model", "hunyuan", "--ulysses", "2", "--plan-without-hook", report_dir=tmp_path)
    for report in _reports(tmp_path, 2, proc):
        assert report["ok"], report
        assert report["checks"]["raised"]
    assert proc.returncode == 0, run_output(proc)


@pytest.mark.parametrize(("nproc", "args"), [
    pytest.param(2, ("--model", "wan", "--ulysses", "2"), id="wan-ulysses2"),
    pytest.param(4, ("--model", "wan", "--ulysses", "2", "--ring", "2", "--order", "cp-first"), id="wan-unified2x2"),
    pytest.param(2, ("--model", "wan-i2v", "--ring", "2"), id="wan-i2v-ring2"),
    pytest.param(2, ("--model", "ltx", "--ring", "2", "--frames", "3", "--size", "4", "4", "--text-mask"),
                 id="ltx-ring2-text-mask"),
    pytest.param(2, ("--model", "ltx", "--ulysses", "2", "--frames", "3", "--size", "4", "4", "--text-mask",
                     "--order", "cp-first"), id="ltx-ulysses2-cp-first-text-mask"),
])
def test_per_frame_prompts_with_tar_under_cp_equal_one_process(nproc, args, tmp_path):
    """apply_synopsis and apply_tar under diffusers' CP: every rank's video shard (cut inside a frame: 16 tokens per
    frame, shards of 24 or 12) attends to the text of each token's global frame, as in one process."""
    proc = _torchrun(nproc, "--synopsis", *args, report_dir=tmp_path)
    for report in _reports(tmp_path, nproc, proc):
        assert report["ok"], report
        check = report["checks"]["synopsis"]
        assert check["max_err"] <= 1e-4 * max(1.0, check["scale"]), check
        assert check["synopsis_changes_output"] > 1e-2, check
    assert proc.returncode == 0, run_output(proc)


def test_heads_that_do_not_split_raise_the_same_error_on_every_rank(tmp_path):
    """4 heads over 3 Ulysses ranks: every rank raises before any collective (no hang) and names the split."""
    proc = _torchrun(3, "--ulysses", "3", "--frames", "3", "--size", "8", "8", report_dir=tmp_path)
    reports = _reports(tmp_path, 3, proc)
    assert proc.returncode != 0, run_output(proc)
    for report in reports:
        assert not report["ok"]
        assert "4 attention heads do not split over 3 Ulysses ranks" in report["error"], report


@pytest.mark.parametrize(("nproc", "args"), [
    pytest.param(2, ("--ring-error", "0"), id="ring2-first-step"),
    pytest.param(3, ("--ring-error", "1"), id="ring3-second-step"),
    pytest.param(3, ("--ring-error", "1", "--ring-error-op", "row_max"), id="ring3-row-max-second-step"),
])
def test_an_error_inside_the_ring_leaves_no_transfer_pending_and_every_rank_exits_cleanly(nproc, args, tmp_path):
    """The Ring's op raises on every rank right after a step's transfer was posted (issue 29): the error reaches
    the caller, every posted isend/irecv was waited first, the group still works (the Ring again equals one
    process) and every rank exits 0 after reporting, the group closed on every rank together."""
    proc = _torchrun(nproc, *args, report_dir=tmp_path)
    step = args[1]
    for report in _reports(tmp_path, nproc, proc):
        check = report["checks"]["ring_error"]
        assert check["error"] == f"injected failure at step {step}", report
        assert check["posted"] > 0 and check["unwaited"] == 0, report
        assert check["max_err"] <= 1e-4, report
        assert report["ok"], report
    assert proc.returncode == 0, run_output(proc)


# --------------------------------------------------------------------------------------------- one process
def _group(rank: int, world: int) -> RankGroup:
    return RankGroup(None, rank, world, "gloo")


def test_shards_and_spans_follow_the_flat_mesh():
    mesh = SequenceMesh(tokens=50, ring=_group(1, 2), ulysses=_group(1, 3), uneven=True)
    assert mesh.shard_sizes() == [9, 9, 8, 8, 8, 8]  # torch.tensor_split's rule: the first n % P one larger
    assert mesh.flat_rank == 4
    assert mesh.span_sizes() == [26, 24] and mesh.span_start(1) == 26


def test_checks_before_any_collective():
    q = torch.zeros(1, 12, 4, 8)
    check_call(SequenceMesh(48, _group(0, 4), None), q, q, q)
    with pytest.raises(ValueError, match="do not split evenly over 4 ranks"):
        check_call(SequenceMesh(50, _group(0, 4), None), q, q, q)
    with pytest.raises(ValueError, match="holds 12 query tokens"):
        check_call(SequenceMesh(40, _group(0, 4), None), q, q, q)
    with pytest.raises(ValueError, match="4 attention heads do not split over 3"):
        check_call(SequenceMesh(36, None, _group(0, 3)), q, q, q)
    with pytest.raises(ValueError, match="gloo"):
        check_call(SequenceMesh(48, _group(0, 4), None), q.to("meta"), q.to("meta"), q.to("meta"))
    tar = dict(sigma=1.0, strength=1.0, mode="relative", scale=None, tokens_per_frame=4, video_start=0,
               video_tokens=48)
    check_call(SequenceMesh(48, _group(0, 4), None), q, q, q, {**tar, "backend": "torch"})
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):  # the interpreter takes no bf16
        check_call(SequenceMesh(48, _group(0, 4), None), *(q.bfloat16(),) * 3, {**tar, "backend": "triton"})
    with pytest.raises(ValueError, match="sigma"):
        check_call(SequenceMesh(48, _group(0, 4), None), q, q, q, {**tar, "sigma": -1.0, "backend": "torch"})


def test_two_segment_checks_before_any_collective():
    """HunyuanVideo's [video shard, text shard] per rank: a wrong token count or a head count that cannot split
    raises before any collective (the groups here have no process group behind them)."""
    q = torch.zeros(1, 16, 4, 8)
    tar = dict(sigma=1.0, strength=1.0, mode="relative", scale=None, tokens_per_frame=4, video_start=0,
               video_tokens=48, backend="torch")
    shards = TwoSegmentShards(SequenceMesh(48, _group(0, 4), None), video=[12] * 4, text=[3] * 4)
    with pytest.raises(ValueError, match="holds 16 query tokens, its video and text shards have 12 \\+ 3"):
        two_segment_tar(q, q, q, None, shards, tar)
    shards = TwoSegmentShards(SequenceMesh(48, None, _group(0, 3)), video=[16] * 3, text=[0] * 3)
    with pytest.raises(ValueError, match="4 attention heads do not split over 3"):
        two_segment_tar(q, q, q, None, shards, tar)


def test_ltx_cross_attention_companions_are_installed_with_tar_and_removed_exactly():
    """apply_tar on LTX-Video puts ShardedTextCrossAttention on every attn2 (beside TAR on every attn1, which alone
    counts as a TAR layer); without context parallelism it runs the original call, so the output is unchanged
    with TAR's window closed; remove_tar puts back the very same processor objects; copies keep working."""
    import copy
    import pickle

    from vstar_kernels import apply_tar, remove_tar
    from vstar_kernels.diffusers import tiny
    from vstar_kernels.diffusers.dit.processor import ShardedTextCrossAttention

    model = tiny.tiny_ltx_transformer(heads=4, head_dim=8).eval()
    originals = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    kw = dict(hidden_states=torch.randn(1, 3 * 16, 128), encoder_hidden_states=torch.randn(1, 8, 32),
              timestep=torch.tensor([700]), encoder_attention_mask=torch.tensor([[1.0] * 5 + [0.0] * 3]),
              num_frames=3, height=4, width=4)
    with torch.no_grad():
        want = model(**kw, return_dict=False)[0]
    handle = apply_tar(model, sigma=0.8, strength=1.5, timesteps=(0, 1))  # the window shut at t=700
    cross = [block.attn2.processor for block in model.transformer_blocks]
    assert all(isinstance(p, ShardedTextCrossAttention) for p in cross) and len(cross) == len(handle.layers)
    assert all(name.endswith("attn1") for name in handle.layers)
    with torch.no_grad():
        assert torch.equal(model(**kw, return_dict=False)[0], want)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(twin(**kw, return_dict=False)[0], want)
    remove_tar(model)
    after = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    assert after.keys() == originals.keys() and all(after[name] is originals[name] for name in originals)


def test_hunyuan_image_to_video_token_replace_is_refused_before_anything():
    from diffusers import ContextParallelConfig, HunyuanVideoTransformer3DModel

    from vstar_kernels.diffusers.dit.context_parallel import enable_context_parallelism

    model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2,
                                           attention_head_dim=32, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                                           pooled_projection_dim=8, rope_axes_dim=(4, 14, 14),
                                           image_condition_type="token_replace")
    with pytest.raises(NotImplementedError, match="token_replace"):
        enable_context_parallelism(model, ContextParallelConfig(ulysses_degree=2))
    assert model._parallel_config is None


class _Request:
    """A posted transfer's request in a faked ring: records its wait; ``fails``: the wait raises."""

    def __init__(self, log: list, name: str, fails: bool = False) -> None:
        self.log, self.name, self.fails = log, name, fails

    def wait(self) -> bool:
        self.log.append(self.name)
        if self.fails:
            raise RuntimeError(f"{self.name} failed")
        return True


def _fake_ring(monkeypatch, fail_wait: bool = False) -> tuple[list, list]:
    """A ring of 2 in one process: peers resolved, every batch_isend_irecv returns two recorded requests (posted,
    waited)."""
    posted, waited = [], []

    def post(ops):
        index = len(posted) // 2
        requests = [_Request(waited, f"send{index}", fail_wait), _Request(waited, f"recv{index}")]
        posted.extend(request.name for request in requests)
        return requests

    monkeypatch.setattr(sequence_parallel.dist, "get_global_rank", lambda group, rank: rank)
    monkeypatch.setattr(sequence_parallel.dist, "P2POp", lambda *args: args)
    monkeypatch.setattr(sequence_parallel.dist, "batch_isend_irecv", post)
    return posted, waited


@pytest.mark.parametrize("op", ["tar_attention", "tar_row_max"])
def test_a_ring_step_that_raises_waits_every_transfer_it_posted(op, monkeypatch):
    """One process, a faked ring of 2 (issue 29): the step's op raises after the step's transfer was posted; every
    posted send and receive is waited before the error leaves the Ring, and the error is the op's."""
    posted, waited = _fake_ring(monkeypatch)

    def fails(*args, **kwargs):
        raise ValueError("the op failed")

    monkeypatch.setattr(sequence_parallel, op, fails)
    q = torch.randn(1, 8, 2, 4)
    tar = dict(sigma=1.0, strength=1.0, mode="relative", scale=None, tokens_per_frame=4, video_start=0,
               video_tokens=16, backend="torch")
    with pytest.raises(ValueError, match="the op failed"), torch.no_grad():
        sequence_parallel.ring_tar_attention(q, q, q, [8, 8], _group(0, 2), tar)
    # the row-max pass (its first step's transfer) then, for tar_attention, the attention pass's first step's
    assert posted == ["send0", "recv0"] + (["send1", "recv1"] if op == "tar_attention" else [])
    assert sorted(waited) == sorted(posted)


def test_a_failing_wait_while_draining_does_not_hide_the_error_that_stopped_the_ring(monkeypatch):
    """The drain after an exception waits every request even when one wait fails, and the exception that stopped
    the loop is the one raised; without an exception a failing wait raises its own error."""
    _posted, waited = _fake_ring(monkeypatch, fail_wait=True)
    peers = sequence_parallel._RingPeers(_group(0, 2))
    with pytest.raises(KeyError, match="stopped"), peers:
        peers.rotate(torch.zeros(2), (2,))
        raise KeyError("stopped")
    assert waited == ["send0", "recv0"] and peers.pending == 0
    with pytest.raises(RuntimeError, match="send1 failed"), sequence_parallel._RingPeers(_group(0, 2)) as peers:
        peers.rotate(torch.zeros(2), (2,))()
    assert peers.pending == 0 and waited[2:] == ["send1", "recv1"]
