"""Static check of the CUDA fallback without a GPU: ``python -m vstar_kernels.checks.nvcc_check``.

Compiles ``csrc/tar_attention_cuda.cu`` (no ATen inside, so no CUDA build of torch is needed) with ``nvcc`` for
each architecture (sm_75, the oldest the fallback serves, to sm_90) with torch's own nvcc flags
(``torch.utils.cpp_extension.COMMON_NVCC_FLAGS``: no implicit half conversions) and ``-Xptxas -v
--warn-on-double-precision-use``, and prints registers, shared memory and spills per kernel (forward and the two
backward kernels). Any double-precision instruction fails the check: FP64 runs at 1/32-1/64 rate on the consumer
GPUs the fallback is for. Then it syntax-checks ``csrc/bindings.cpp`` as the CUDA build compiles it
(``-DVSTAR_WITH_CUDA``), against this torch's headers: the CUDA dispatch of both ops is type-checked without a CUDA
build of torch. Exit status 1 on a compile error, any spill or any FP64 use; 2 when nvcc is not found.

``--stamp`` skips the check when it already passed for the same architectures on the same ``csrc/`` files, checker,
nvcc, host compiler and torch (a stamp file under ``~/.cache/vstar-kernels/nvcc-check``, :func:`stamp_path`) and
writes the stamp when it passes: .ci/run's step compiles, and the test suite's run of the same check just after finds
its stamp.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..backends.extension_build import source_dir

ARCHS = (75, 80, 86, 89, 90)
_DOUBLE = re.compile(r"double[- ]precision", re.IGNORECASE)
_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)'")
_SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill")
_USAGE = re.compile(r"Used (?P<regs>\d+) registers.*?(?P<smem>\d+) bytes smem")
_KERNEL = re.compile(r"(?P<name>tar_attention_kernel|tar_bwd_query_kernel|tar_bwd_key_kernel)"
                     r"I(?P<dtype>f|6__half|13__nv_bfloat16)Li(?P<dpl>\d+)ELb(?P<rel>[01])E")
_KINDS = {"tar_attention_kernel": "fwd", "tar_bwd_query_kernel": "bwd dq", "tar_bwd_key_kernel": "bwd dk/dv"}
_DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


@dataclass
class KernelUsage:
    arch: int
    kernel: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def find_nvcc() -> str | None:
    """nvcc from PATH, CUDA_HOME or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _describe(mangled: str) -> str:
    match = _KERNEL.search(mangled)
    if match is None:
        return mangled
    mode = "relative" if match["rel"] == "1" else "absolute/plain"
    return f"{_KINDS[match['name']]} {_DTYPES[match['dtype']]} head_dim<={32 * int(match['dpl'])} {mode}"


def parse_ptxas(log: str) -> list[KernelUsage]:
    """Per-kernel resource usage from ``-Xptxas -v`` output."""
    rows: list[KernelUsage] = []
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            rows.append(KernelUsage(arch=int(entry["arch"]), kernel=_describe(entry["name"])))
        elif rows and (spill := _SPILL.search(line)):
            rows[-1].stack, rows[-1].spill_stores, rows[-1].spill_loads = (
                int(spill["stack"]), int(spill["stores"]), int(spill["loads"]))
        elif rows and (usage := _USAGE.search(line)):
            rows[-1].registers, rows[-1].smem = int(usage["regs"]), int(usage["smem"])
    return rows


def nvcc_flags() -> list[str]:
    """The flags torch's extension builder gives nvcc (no implicit half/bfloat16 conversions or operators)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(COMMON_NVCC_FLAGS)


def double_precision_warnings(log: str) -> list[str]:
    """The ptxas lines reporting double-precision use (``--warn-on-double-precision-use``)."""
    return [line.strip() for line in log.splitlines() if _DOUBLE.search(line)]


def compile_cuda(nvcc: str, archs: tuple[int, ...] = ARCHS, jobs: int | None = None
                 ) -> tuple[int, str, list[KernelUsage]]:
    """Compile the .cu for ``archs`` as torch's extension builder would; (return code, compiler log, usage rows).

    One nvcc per arch (``-gencode`` for that arch alone: the device code of an arch does not depend on the others),
    ``jobs`` at a time (default: every CPU), so each log is whole; the logs are joined in ``archs`` order and the
    return code is the first non-zero one."""
    src = source_dir()

    def one(arch: int) -> tuple[int, str]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-c", str(src / "tar_attention_cuda.cu"), "-o", str(Path(tmp) / "tar_attention_cuda.o"),
                   "-std=c++17", "-O3", *nvcc_flags(), f"-I{src}", "-Xptxas", "-v",
                   "-Xptxas", "--warn-on-double-precision-use", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs or os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, archs))
    log = "".join(text for _, text in results)
    return next((code for code, _ in results if code != 0), 0), log, parse_ptxas(log)


def check_cuda_bindings(nvcc: str) -> tuple[int, str]:
    """``-fsyntax-only`` compile of bindings.cpp with ``-DVSTAR_WITH_CUDA``; (return code, compiler log).

    A CPU wheel of torch ships the c10/cuda headers but not the CMake-generated ``cuda_cmake_macros.h``; an empty
    stand-in is supplied last on the include path (it only carries build switches)."""
    from torch.utils.cpp_extension import include_paths

    src = source_dir()
    with tempfile.TemporaryDirectory() as tmp:
        macros = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n")
        includes = [f"-I{path}" for path in include_paths()]
        # nvcc drives the host compiler with the CUDA include path; the stand-in comes last, so a real header wins
        cmd = [nvcc, "-x", "c++", "-std=c++17", "-DVSTAR_WITH_CUDA", *includes, f"-I{src}", f"-I{tmp}",
               "-Xcompiler", "-fsyntax-only", "-c", str(src / "bindings.cpp"), "-o", str(Path(tmp) / "bindings.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def stamp_path(archs: Sequence[int], nvcc: str) -> Path:
    """Where a passing check of ``archs`` with ``nvcc`` leaves its stamp: named by a hash of every file in csrc/ and
    of this checker, the ``--version`` output of nvcc and of the host compilers it runs (gcc, g++), torch's version
    and nvcc flags (``VSTAR_KERNELS_CACHE`` moves the folder, as for the extension's build cache)."""
    import torch

    from ..backends.extension_build import cache_root

    digest = hashlib.sha256()
    for path in [*sorted(source_dir().iterdir()), Path(__file__).resolve()]:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for tool in (nvcc, "gcc", "g++"):
        try:
            version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
        except OSError as exc:
            version = f"{type(exc).__name__}"
        digest.update(f"{tool}: {version}\0".encode())
    digest.update(f"torch {torch.__version__} {' '.join(nvcc_flags())} archs {','.join(map(str, archs))}".encode())
    return cache_root() / "nvcc-check" / f"{digest.hexdigest()[:20]}.passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help=f"SM versions (default {' '.join(map(str, ARCHS))})")
    parser.add_argument("--stamp", action="store_true",
                        help="skip when this check already passed for these archs on the same csrc/ files, nvcc, host "
                             "compiler and torch (a stamp under ~/.cache/vstar-kernels/nvcc-check); write the stamp "
                             "when it passes")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)", file=sys.stderr)
        return 2
    archs = list(dict.fromkeys(args.arch))
    stamp = stamp_path(archs, nvcc) if args.stamp else None
    if stamp is not None and stamp.is_file():
        print(f"nvcc_check: passed before for these archs on the same sources, nvcc, host compiler and torch "
              f"({stamp}); skipped")
        return 0
    result = _check(nvcc, archs)
    if stamp is not None and result == 0:
        if stamp != stamp_path(archs, nvcc):
            print("nvcc_check: a source changed during the check; no stamp written", file=sys.stderr)
        else:
            try:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text("passed\n")
                print(f"stamp written: {stamp}")
            except OSError as exc:  # a read-only cache: the check passed all the same
                print(f"nvcc_check: no stamp written ({exc})", file=sys.stderr)
    return result


def _check(nvcc: str, archs: Sequence[int]) -> int:
    """Compile, print the table; 0 when it passes, else 1."""
    code, log, rows = compile_cuda(nvcc, tuple(archs))
    if code != 0:
        print(log, file=sys.stderr)
        print(f"nvcc failed with exit status {code}", file=sys.stderr)
        return 1
    print(f"{'arch':<6}{'kernel':<50}{'regs':>6}{'smem B':>9}{'stack B':>9}{'spill st/ld B':>15}")
    for row in rows:
        print(f"sm_{row.arch:<3}{row.kernel:<50}{row.registers:>6}{row.smem:>9}{row.stack:>9}"
              f"{row.spill_stores:>8}/{row.spill_loads:<6}")
    spilled = [row for row in rows if row.spills]
    if not rows:
        print("no kernels found in the ptxas output", file=sys.stderr)
        return 1
    doubles = double_precision_warnings(log)
    print(f"{len(rows)} kernels, max {max(r.registers for r in rows)} registers, {len(spilled)} with spills, "
          f"{len(doubles)} double-precision warnings")
    for line in doubles:
        print(f"FP64: {line}", file=sys.stderr)
    code, log = check_cuda_bindings(nvcc)
    if code != 0:
        print(log, file=sys.stderr)
        print("bindings.cpp with -DVSTAR_WITH_CUDA does not compile", file=sys.stderr)
        return 1
    print("bindings.cpp with -DVSTAR_WITH_CUDA: compiles")
    return 1 if spilled or doubles else 0


if __name__ == "__main__":
    raise SystemExit(main())
