"""The CUDA fallback compiles for sm_80 and sm_90 without spills (nvcc, no GPU needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vstar_kernels.checks import nvcc_check

SPILLING_LOG = """\
ptxas info    : Compiling entry function '_ZN5vstar20tar_attention_kernelIfLi2ELb1EEEvNS_9TARParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5vstar20tar_attention_kernelIfLi2ELb1EEEvNS_9TARParamsE
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 17536 bytes smem, 584 bytes cmem[0]
"""


def test_parser_reads_registers_and_flags_spills():
    (row,) = nvcc_check.parse_ptxas(SPILLING_LOG)
    assert (row.arch, row.registers, row.smem, row.spill_stores, row.spill_loads) == (80, 255, 17536, 12, 8)
    assert row.spills and row.kernel == "fwd fp32 head_dim<=64 relative"


def test_parser_names_the_backward_kernels():
    log = SPILLING_LOG.replace("20tar_attention_kernel", "20tar_bwd_query_kernel")
    log += SPILLING_LOG.replace("20tar_attention_kernelIfLi2ELb1", "18tar_bwd_key_kernelI6__halfLi8ELb0")
    assert [row.kernel for row in nvcc_check.parse_ptxas(log)] == [
        "bwd dq fp32 head_dim<=64 relative", "bwd dk/dv fp16 head_dim<=256 absolute/plain"]


@pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not found (.ci/run runs this check regardless)")
def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills():
    res = subprocess.run([sys.executable, "-m", "vstar_kernels.nvcc_check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("sm_")]
    assert {line.split()[0] for line in rows} == {"sm_80", "sm_90"}
    # arch x dtype x head-dim bucket x (relative, absolute) x (forward, backward dq, backward dk/dv)
    assert len(rows) == 2 * 3 * 4 * 2 * 3
    kinds = {" ".join(line.split()[1:-7]) for line in rows}
    assert kinds == {"fwd", "bwd dq", "bwd dk/dv"}
    assert "0 with spills" in res.stdout
    assert "bindings.cpp with -DVSTAR_WITH_CUDA: compiles" in res.stdout
