"""The C++/CUDA extension backend (csrc/): the custom op ``torch.ops.vstar_kernels.tar_attention``.

Loading, first match wins:
1. an ahead-of-time build shipped in the package (``VSTAR_KERNELS_BUILD_EXT=1 pip install .`` makes
   ``vstar_kernels/_C*.so``);
2. a just-in-time build (the CPU kernel, plus the CUDA kernel when torch is a CUDA build and a toolkit is found)
   in the cache (``VSTAR_KERNELS_CACHE``, default ``~/.cache/vstar-kernels``), made on first use
   with ``torch.utils.cpp_extension.load`` and ninja, announced on stderr while it compiles, serialised across
   processes by a file lock. The cache key covers the sources, the flags, torch's version and the CPU ISA.
``VSTAR_KERNELS_NO_BUILD=1`` disables step 2. A failed build is remembered for the process: "auto" falls back to the
torch backend with one warning quoting the compiler error; ``backend="extension"`` raises it.

The op's fake (meta) implementation is registered here, so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..contract import TARParams

NAME = "extension"
NO_BUILD_ENV = "VSTAR_KERNELS_NO_BUILD"
CACHE_ENV = "VSTAR_KERNELS_CACHE"
LIB_NAME = "vstar_kernels_ext"
OP_NAME = "vstar_kernels::tar_attention"
CPU_SOURCES = ("bindings.cpp", "tar_attention_cpu.cpp")
CUDA_SOURCES = ("tar_attention_cuda.cu",)
HEADERS = ("tar_attention.h", "tar_attention_cpu.h")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT64 = 2**63

_lock = threading.Lock()
_status: dict[str, str | None] = {}  # "error": why the extension cannot load (None: loaded); absent: not tried
_warned_fallback = False
_availability_by_device: dict[str, str | None] = {}


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


# ----------------------------------------------------------------------------------------------- building, loading
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
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


def _jit_build() -> Path:
    from torch.utils import cpp_extension

    target = build_dir()
    library = target / f"{LIB_NAME}.so"
    with _file_lock(target.parent / f"{target.name}.lock"):
        if not library.is_file():
            print(f"vstar-kernels: building the C++ extension (first use, about a minute) in {target}",
                  file=sys.stderr, flush=True)
            target.mkdir(parents=True, exist_ok=True)
            src = source_dir()
            cpp_extension.load(
                name=LIB_NAME,
                sources=[str(src / name) for name in sources()],
                extra_cflags=compile_flags(),
                extra_cuda_cflags=["-O3", "-std=c++17", "-DVSTAR_WITH_CUDA"],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(src)],
                build_directory=str(target),
                is_python_module=False,
                verbose=False,
            )
            print("vstar-kernels: C++ extension built", file=sys.stderr, flush=True)
    return library


def _op_registered() -> bool:
    return hasattr(torch.ops, "vstar_kernels") and hasattr(torch.ops.vstar_kernels, "tar_attention")


def load() -> str | None:
    """Load (building if needed) the extension once per process; None on success, else why it cannot load."""
    with _lock:
        if "error" in _status:
            return _status["error"]
        _status["error"] = _load_uncached()
        return _status["error"]


def _load_uncached() -> str | None:
    if _op_registered():  # loaded by someone else in this process
        _register_fake_once()
        return None
    library = prebuilt_library()
    try:
        if library is None:
            cached = build_dir() / f"{LIB_NAME}.so"
            if not cached.is_file() and os.environ.get(NO_BUILD_ENV, "").strip() not in ("", "0"):
                return f"{NO_BUILD_ENV}=1 is set and no built extension exists (looked in {cached.parent})"
            library = _jit_build()
        if not _op_registered():
            torch.ops.load_library(str(library))
    except Exception as exc:  # a compiler error, a missing compiler or ninja, a bad cache entry
        return f"building or loading the C++ extension failed: {_error_tail(exc)}"
    _register_fake_once()
    return None


_fake_registered = False


def _register_fake_once() -> None:
    """The op's shape function for FakeTensor tracing (torch.compile, export): output shaped like q, v's head_dim."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(OP_NAME)
    def _fake(q, k, v, sigma, strength=1.0, mode="relative", scale=1.0, q_offset=0, k_offset=0):
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    _fake_registered = True


def _error_tail(exc: BaseException, lines: int = 25) -> str:
    """The end of the error: torch's build errors carry the compiler output in the message; a failing
    subprocess (e.g. the compiler's own version check) carries it in ``output``."""
    output = getattr(exc, "output", None)
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    text = "\n".join(part for part in (str(exc).strip(), (output or "").strip()) if part) or type(exc).__name__
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


def build_pending() -> bool:
    """True when the next use would compile: nothing loaded, no ahead-of-time build, no cached one, builds allowed."""
    if "error" in _status or _op_registered() or prebuilt_library() is not None:
        return False
    if os.environ.get(NO_BUILD_ENV, "").strip() not in ("", "0"):
        return False
    try:
        return not (build_dir() / f"{LIB_NAME}.so").is_file()
    except FileNotFoundError:  # no sources: load() will say so
        return False


def status() -> dict[str, object]:
    """For ``vstar-kernels info``: whether the extension is loaded, where it lives, and why not."""
    tried = "error" in _status
    try:
        location = str(prebuilt_library() or build_dir())
    except FileNotFoundError as exc:
        location = str(exc)
    return {"loaded": tried and _status["error"] is None, "error": _status["error"] if tried else "not loaded yet",
            "location": location, "isa": cpu_isa()}


# ----------------------------------------------------------------------------------------------- backend interface
def unavailable_reason(device: torch.device) -> str | None:
    """None when the extension runs on ``device`` (building it on first use), else why not."""
    return _availability(device.type)


@torch.compiler.assume_constant_result
def _availability(device_type: str) -> str | None:
    # Final once computed (load() remembers its outcome for the process), so kept per device type: eager calls skip
    # the lock and the dispatcher query. A constant for torch.compile: evaluated once while tracing, so a compiled
    # caller never graph-breaks on the lock, the file system or the dispatcher query.
    if device_type not in _availability_by_device:
        _availability_by_device[device_type] = _check_availability(device_type)
    return _availability_by_device[device_type]


def _check_availability(device_type: str) -> str | None:
    if device_type not in ("cpu", "cuda"):
        return f"no kernel for device type {device_type!r}"
    error = load()
    if error is not None:
        return error
    if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA"):
        return "this build of the extension has no CUDA kernel (build with a CUDA toolkit and a CUDA torch)"
    return None


def unsupported_reason(q: torch.Tensor, params: TARParams) -> str | None:
    """None when the kernel supports these inputs, else why not."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.device.type == "cuda" and q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} exceeds the CUDA kernel's maximum of 256"
    if not all(-_INT64 <= x < _INT64 for x in (params.q_offset, params.k_offset)):
        return "q_offset / k_offset must fit in int64"
    return None


def note_fallback(reason: str) -> None:
    """Called when "auto" skips this backend: a failed build is reported once per process, with its error."""
    global _warned_fallback
    if not _warned_fallback and reason.startswith("building or loading"):
        _warned_fallback = True
        warnings.warn(f"vstar-kernels: 'auto' falls back to the torch backend; {reason}", RuntimeWarning,
                      stacklevel=4)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams) -> torch.Tensor:
    return torch.ops.vstar_kernels.tar_attention(q, k, v, params.sigma, params.strength, params.mode, params.scale,
                                                 params.q_offset, params.k_offset)
