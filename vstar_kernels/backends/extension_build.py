"""Build machinery of the C++/CUDA extension (csrc/): sources, flags, the cache, the lock, the just-in-time build.

Imported by the extension backend (:mod:`vstar_kernels.backends.extension`), ``setup.py`` (the ahead-of-time build)
and the nvcc check; it knows nothing about the op itself.

- The cache folder is ``VSTAR_KERNELS_CACHE``, default ``$XDG_CACHE_HOME/vstar-kernels`` or
  ``~/.cache/vstar-kernels``; one subfolder per build, named by torch's version, the CPU ISA and a hash of the
  sources and flags.
- A finished build is marked by a file written after the compiler succeeded; loading a marked build takes no lock
  and writes nothing, so a read-only cache (a container image, a shared cluster install) works.
- Builds are serialised across processes by an exclusive file lock beside the build folder.
- ``VSTAR_KERNELS_NO_BUILD`` (1/true/yes/on, or 0/false/no/off/unset) forbids compiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

NO_BUILD_ENV = "VSTAR_KERNELS_NO_BUILD"
CACHE_ENV = "VSTAR_KERNELS_CACHE"
LIB_NAME = "vstar_kernels_ext"
CPU_SOURCES = ("bindings.cpp", "cpu_gemm.cpp", "tar_attention_cpu.cpp", "tar_attention_cpu_long.cpp")
CUDA_SOURCES = ("tar_attention_cuda.cu",)
HEADERS = ("tar_attention.h", "tar_attention_cpu.h", "cpu_tiles.h", "cpu_gemm.h")
BUILT_MARKER = "BUILT"  # written after a successful build: its presence means the .so is complete
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case; unset is off); else ValueError."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


def builds_disabled() -> bool:
    """Whether ``VSTAR_KERNELS_NO_BUILD`` forbids compiling."""
    return env_flag(NO_BUILD_ENV)


# ----------------------------------------------------------------------------------------------- locating things
def source_dir() -> Path:
    """csrc/ of a source checkout (editable installs), else the copy packaged as ``vstar_kernels/csrc``."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if (candidate / "tar_attention.h").is_file():
            return candidate
    raise FileNotFoundError("the C++ sources (csrc/) are not installed with this copy of vstar-kernels")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "vstar-kernels"


def cpu_isa() -> str:
    """The at::vec ISA the CPU kernel is compiled for: torch's own choice for this machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in ("AVX2", "AVX512") else "DEFAULT"


def with_cuda() -> bool:
    """Whether builds include the CUDA kernel: a CUDA build of torch and a CUDA toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def sources() -> list[str]:
    return [*CPU_SOURCES, *(CUDA_SOURCES if with_cuda() else ())]


def compile_flags(isa: str | None = None) -> list[str]:
    """C++ flags: optimisation, OpenMP (at::parallel_for), the at::vec ISA, and the CUDA switch of bindings.cpp."""
    isa = cpu_isa() if isa is None else isa
    flags = ["-O3", "-DNDEBUG", "-fopenmp", f"-DCPU_CAPABILITY={isa}"]
    if with_cuda():
        flags.append("-DVSTAR_WITH_CUDA")
    if isa == "AVX2":
        flags += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    elif isa == "AVX512":
        flags += ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    return flags


def cuda_flags() -> list[str]:
    """nvcc flags of the CUDA kernel (JIT and ahead-of-time builds alike)."""
    return ["-O3", "-std=c++17", "-DVSTAR_WITH_CUDA"]


def build_dir() -> Path:
    """The cache folder of this build: named by torch version, ISA and a hash of the sources and flags."""
    src = source_dir()
    digest = hashlib.sha256()
    for name in (*sources(), *HEADERS):
        digest.update((src / name).read_bytes())
    flags = compile_flags()
    digest.update(" ".join(flags).encode())
    version = torch.__version__.replace("+", "_")
    device = "cuda" if with_cuda() else "cpu"
    return cache_root() / f"{LIB_NAME}-torch{version}-{cpu_isa()}-{device}-{digest.hexdigest()[:12]}"


def prebuilt_library() -> Path | None:
    """The ahead-of-time build inside the package, if any."""
    package = Path(__file__).resolve().parents[1]
    found = sorted(package.glob("_C*.so")) + sorted(package.glob("_C*.pyd"))
    return found[0] if found else None


def cached_library() -> Path | None:
    """The finished just-in-time build of these sources in the cache, if any (read-only: no lock, no writes)."""
    target = build_dir()
    library = target / f"{LIB_NAME}.so"
    return library if (target / BUILT_MARKER).is_file() and library.is_file() else None


# ----------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, released by the OS if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: torch's own build baton still serialises the compile
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def jit_build() -> Path:
    """The library of these sources: the cached build when there is one (no lock), else compiled now under the
    file lock with ``torch.utils.cpp_extension.load`` and ninja, announced on stderr."""
    from torch.utils import cpp_extension

    cached = cached_library()
    if cached is not None:
        return cached
    target = build_dir()
    library = target / f"{LIB_NAME}.so"
    with file_lock(target.parent / f"{target.name}.lock"):
        if cached_library() is None:  # another process may have finished while we waited
            print("vstar-kernels: building the C++ extension (first use: about 17 CPU-seconds of g++, cached) in "
                  f"{target}", file=sys.stderr, flush=True)
            target.mkdir(parents=True, exist_ok=True)
            src = source_dir()
            cpp_extension.load(
                name=LIB_NAME,
                sources=[str(src / name) for name in sources()],
                extra_cflags=compile_flags(),
                extra_cuda_cflags=cuda_flags(),
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(src)],
                build_directory=str(target),
                is_python_module=False,
                verbose=False,
            )
            (target / BUILT_MARKER).write_text(torch.__version__ + "\n")
            print("vstar-kernels: C++ extension built", file=sys.stderr, flush=True)
    return library
