"""The vstar-kernels console script."""

from __future__ import annotations

import subprocess
import sys

from vstar_kernels import __version__
from vstar_kernels.cli import info_lines, main


def test_info_lists_versions_and_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"vstar-kernels {__version__}" in text
    assert "torch " in text and "triton " in text
    # under the test suite's TRITON_INTERPRET=1 triton runs CPU tensors; torch always runs
    cpu_section = text.split("backends on cpu:")[1]
    assert "triton     available" in cpu_section
    assert "torch      available" in cpu_section
    assert "extension  available" in cpu_section
    assert "auto -> extension" in cpu_section
    assert "extension build:" in text and "cache:" in text


def test_info_without_interpreter_explains_triton(monkeypatch):
    from vstar_kernels.backends import triton_tar

    monkeypatch.setattr(triton_tar, "INTERPRETER", False)
    text = "\n".join(info_lines())
    assert "triton     unavailable: CPU tensors run Triton only under TRITON_INTERPRET=1" in text


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout
    bad = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
