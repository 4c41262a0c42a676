"""The CUDA fallback compiles for sm_75..sm_90 with torch's nvcc flags, without spills or FP64 (nvcc, no GPU)."""

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


def test_double_precision_warnings_are_found():
    log = SPILLING_LOG + "ptxas /tmp/x.ptx, line 389; warning : Program is doing double precision computations.\n"
    assert nvcc_check.double_precision_warnings(SPILLING_LOG) == []
    assert len(nvcc_check.double_precision_warnings(log)) == 1


def test_compiles_with_torchs_nvcc_flags():
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in nvcc_check.nvcc_flags()


@pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not found (.ci/run runs this check regardless)")
def test_cuda_kernels_compile_for_every_arch_without_spills_or_fp64():
    """The check itself; with ``--stamp``, skipped when it passed on the same sources and tools (e.g. in .ci/run's
    nvcc step just before)."""
    res = subprocess.run([sys.executable, "-m", "vstar_kernels.nvcc_check", "--stamp"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    if res.stdout.rstrip().endswith("; skipped"):
        pytest.skip(res.stdout.strip())
    rows = [line for line in res.stdout.splitlines() if line.startswith("sm_")]
    assert {line.split()[0] for line in rows} == {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}
    # arch x dtype x head-dim bucket x (relative, absolute) x (forward, backward dq, backward dk/dv)
    assert len(rows) == 5 * 3 * 4 * 2 * 3
    kinds = {" ".join(line.split()[1:-7]) for line in rows}
    assert kinds == {"fwd", "bwd dq", "bwd dk/dv"}
    assert "0 with spills, 0 double-precision warnings" in res.stdout
    assert "bindings.cpp with -DVSTAR_WITH_CUDA: compiles" in res.stdout


def test_stamp_skips_a_passed_check_until_a_source_changes(monkeypatch, tmp_path, capsys):
    """--stamp: a pass writes a stamp keyed by csrc/, the tools and the archs; the same check then skips, a failing
    one writes none, and an edited source runs it again. No compile: the compile steps are stubbed."""
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(nvcc_check.source_dir(), csrc)
    monkeypatch.setenv("VSTAR_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nvcc_check, "source_dir", lambda: csrc)
    monkeypatch.setattr(nvcc_check, "find_nvcc", lambda: str(tmp_path / "no-such-nvcc"))
    compiled: list[str] = []
    log = {"text": SPILLING_LOG}

    def fake_compile(nvcc, archs):
        compiled.append(",".join(map(str, archs)))
        return 0, log["text"], nvcc_check.parse_ptxas(log["text"])

    monkeypatch.setattr(nvcc_check, "compile_cuda", fake_compile)
    monkeypatch.setattr(nvcc_check, "check_cuda_bindings", lambda nvcc: (0, ""))
    assert nvcc_check.main(["--stamp", "--arch", "80"]) == 1 and len(compiled) == 1  # spills: no stamp
    log["text"] = SPILLING_LOG.replace("12 bytes spill stores", "0 bytes spill stores").replace("8 bytes", "0 bytes")
    assert nvcc_check.main(["--stamp", "--arch", "80"]) == 0 and len(compiled) == 2
    assert "stamp written" in capsys.readouterr().out
    assert nvcc_check.main(["--stamp", "--arch", "80"]) == 0 and len(compiled) == 2  # skipped
    assert capsys.readouterr().out.rstrip().endswith("; skipped")
    assert nvcc_check.main(["--stamp", "--arch", "80", "90"]) == 0 and len(compiled) == 3  # other archs
    assert nvcc_check.main(["--arch", "80"]) == 0 and len(compiled) == 4  # without --stamp: always compiles
    (csrc / "tar_attention.h").write_text((csrc / "tar_attention.h").read_text() + "// edited\n")
    assert nvcc_check.main(["--stamp", "--arch", "80"]) == 0 and len(compiled) == 5  # a source changed
