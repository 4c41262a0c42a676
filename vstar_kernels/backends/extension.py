"""The C++/CUDA extension backend (csrc/): the custom ops ``torch.ops.vstar_kernels.*``.

Two pairs of ops run the same kernels (csrc/bindings.cpp): ``tar_attention`` / ``tar_attention_backward``, the public
ops of whole sequences (the token layout as the user gives it; differentiable), and ``tar_attention_kernel`` /
``tar_attention_kernel_backward``, which this backend calls: the layout in the kernels' folded form
(:meth:`~vstar_kernels.contract.TARParams.kernel_layout_args` and ``offset_delta``, so chunks of a sequence work), an
optional given row max and the log-sum-exp (forward-only), and a frame-distance profile (tables and windows: the
float32 tables and integers of :func:`~.profile_tables.kernel_profile`, forward and backward).

Loading, first match wins:
1. an ahead-of-time build shipped in the package (``VSTAR_KERNELS_BUILD_EXT=1 pip install .`` makes
   ``vstar_kernels/_C*.so``);
2. a finished just-in-time build in the cache, loaded without a lock (read-only caches work);
3. a just-in-time build made now (:mod:`vstar_kernels.backends.extension_build`: the CPU kernel, plus the CUDA kernel
   when torch is a CUDA build and a toolkit is found), unless ``VSTAR_KERNELS_NO_BUILD`` is on.
A failed build is remembered for the process: "auto" falls back to the torch backend with one warning quoting the
compiler error; ``backend="extension"`` raises it.

The op's fake (meta) implementation is registered here, with the real kernel's checks, so
``torch.compile(fullgraph=True)`` traces through it and refuses what the kernel would refuse.
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import torch

from ..compile_markers import assume_constant_result
from ..contract import FLOAT32_MAX, MAX_OFFSET, MAX_TOKENS, TARParams, validate_layout, validate_tensors
from ..differentiable import differentiable_grads
from . import extension_build as build
from .base import InputSpec
from .profile_tables import kernel_profile

NAME = "extension"
NO_BUILD_ENV = build.NO_BUILD_ENV
OP_NAME = "vstar_kernels::tar_attention"
BACKWARD_OP_NAME = "vstar_kernels::tar_attention_backward"
KERNEL_OP_NAME = "vstar_kernels::tar_attention_kernel"
KERNEL_BACKWARD_OP_NAME = "vstar_kernels::tar_attention_kernel_backward"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = None  # any head_dim on the CPU
MAX_CUDA_HEAD_DIM = 256  # csrc/tar_attention.h kMaxCudaHeadDim
MAX_CUDA_OFFSET_DELTA = 2**30  # csrc/tar_attention.h kMaxCudaOffsetDelta

CPU_GEMM_ENV = "VSTAR_KERNELS_CPU_GEMM"
# the CPU kernels' GEMM engines (csrc/cpu_gemm.h): auto picks per dtype; the others force one (tests, diagnostics)
CPU_GEMM_ENGINES = ("auto", "brgemm_native", "brgemm_f32", "microkernel")

_lock = threading.Lock()
_status: dict[str, str | None] = {}  # "error": why the extension cannot load (None: loaded); absent: not tried
_warned_fallback = False
_availability_by_device: dict[str, str | None] = {}


def _op_registered() -> bool:
    return hasattr(torch.ops, "vstar_kernels") and hasattr(torch.ops.vstar_kernels, "tar_attention_kernel_backward")


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
    disabled = build.builds_disabled()  # a bad value is the caller's error, raised as such
    library = build.prebuilt_library()
    try:
        if library is None:
            library = build.cached_library()
        if library is None:
            if disabled:
                return (f"{NO_BUILD_ENV}={os.environ[NO_BUILD_ENV].strip()} is set and no built extension exists "
                        f"(looked in {build.build_dir()})")
            library = build.jit_build()
        if not _op_registered():
            torch.ops.load_library(str(library))
    except Exception as exc:  # a compiler error, a missing compiler or ninja, a bad cache entry
        return f"building or loading the C++ extension failed: {_error_tail(exc)}"
    _register_fake_once()
    engine = requested_cpu_gemm()
    if engine != "auto":
        torch.ops.vstar_kernels.set_cpu_gemm(engine)
    return None


def requested_cpu_gemm() -> str:
    """The CPU GEMM engine ``VSTAR_KERNELS_CPU_GEMM`` asks for (unset: ``auto``); ValueError for an unknown one."""
    raw = os.environ.get(CPU_GEMM_ENV, "").strip().lower() or "auto"
    if raw not in CPU_GEMM_ENGINES:
        raise ValueError(f"{CPU_GEMM_ENV} must be one of {', '.join(CPU_GEMM_ENGINES)}, "
                         f"got {os.environ[CPU_GEMM_ENV]!r}")
    return raw


def set_cpu_gemm(engine: str) -> None:
    """Run the CPU kernels' block products on ``engine`` from now on, process-wide (``auto`` restores the per-dtype
    choice): ``brgemm_native`` keeps bf16/fp16 operands (packed for AMX where oneDNN packs them, else cpublas'
    unpacked fallback), ``brgemm_f32`` widens them to fp32 for ``at::native::cpublas::brgemm``, ``microkernel`` runs
    the hand-written fp32 kernel. An engine this CPU cannot run raises. Not thread-safe against running calls."""
    if engine not in CPU_GEMM_ENGINES:
        raise ValueError(f"unknown CPU GEMM engine {engine!r}; expected one of {', '.join(CPU_GEMM_ENGINES)}")
    error = load()
    if error is not None:
        raise RuntimeError(f"the C++ extension is unavailable: {error}")
    torch.ops.vstar_kernels.set_cpu_gemm(engine)


def cpu_gemm_info() -> dict[str, object]:
    """What the CPU kernels multiply with on this machine: torch's ISA level, the CPU's AMX and AVX-512-bf16 support,
    which engines run, and the engine (``+packed``: B packed for AMX) of each dtype. Loads the extension."""
    error = load()
    if error is not None:
        raise RuntimeError(f"the C++ extension is unavailable: {error}")
    pairs = dict(item.split("=", 1) for item in torch.ops.vstar_kernels.cpu_gemm_info().split(";"))
    info: dict[str, object] = {
        "isa": torch.backends.cpu.get_cpu_capability(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "amx_fp16": torch.cpu._is_amx_fp16_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "onednn_packs": pairs.pop("amx") == "1",
    }
    for flag in ("brgemm_f32", "native_bf16", "native_f16"):
        info[flag] = pairs.pop(flag) == "1"
    info.update(pairs)  # override, float32, bfloat16, float16
    return info


_fake_registered = False


def _register_fake_once() -> None:
    """The op's Python kernels: the shape function for FakeTensor tracing (torch.compile, export), output shaped like
    q with v's head_dim, and its autograd formula."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(OP_NAME)
    def _fake(q, k, v, sigma, strength=1.0, mode="relative", scale=1.0, q_offset=0, k_offset=0, tokens_per_frame=1,
              video_start=0, video_tokens=None):
        _check_like_the_kernel(q, k, v, sigma, strength, mode, scale, q_offset, k_offset, tokens_per_frame,
                               video_start, video_tokens)
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    @torch.library.register_fake(BACKWARD_OP_NAME)
    def _fake_backward(grad_out, q, k, v, sigma, strength=1.0, mode="relative", scale=1.0, q_offset=0, k_offset=0,
                       tokens_per_frame=1, video_start=0, video_tokens=None):
        _check_like_the_kernel(q, k, v, sigma, strength, mode, scale, q_offset, k_offset, tokens_per_frame,
                               video_start, video_tokens)
        if grad_out.shape != (*q.shape[:3], v.shape[3]) or grad_out.dtype != q.dtype:
            raise RuntimeError("tar_attention_backward: grad_out must be shaped like the output and match q's dtype")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, *scalars = inputs
        ctx.save_for_backward(q, k, v)
        ctx.params = TARParams(*scalars)

    def _backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: the fused backward is not differentiable
            dq, dk, dv = differentiable_grads(q, k, v, grad_out, ctx.params, needs)
        else:
            dq, dk, dv = backward(q, k, v, grad_out, ctx.params)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, *(None,) * 9)

    @torch.library.register_fake(KERNEL_OP_NAME)
    def _fake_kernel(q, k, v, sigma, strength, mode, scale, offset_delta, tokens_per_frame, video_start_q,
                     video_start_k, video_end_q, video_end_k, row_max=None, return_lse=False, k_lengths=None,
                     profile_bias=None, profile_scale=None, profile=None):
        _check_like_the_kernel_op(q, k, v, sigma, strength, mode, scale, offset_delta, tokens_per_frame,
                                  video_start_q, video_start_k, video_end_q, video_end_k)
        _check_profile_like_the_kernel(q, profile_bias, profile_scale, profile, KERNEL_OP_NAME)
        if row_max is not None:
            _check_row_max_like_the_kernel(q, row_max, mode)
        lse_shape = tuple(q.shape[:3]) if return_lse else (0,)
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3])), q.new_empty(lse_shape,
                                                                                           dtype=torch.float32)

    @torch.library.register_fake(KERNEL_BACKWARD_OP_NAME)
    def _fake_kernel_backward(grad_out, q, k, v, sigma, strength, mode, scale, offset_delta, tokens_per_frame,
                              video_start_q, video_start_k, video_end_q, video_end_k, k_lengths=None,
                              profile_bias=None, profile_scale=None, profile=None):
        _check_like_the_kernel_op(q, k, v, sigma, strength, mode, scale, offset_delta, tokens_per_frame,
                                  video_start_q, video_start_k, video_end_q, video_end_k)
        _check_profile_like_the_kernel(q, profile_bias, profile_scale, profile, KERNEL_BACKWARD_OP_NAME)
        if grad_out.shape != (*q.shape[:3], v.shape[3]) or grad_out.dtype != q.dtype:
            raise RuntimeError("tar_attention_kernel_backward: grad_out must be shaped like the output and match "
                               "q's dtype")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    # the op called directly (torch.ops.vstar_kernels.tar_attention) is differentiable too, twice over (eager)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    # the fused backward ops have no derivative, and the kernel op's partials are forward-only: differentiating them
    # raises rather than giving PyTorch's silent zeros
    torch.library.register_autograd(BACKWARD_OP_NAME, _no_double_backward, setup_context=_no_context)
    torch.library.register_autograd(KERNEL_OP_NAME, _no_kernel_backward, setup_context=_no_context)
    torch.library.register_autograd(KERNEL_BACKWARD_OP_NAME, _no_double_backward, setup_context=_no_context)

    _fake_registered = True


DOUBLE_BACKWARD_ERROR = (
    "TAR attention (extension backend): the fused backward op vstar_kernels::tar_attention_backward has no "
    "derivative, so it cannot be differentiated again (double backward / create_graph=True through it). "
    "Differentiate vstar_kernels.tar_attention, or torch.ops.vstar_kernels.tar_attention in eager mode, with "
    "create_graph=True instead: their backward then switches to a differentiable formulation."
)


KERNEL_BACKWARD_ERROR = (
    "TAR attention (extension backend): vstar_kernels::tar_attention_kernel is the backend's forward kernel op "
    "(its row_max= and lse are forward-only partial results); it has no autograd formula of its own. Differentiate "
    "vstar_kernels.tar_attention (whose backward runs vstar_kernels::tar_attention_kernel_backward) instead."
)


def _no_context(ctx, inputs, output) -> None:
    """Nothing to save: :func:`_no_double_backward` and :func:`_no_kernel_backward` only raise."""


def _no_kernel_backward(ctx, *grads):
    """The autograd formula of ``tar_attention_kernel``: a clear RuntimeError (see KERNEL_BACKWARD_ERROR)."""
    raise RuntimeError(KERNEL_BACKWARD_ERROR)


def _no_double_backward(ctx, *grads):
    """The autograd formula of ``tar_attention_backward``: a clear RuntimeError (see DOUBLE_BACKWARD_ERROR)."""
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _check_like_the_kernel(q, k, v, sigma, strength, mode, scale, q_offset, k_offset, tokens_per_frame=1,
                           video_start=0, video_tokens=None) -> None:
    """The real kernel's TORCH_CHECKs (csrc/bindings.cpp), for the fake kernel: shapes, dtypes and scalars. Scalars
    that are symbolic under torch.compile are left to the real kernel."""
    validate_tensors(q, k, v)
    if q.dtype not in DTYPES:
        raise RuntimeError(f"tar_attention (extension): dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if mode not in ("relative", "absolute"):
        raise RuntimeError(f"tar_attention: mode must be 'relative' or 'absolute', got {mode!r}")
    checks = (
        (sigma, lambda x: math.isfinite(x) and x > 0, "sigma must be > 0 and finite"),
        (strength, lambda x: math.isfinite(x) and abs(x) <= FLOAT32_MAX,
         "strength must be finite and fit in float32"),
        (scale, lambda x: math.isfinite(x) and x > 0, "scale must be > 0 and finite"),
        (q_offset, lambda x: abs(x) <= MAX_OFFSET, "q_offset must be within +-2^53"),
        (k_offset, lambda x: abs(x) <= MAX_OFFSET, "k_offset must be within +-2^53"),
        (tokens_per_frame, lambda x: 1 <= x <= MAX_TOKENS, "tokens_per_frame must be in [1, 2^53]"),
        (video_start, lambda x: 0 <= x <= MAX_TOKENS, "video_start must be in [0, 2^53]"),
        (video_tokens, lambda x: 0 <= x <= MAX_TOKENS, "video_tokens must be in [0, 2^53]"),
    )
    for value, ok, message in checks:
        if isinstance(value, int | float) and not ok(value):
            raise RuntimeError(f"tar_attention: {message}, got {value}")
    layout = (tokens_per_frame, video_start, video_tokens)
    if all(isinstance(x, int | None) for x in layout):
        try:
            validate_layout(TARParams(1.0, 0.0, "absolute", 1.0, 0, 0, *layout), q.shape[1], k.shape[1])
        except ValueError as exc:
            raise RuntimeError(f"tar_attention: {exc}") from None


def _check_like_the_kernel_op(q, k, v, sigma, strength, mode, scale, offset_delta, tokens_per_frame, video_start_q,
                              video_start_k, video_end_q, video_end_k) -> None:
    """The kernel op's TORCH_CHECKs (csrc/bindings.cpp ``make_kernel_params``), for its fake kernel: those of the
    public op but for the layout, which is the folded one of ``TARParams.kernel_layout_args`` (checked for range,
    never for lying inside the sequences: a chunk's span may reach past it). Symbolic values are left to the real
    kernel."""
    _check_like_the_kernel(q, k, v, sigma, strength, mode, scale, 0, 0)
    if isinstance(offset_delta, int) and abs(offset_delta) > MAX_OFFSET:
        raise RuntimeError(f"tar_attention_kernel: offset_delta must be within +-2^53, got {offset_delta}")
    values = (q.shape[1], k.shape[1], tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k)
    if not all(isinstance(x, int) for x in values):
        return
    len_q, len_k = q.shape[1], k.shape[1]
    longest = max(len_q, len_k, 1)
    if not 1 <= tokens_per_frame <= longest:
        raise RuntimeError(f"tar_attention_kernel: tokens_per_frame must be in [1, max(Lq, Lk, 1) = {longest}], got "
                           f"{tokens_per_frame}")
    sides = (("q", video_start_q, video_end_q, len_q), ("k", video_start_k, video_end_k, len_k))
    for name, start, end, length in sides:
        if not 1 - tokens_per_frame <= start <= longest:
            raise RuntimeError(f"tar_attention_kernel: video_start_{name} must be in [1 - tokens_per_frame, max(Lq, "
                               f"Lk, 1)] = [{1 - tokens_per_frame}, {longest}], got {start}")
        if not start <= end <= max(start, length):
            raise RuntimeError(f"tar_attention_kernel: video_end_{name} must be in [video_start_{name}, "
                               f"max(video_start_{name}, L{name})] = [{start}, {max(start, length)}], got {end}")


def _check_profile_like_the_kernel(q: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                                   ints: list[int] | None, op: str) -> None:
    """The kernel ops' profile checks (csrc/bindings.cpp ``set_profile``): (table_len, head_stride, radius,
    sink_limit) and contiguous float32 (rows, table_len) tables on q's device. Symbolic values are left to the real
    kernel."""
    name = op.split("::")[-1]
    if ints is None:
        if bias is not None or scale is not None:
            raise RuntimeError(f"{name}: profile tables need the profile's integers (table_len, head_stride, radius, "
                               "sink_limit)")
        return
    if len(ints) != 4:
        raise RuntimeError(f"{name}: profile must be (table_len, head_stride, radius, sink_limit), got {len(ints)} "
                           "integers")
    if not all(isinstance(x, int) for x in ints):
        return
    table_len, head_stride, radius, _ = ints
    if table_len < 1:
        raise RuntimeError(f"{name}: profile table_len must be >= 1, got {table_len}")
    if head_stride not in (0, table_len):
        raise RuntimeError(f"{name}: profile head_stride must be 0 (one table row for every head) or table_len = "
                           f"{table_len} (one per head), got {head_stride}")
    if radius < -1:
        raise RuntimeError(f"{name}: profile radius must be >= 0, or -1 for no window, got {radius}")
    rows = 1 if head_stride == 0 else q.shape[2]
    for label, table in (("bias", bias), ("scale", scale)):
        if table is None:
            continue
        if (table.dtype != torch.float32 or tuple(table.shape) != (rows, table_len)
                or not table.is_contiguous()):
            raise RuntimeError(f"{name}: profile {label} must be a contiguous float32 ({rows}, {table_len}) tensor, "
                               f"got {table.dtype} {tuple(table.shape)}")
        if table.device != q.device:
            raise RuntimeError(f"{name}: profile {label} must be on q's device {q.device}, got {table.device}")


def _check_row_max_like_the_kernel(q: torch.Tensor, row_max: torch.Tensor, mode: str) -> None:
    """The kernel op's row_max checks (csrc/bindings.cpp ``check_row_max``)."""
    if mode != "relative":
        raise RuntimeError("tar_attention_kernel: row_max applies to mode='relative' only (the absolute bias has no "
                           "row max)")
    if tuple(row_max.shape) != tuple(q.shape[:3]):
        raise RuntimeError(f"tar_attention_kernel: row_max must have shape (batch, Lq, heads) = {tuple(q.shape[:3])}, "
                           f"got {tuple(row_max.shape)}")
    if row_max.dtype != torch.float32:
        raise RuntimeError(f"tar_attention_kernel: row_max must be float32, got {row_max.dtype}")
    if row_max.device != q.device:
        raise RuntimeError(f"tar_attention_kernel: row_max must be on q's device {q.device}, got {row_max.device}")


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
    if "error" in _status or _op_registered() or build.prebuilt_library() is not None:
        return False
    try:
        return not build.builds_disabled() and build.cached_library() is None
    except (FileNotFoundError, ValueError):  # no sources, or a bad NO_BUILD value: load() will say so
        return False


def status() -> dict[str, object]:
    """For ``vstar-kernels info``: whether the extension is loaded, where it lives, and why not."""
    tried = "error" in _status
    try:
        location = str(build.prebuilt_library() or build.build_dir())
    except FileNotFoundError as exc:
        location = str(exc)
    return {"loaded": tried and _status["error"] is None, "error": _status["error"] if tried else "not loaded yet",
            "location": location, "isa": build.cpu_isa()}


# ----------------------------------------------------------------------------------------------- backend interface
def unavailable_reason(device: torch.device) -> str | None:
    """None when the extension runs on ``device`` (building it on first use), else why not."""
    return _availability(device.type)


@assume_constant_result
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


def unsupported_reason(spec: InputSpec, params: TARParams) -> str | None:
    """None when the kernel supports these inputs, else why not."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not supported (float16, bfloat16, float32)"
    if spec.device.type == "cuda" and spec.varlen:
        return "k_lengths (varlen keys) runs on its CPU kernel only: the CUDA fallback has none (triton runs it)"
    if spec.device.type == "cuda" and spec.head_dim > MAX_CUDA_HEAD_DIM:
        return f"head_dim {spec.head_dim} exceeds the CUDA kernel's maximum of {MAX_CUDA_HEAD_DIM}"
    if spec.device.type == "cuda" and abs(params.offset_delta) > MAX_CUDA_OFFSET_DELTA:
        return (f"|offset_delta| = {abs(params.offset_delta)} (q_offset - k_offset plus the frames before each "
                "chunk's first token) exceeds the CUDA kernel's 2**30 (int32 frame distances)")
    return None


def note_fallback(reason: str) -> None:
    """Called when "auto" skips this backend: a failed build is reported once per process, with its error."""
    global _warned_fallback
    if not _warned_fallback and reason.startswith("building or loading"):
        _warned_fallback = True
        warnings.warn(f"vstar-kernels: 'auto' falls back to the torch backend; {reason}", RuntimeWarning,
                      stacklevel=4)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: TARParams, *,
            row_max: torch.Tensor | None = None, return_lse: bool = False,
            k_lengths: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TAR attention by ``vstar_kernels::tar_attention_kernel``: the output (batch, Lq, heads, head_dim) in q's dtype,
    or ``(out, lse)`` with ``return_lse=True``, lse the natural-log log-sum-exp of each row's biased logits, float32
    (batch, Lq, heads). ``row_max`` (relative mode; (batch, Lq, heads), any strides; float32, converted otherwise)
    replaces each row's own max of the unbiased logits in the bias coefficient. The call may be a chunk of a longer
    sequence (``params.q_token_offset`` / ``k_token_offset``): the kernels take the layout folded to local tokens.
    ``k_lengths`` (varlen keys, CPU only) as in :func:`vstar_kernels.ops.tar_attention`. A frame-distance profile
    (``params.profile``) passes its kernel tables (:func:`_profile_args`)."""
    if row_max is not None and row_max.dtype != torch.float32:
        row_max = row_max.float()
    out, lse = torch.ops.vstar_kernels.tar_attention_kernel(q, k, v, *_kernel_args(params, q, k), row_max,
                                                            bool(return_lse), k_lengths,
                                                            *_profile_args(params, q.device))
    return (out, lse) if return_lse else out


def _profile_args(params: TARParams, device: torch.device) -> tuple[object, object, list[int] | None]:
    """The kernel ops' profile arguments ``(profile_bias, profile_scale, profile)``: the float32 tables of
    :func:`~.profile_tables.kernel_profile` on ``device`` (None where the profile has none) and its integers
    (table_len, head_stride, radius, sink_limit); ``(None, None, None)`` for a call without a profile."""
    if params.profile is None:
        return None, None, None
    # a traced call must not keep its graph's tensors in kernel_profile's cache (the backward's graph would read the
    # forward's): the same tables, made by traced ops
    kp = kernel_profile(params, device, torch.float32, cached=not torch.compiler.is_compiling())
    return kp.bias, kp.scale, [kp.table_len, kp.head_stride, kp.radius, kp.sink_limit]


def _kernel_args(params: TARParams, q: torch.Tensor, k: torch.Tensor) -> tuple[float | int | str, ...]:
    """The kernel ops' scalars: sigma, strength, mode, scale, offset_delta and the folded layout of
    :meth:`TARParams.kernel_layout_args` (tokens_per_frame, video_start_q, video_start_k, video_end_q,
    video_end_k)."""
    return (params.sigma, params.strength, params.mode, params.scale, params.offset_delta,
            *params.kernel_layout_args(q.shape[1], k.shape[1]))


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, params: TARParams, *,
             k_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the fused ``vstar_kernels::tar_attention_kernel_backward`` (the folded layout, so chunks
    too), never an Lq x Lk tensor. CPU: scores recomputed per (batch, head) and query block (at::vec,
    at::parallel_for). CUDA: two kernels in the .cu, one warp per query row (dQ and four fp32 statistics per row) and
    one warp per key (dK, dV)."""
    return torch.ops.vstar_kernels.tar_attention_kernel_backward(grad_out, q, k, v, *_kernel_args(params, q, k),
                                                                 k_lengths, *_profile_args(params, q.device))
