"""``tar_attention``: the one entry point. Validates, picks a backend, calls it."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .backends import AUTO_ORDER, BACKENDS, DEFAULT_AUTO_ORDER, Backend, InputSpec, torch_tar
from .contract import TARParams, make_params, validate_layout, validate_profile, validate_tensors
from .differentiable import differentiable_grads
from .profiles import FrameProfile

BACKEND_ENV = "VSTAR_KERNELS_BACKEND"
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)


def tar_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sigma: float | None = None,
    strength: float | None = None,
    mode: str | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    backend: str = "auto",
    tokens_per_frame: int = 1,
    video_start: int = 0,
    video_tokens: int | None = None,
    q_token_offset: int | None = None,
    k_token_offset: int | None = None,
    row_max: torch.Tensor | None = None,
    return_lse: bool = False,
    k_lengths: torch.Tensor | None = None,
    profile: FrameProfile | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Temporal attention with VSTAR's Temporal Attention Regularization, fused where a kernel exists.

    By default every token is one frame (a UNet's temporal attention). For a video transformer's 3D attention,
    ``tokens_per_frame``, ``video_start`` and ``video_tokens`` say which tokens belong to which (latent) frame; the band
    then acts on frame distance, and tokens outside the video span (text) get no bias (:mod:`vstar_kernels.contract`).

    Args:
        q: (batch, Lq, heads, head_dim), any strides (e.g. a view of diffusers' ``to_q`` output).
        k: (batch, Lk, heads, head_dim); Lk may differ from Lq.
        v: (batch, Lk, heads, head_dim), like ``k``.
        sigma: width of the Gaussian band ΔA in frames (> 0, finite); required unless ``profile`` is given.
        strength: bias strength (finite, default 1.0); 0 gives plain softmax attention.
        mode: "relative" (VSTAR: bias scaled by the row max of the unbiased logits; the default) or "absolute".
        scale: logit scale, default ``head_dim ** -0.5``.
        q_offset: global index of the first query frame (chunked or distributed frames).
        k_offset: global index of the first key frame.
        backend: "auto", "triton", "extension" or "torch"; the environment variable ``VSTAR_KERNELS_BACKEND``
            overrides it.
        tokens_per_frame: consecutive video tokens per frame (a transformer's patches per latent frame), >= 1.
        video_start: index of the first token with a frame in q and in k (CogVideoX: its text length), >= 0.
        video_tokens: how many tokens from ``video_start`` have a frame; None: all the rest (HunyuanVideo, whose text
            follows the video, passes its video token count).
        q_token_offset: index of the call's first query token in the whole sequence the layout describes (a chunk
            of it, e.g. context parallelism's Ring; a chunk may begin inside a frame). Either token offset given
            (even 0) makes the call a chunk: the video span may reach past it.
        k_token_offset: index of the call's first key token in that sequence, as ``q_token_offset``.
        row_max: relative mode only: (batch, Lq, heads) row maxima of the unbiased logits that replace this call's
            own (the max over every key chunk of a row, :func:`tar_row_max`); any float dtype, any strides.
        return_lse: also return the rows' log-sum-exp of the biased logits (natural log), for an exact merge of key
            chunks (:func:`merge_partials`).
        k_lengths: (batch,) integer tensor on q's device: batch element b attends to its first ``k_lengths[b]`` keys
            only (varlen keys: a key-padding mask that keeps a prefix, e.g. HunyuanVideo's padded text after its
            video). The keys past it get no weight, stay out of the relative row max and get zero gradients. Each
            length in [1, Lk]; checked before any launch (in a compiled call by an assert in the graph: no host
            sync, so HunyuanVideo's masked calls trace).
        profile: a :class:`~vstar_kernels.FrameProfile` instead of ``sigma``/``strength``/``mode`` (giving both
            raises): per-distance bias and positive-logit scale tables, a window with sink frames, a Gaussian band,
            or a sum of them (:mod:`vstar_kernels.profiles` states the formula). Its tables have one row or one per
            head of this call. A row whose every key the profile masks (a chunk of keys outside its window) returns
            zeros, and lse -inf. A profile holding only a Gaussian band runs exactly as ``sigma=`` does.

    Returns:
        (batch, Lq, heads, head_dim) in the input dtype, laid out so that ``.reshape(batch, Lq, heads * head_dim)``
        is a free view; with ``return_lse=True`` the pair ``(out, lse)``, lse (batch, Lq, heads) float32
        (float64 for float64 inputs, like :func:`tar_row_max`).
        Differentiable in q, k and v on every backend (``row_max`` and ``return_lse`` are forward-only); with no
        input requiring grad nothing is saved.

    Raises:
        TypeError / ValueError: bad arguments, before any launch, naming the argument.
        NotImplementedError: ``row_max`` or ``return_lse`` with an input that requires grad.
        RuntimeError: an explicitly requested backend cannot run these inputs (the message says why).
    """
    validate_tensors(q, k, v)
    params = make_params(q.shape[-1], sigma=sigma, strength=strength, mode=mode, scale=scale, q_offset=q_offset,
                         k_offset=k_offset, tokens_per_frame=tokens_per_frame, video_start=video_start,
                         video_tokens=video_tokens, q_token_offset=q_token_offset, k_token_offset=k_token_offset,
                         profile=profile)
    validate_layout(params, q.shape[1], k.shape[1])
    validate_profile(params, q)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")
    partial = row_max is not None or return_lse
    if row_max is not None:
        row_max = _checked_row_max(row_max, q, params)
    varlen = {} if k_lengths is None else {"k_lengths": _checked_k_lengths(k_lengths, q, k)}
    impl = select_backend(InputSpec.of(q, varlen=bool(varlen)), params, backend)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if partial:
            raise NotImplementedError("tar_attention: row_max= and return_lse=True are forward-only (the partial "
                                      "results of context parallelism's Ring inference); call without them, or "
                                      "under torch.no_grad()")
        return _TARAttentionFunction.apply(q, k, v, params, impl.NAME, varlen.get("k_lengths"))
    if q.numel() == 0:
        out = _empty_output(q, v)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (out, q.new_empty(q.shape[:3], dtype=lse_dtype)) if return_lse else out
    if not partial:
        return impl.forward(q, k, v, params, **varlen)  # inference: nothing saved, nothing recorded
    return impl.forward(q, k, v, params, row_max=row_max, return_lse=return_lse, **varlen)


def _checked_k_lengths(k_lengths: object, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``k_lengths`` validated against q and k ((batch,) integers in [1, Lk] on q's device), as a contiguous int64
    tensor. The range check syncs with the device in eager calls; a traced call asserts it in the graph instead."""
    if not isinstance(k_lengths, torch.Tensor):
        raise TypeError(f"k_lengths must be a torch.Tensor, got {type(k_lengths).__name__}")
    if k_lengths.dtype.is_floating_point or k_lengths.dtype.is_complex or k_lengths.dtype == torch.bool:
        raise TypeError(f"k_lengths must be an integer tensor, got {k_lengths.dtype}")
    if tuple(k_lengths.shape) != (q.shape[0],):
        raise ValueError(f"k_lengths must have shape (batch,) = ({q.shape[0]},), got {tuple(k_lengths.shape)}")
    if k_lengths.device != q.device:
        raise ValueError(f"mismatched device: q is on {q.device}, k_lengths is on {k_lengths.device}")
    lengths = k_lengths.detach().to(torch.int64).contiguous()
    if lengths.numel() == 0:
        return lengths
    in_range = ((lengths >= 1) & (lengths <= k.shape[1])).all()
    if torch.compiler.is_compiling():
        torch._assert_async(in_range, "tar_attention: every k_lengths value must be in [1, Lk]")
    elif not in_range:
        raise ValueError(f"every k_lengths value must be in [1, Lk = {k.shape[1]}] (a row needs a key to attend "
                         f"to), got {lengths.tolist()}")
    return lengths


def _checked_row_max(row_max: object, q: torch.Tensor, params: TARParams) -> torch.Tensor:
    """``row_max`` validated against q ((batch, Lq, heads), floating, on q's device), as float32 (float64 for float64
    inputs)."""
    if not params.relative:
        raise ValueError("row_max applies to mode='relative' only (the absolute bias has no row max)")
    if not isinstance(row_max, torch.Tensor):
        raise TypeError(f"row_max must be a torch.Tensor, got {type(row_max).__name__}")
    if tuple(row_max.shape) != tuple(q.shape[:3]):
        raise ValueError(f"row_max must have shape (batch, Lq, heads) = {tuple(q.shape[:3])}, got "
                         f"{tuple(row_max.shape)}")
    if not row_max.is_floating_point():
        raise TypeError(f"row_max must be a floating tensor, got {row_max.dtype}")
    if row_max.device != q.device:
        raise ValueError(f"mismatched device: q is on {q.device}, row_max is on {row_max.device}")
    row_max = row_max.detach()
    holds_nan = torch.isnan(row_max).any()
    if torch.compiler.is_compiling():  # no host sync in a traced call: the check runs in the graph
        torch._assert_async(~holds_nan, "tar_attention: row_max holds NaN (a row maximum must be a number or ±inf)")
    elif holds_nan:
        raise ValueError("row_max holds NaN: a row maximum must be a number or ±inf (tar_row_max of every key chunk, "
                         "merged with torch.maximum)")
    return row_max.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def tar_row_max(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, backend: str = "auto",
                profile: FrameProfile | None = None, q_offset: int = 0, k_offset: int = 0,
                tokens_per_frame: int = 1, video_start: int = 0, video_tokens: int | None = None,
                q_token_offset: int | None = None, k_token_offset: int | None = None) -> torch.Tensor:
    """max_j S_ij = max_j scale * <q_i, k_j> of the unbiased logits: (batch, Lq, heads) float32 (float64 for
    float64 inputs), the relative mode's row max over one key chunk (QKᵀ only, no bias, no softmax). The max of
    the chunks' results is the row's, which ``tar_attention(..., row_max=...)`` takes.

    With a ``profile`` that masks pairs (a window, ``-inf`` bias entries) the max runs over the keys it keeps, as
    the relative band's does; the token layout arguments then say where q and k lie (those of
    :func:`tar_attention`), and a row with no kept key in this chunk gets -inf. Without one they are not read.

    Runs on the backend ``tar_attention`` would choose when it has a row-max kernel (``row_max`` in its module),
    else memory-bounded torch (float32 logits a query chunk at a time). Differentiable like ``amax`` (the gradient
    goes to the tied argmax keys, evenly).
    """
    validate_tensors(q, k, k)
    params = make_params(q.shape[-1], scale=scale, q_offset=q_offset, k_offset=k_offset,
                         tokens_per_frame=tokens_per_frame, video_start=video_start, video_tokens=video_tokens,
                         q_token_offset=q_token_offset, k_token_offset=k_token_offset,
                         **({"sigma": 1.0} if profile is None else {"profile": profile}))
    if params.profile is not None:
        validate_layout(params, q.shape[1], k.shape[1])
        validate_profile(params, q)
    impl = select_backend(q, params, backend)
    kernel = getattr(impl, "row_max", None)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if kernel is None or needs_grad or (params.profile is not None and params.profile.masks):
        return torch_tar.row_max(q, k, params)
    return kernel(q, k, params)


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact output over every key of partial results over key chunks: ``lse = logsumexp_c lse_c`` and
    ``out = sum_c exp(lse_c - lse) out_c`` (float32 math; float64 where an input is float64), for
    ``tar_attention(..., return_lse=True)`` outputs (batch, Lq, heads, dim) and lses (batch, Lq, heads) of the same
    queries. Returns (out in the outputs' dtype, lse)."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_partials needs one lse per output, got {len(outs)} outputs and {len(lses)} lses")
    compute = torch.float64 if any(t.dtype == torch.float64 for t in (*outs, *lses)) else torch.float32
    stacked = torch.stack([lse.to(compute) for lse in lses])
    lse = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - lse)[..., None]
    out = sum(w * o.to(compute) for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype), lse


def _empty_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype, device=q.device)


class _TARAttentionFunction(torch.autograd.Function):
    """Autograd around a backend: its forward, and its backward. Saved: q, k, v, plus what the backend's
    ``forward_with_residuals`` returns where it has one (Triton fp16/bf16: the output and two fp32 numbers per query
    row); the other backends' backwards recompute from q, k, v. Used only when an input requires grad.

    A plain backward runs the backend's fused backward. A backward with ``create_graph=True`` (grad mode on inside
    it) returns :func:`differentiable_grads` instead, whose own backward is exact on every backend, since no fused
    backward kernel is differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, params: TARParams, name: str, k_lengths: torch.Tensor | None = None):
        impl = BACKENDS[name]
        varlen = {} if k_lengths is None else {"k_lengths": k_lengths}
        forward_with_residuals = getattr(impl, "forward_with_residuals", None)
        if q.numel() == 0:  # an empty batch still joins the graph: its gradients are zeros
            out, residuals = _empty_output(q, v), ()
        elif forward_with_residuals is None:
            out, residuals = impl.forward(q, k, v, params, **varlen), ()
        else:
            out, residuals = forward_with_residuals(q, k, v, params, **varlen)
        ctx.save_for_backward(q, k, v, *residuals, *varlen.values())
        ctx.params, ctx.backend, ctx.varlen = params, name, bool(varlen)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *residuals = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        varlen = {"k_lengths": residuals.pop()} if ctx.varlen else {}
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            dq, dk, dv = differentiable_grads(q, k, v, grad_out, ctx.params, needs, **varlen)
        elif q.numel() == 0:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            extra = {"residuals": tuple(residuals)} if residuals else {}
            dq, dk, dv = BACKENDS[ctx.backend].backward(q, k, v, grad_out, ctx.params, **extra, **varlen)
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None


def requested_backend(backend: str) -> str:
    """The backend name in force: ``VSTAR_KERNELS_BACKEND`` when set, else ``backend``; validated."""
    env = os.environ.get(BACKEND_ENV, "").strip()
    name, source = (env, f"environment variable {BACKEND_ENV}") if env else (backend, "backend")
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{source} must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


def why_not(name: str, spec: InputSpec | torch.Tensor, params: TARParams) -> str | None:
    """None when backend ``name`` can run inputs like ``spec`` (an InputSpec, or the query tensor), else the
    reason."""
    spec = spec if isinstance(spec, InputSpec) else InputSpec.of(spec)
    impl = BACKENDS[name]
    return impl.unavailable_reason(spec.device) or impl.unsupported_reason(spec, params)


def select_backend(q: InputSpec | torch.Tensor, params: TARParams, backend: str = "auto") -> Backend:
    """Resolve ``backend`` (or the environment override) to a backend that can run these inputs (the query
    tensor or its InputSpec); RuntimeError naming the reasons when none can."""
    spec = q if isinstance(q, InputSpec) else InputSpec.of(q)
    name = requested_backend(backend)
    if name != "auto":
        reason = why_not(name, spec, params)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run this call: {reason}")
        return BACKENDS[name]
    reasons = []
    for candidate in AUTO_ORDER.get(spec.device.type, DEFAULT_AUTO_ORDER):
        reason = why_not(candidate, spec, params)
        if reason is None:
            return BACKENDS[candidate]
        BACKENDS[candidate].note_fallback(reason)
        reasons.append(f"{candidate}: {reason}")
    raise RuntimeError("no backend can run this call: " + "; ".join(reasons))


def backend_for(device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str = "auto") -> str:
    """The name of the backend ``tar_attention`` runs for inputs on ``device`` of ``dtype`` and ``head_dim`` (with
    ``backend`` and the environment override as a call would have them). No tensor is built; the extension may be
    loaded (or built, on first use) to find out."""
    spec = InputSpec(torch.device(device), dtype, int(head_dim))
    return select_backend(spec, make_params(spec.head_dim, sigma=1.0), backend).NAME
