"""TAR processors for video transformers: the model's own processor, with its attention call routed to the op.

A video transformer's processor does much before attention (fused or separate projections, QK RMSNorm, RoPE on the
video part only, text concatenation) and all of it must stay exactly as the model's authors wrote it. So TAR does
not re-implement any processor: :class:`DiTTARProcessor` runs the *original* processor's ``__call__`` bytecode with
one change in its globals: the name it calls attention through (``dispatch_attention_fn`` for Wan, LTX-Video and
HunyuanVideo, ``F.scaled_dot_product_attention`` for CogVideoX) resolves to :meth:`DiTTARProcessor._dispatch` /
:meth:`DiTTARProcessor._sdpa`. Those call :func:`vstar_kernels.tar_attention` with the token layout of the current
forward (:class:`DiTState`, set by the transformer's pre-hook): ``tokens_per_frame`` patches per latent frame, text
tokens without a frame. With TAR off (outside the step window) they call the original attention function with the
original arguments, so those steps are bit-identical to diffusers.

The same routing serves :class:`ShardedTextCrossAttention`, which TAR puts beside it on LTX-Video's cross-attention
so that it runs under every context-parallel scheme TAR runs under.

One subclass per model only to expose that model's ``__call__`` parameters: diffusers' attention modules drop keyword
arguments a processor's signature does not name (``image_rotary_emb`` among them).
"""

from __future__ import annotations

import functools
import itertools
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...call_state import Scoped
from ...distributed.sequence_parallel import (
    TwoSegmentShards,
    sequence_parallel_tar,
    two_segment_tar,
)
from ...ops import tar_attention
from ...profiles import FrameProfile
from ...reference import key_prefix_mask
from ..shared.components import WrappedSettings
from ..shared.step_window import TARSwitch, by_step_window
from .context_parallel import context_parallel_config, flat_group, gather_text, sequence_mesh, shard_sizes
from .video_transformers import FrameGeometry

# The names a processor's code reaches attention through, and the attribute looked up on a global for the second.
DISPATCH_NAME = "dispatch_attention_fn"
SDPA_MODULE, SDPA_NAME = "F", "scaled_dot_product_attention"
_ROUTED_IDS = itertools.count()
_MODULE_IDENTITY = frozenset({"__name__", "__spec__", "__loader__", "__file__", "__cached__"})


class DiTState:
    """Shared by one transformer's TAR processors: the step-window switch and the frame geometry of the forward in
    progress, both per call (per thread, :mod:`vstar_kernels.call_state`). ``geometry`` is None before this thread's
    first forward (or the ``geometry`` given here)."""

    def __init__(self, switch: TARSwitch | None = None, geometry: FrameGeometry | None = None) -> None:
        self.switch = switch if switch is not None else TARSwitch()
        self._default_geometry = geometry
        self._geometry: Scoped[FrameGeometry] = Scoped("frame geometry")
        # record_temporal_attention's recorder while it runs (dit.attention_maps), called with each TAR processor's
        # q, k before it attends; None otherwise
        self.recorder: Callable | None = None

    @property
    def geometry(self) -> FrameGeometry | None:
        geometry = self._geometry.get()
        return self._default_geometry if geometry is None else geometry

    @geometry.setter
    def geometry(self, value: FrameGeometry | None) -> None:
        self._geometry.put(value)


def routed_names(processor: object) -> str:
    """Which attention call of ``processor``'s code TAR routes: DISPATCH_NAME or SDPA_NAME. TypeError when its
    ``__call__`` uses neither (a processor TAR cannot see into: nothing would be biased)."""
    return _routed_kind(type(processor))


def _routed_kind(processor_cls: type) -> str:
    fn = processor_cls.__call__
    names = set(getattr(fn, "__code__", types.SimpleNamespace(co_names=())).co_names)
    if DISPATCH_NAME in names and DISPATCH_NAME in fn.__globals__:
        return DISPATCH_NAME
    if SDPA_NAME in names and SDPA_MODULE in names and SDPA_MODULE in fn.__globals__:
        return SDPA_NAME
    raise TypeError(f"{processor_cls.__name__} computes attention neither through {DISPATCH_NAME} nor "
                    f"{SDPA_MODULE}.{SDPA_NAME}: TAR cannot route it (set the model's default processor first)")


@dataclass(frozen=True)
class Route:
    """A processor class's ``__call__`` with its attention routed to the TAR processor running it (``call``), the
    original attention function (``original``), and the name of the module holding the copy's globals."""

    call: types.FunctionType
    original: Callable
    module: str


_RUNNING: Scoped[RoutedProcessor] = Scoped("running routed processor")  # set by RoutedProcessor._run, per thread
_ROUTES: dict[tuple[type, Callable | None], Route] = {}


def _routed_dispatch(*args, **kwargs):
    """``dispatch_attention_fn`` inside a routed ``__call__``: the running TAR processor's."""
    return _RUNNING.get()._dispatch(*args, **kwargs)


def _routed_sdpa(*args, **kwargs):
    """``F.scaled_dot_product_attention`` inside a routed ``__call__``: the running TAR processor's."""
    return _RUNNING.get()._sdpa(*args, **kwargs)


def route_of(processor_cls: type, redirect: Callable[[Callable], Callable] | None = None) -> Route:
    """The :class:`Route` of ``processor_cls``, built on first use (at ``apply_tar``, outside any traced call: a
    module object cannot be built inside ``torch.compile``) and kept.

    The copy's globals are the original's, except the attention name: it resolves to a function that asks which TAR
    processor runs on this thread (:data:`_RUNNING`, set around the call). They live in a module of their own,
    registered under its own name: torch.compile keys the globals an inlined function reads by the module they name
    (importing it for guards), so sharing the original's name, spec or file would route the original's calls too.
    Relative imports inside the code resolve through ``__package__``, which stays.
    """
    route = _ROUTES.get((processor_cls, redirect))
    if route is not None:
        return route
    fn = processor_cls.__call__
    kind = _routed_kind(processor_cls)
    name = f"{fn.__globals__['__name__']}.vstar_tar_route_{processor_cls.__qualname__}_{next(_ROUTED_IDS)}"
    module = types.ModuleType(name)
    scope = module.__dict__
    scope.update({key: value for key, value in fn.__globals__.items() if key not in _MODULE_IDENTITY})
    if redirect is not None and kind != DISPATCH_NAME:
        raise TypeError(f"{processor_cls.__name__} computes attention with {SDPA_MODULE}.{SDPA_NAME}, not "
                        f"{DISPATCH_NAME}: it cannot be redirected")
    if kind == DISPATCH_NAME:
        original = scope[DISPATCH_NAME]
        scope[DISPATCH_NAME] = _routed_dispatch if redirect is None else redirect(original)
    else:
        functional = scope[SDPA_MODULE]
        original = getattr(functional, SDPA_NAME)
        proxy = types.ModuleType(functional.__name__)
        proxy.__dict__.update(vars(functional))
        setattr(proxy, SDPA_NAME, _routed_sdpa)
        scope[SDPA_MODULE] = proxy
    sys.modules[name] = module
    call = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    call.__kwdefaults__ = fn.__kwdefaults__
    route = _ROUTES[(processor_cls, redirect)] = Route(call, original, name)
    return route


class RoutedProcessor(WrappedSettings):
    """A diffusers processor whose original ``__call__`` runs with its attention call routed to this object's
    ``_dispatch`` / ``_sdpa`` (a plain object, not an nn.Module). ``original`` is the processor it replaces.
    Picklable and deep-copyable: the routed copy of the original ``__call__`` is one per processor class
    (:func:`route_of`), not per instance.

    ``_redirect`` (a class attribute): None routes the attention call to this processor's ``_dispatch`` /
    ``_sdpa`` (through :data:`_RUNNING`); a function of the original ``dispatch_attention_fn`` gives the function to
    call instead, for a processor with no state of its own to consult (its own route, so two kinds of processor on
    one model never share one traced function).
    """

    _redirect: Callable[[Callable], Callable] | None = None

    def __init__(self, original: object) -> None:
        self.original = original
        route_of(type(original), self._redirect)  # fail now, not at the first forward; outside any traced call

    def __repr__(self) -> str:
        return f"{type(self).__name__}(original={type(self.original).__name__})"

    def _run(self, attn, *args):
        """The original processor's ``__call__`` on ``attn`` and ``args``, its attention routed here."""
        if self._redirect is not None:  # its route calls the redirect directly: no per-thread state to write (a
            return self._route.call(self.original, attn, *args)  # side effect torch.cond would refuse)
        _RUNNING.put(self)  # written, never read back here: a traced read would guard on the last call's processor
        try:
            return self._route.call(self.original, attn, *args)
        finally:
            _RUNNING.put(None)

    @property
    def _route(self) -> Route:
        return route_of(type(self.original), self._redirect)


class DiTTARProcessor(RoutedProcessor):
    """A video transformer's self-attention processor with TAR.

    ``original`` is the processor it replaces; its code runs unchanged (see the module docstring). ``text`` says
    where text tokens sit in the attention sequence ("none", "first", "last").
    """

    def __init__(self, original: object, *, sigma: float | None, strength: float, mode: str, backend: str, text: str,
                 state: DiTState, profile: FrameProfile | None = None) -> None:
        self.sigma = sigma
        self.strength = strength
        self.mode = mode
        self.backend = backend
        self.text = text
        self.state = state
        self.profile = profile
        super().__init__(original)

    def __repr__(self) -> str:
        bias = (f"profile={self.profile!r}" if self.profile is not None
                else f"sigma={self.sigma}, strength={self.strength}, mode={self.mode!r}")
        return f"{type(self).__name__}({bias}, original={type(self.original).__name__})"

    def bias_kwargs(self) -> dict[str, object]:
        """The op's bias arguments: ``profile=`` when built with one (it holds its band), else the band's."""
        if self.profile is not None:
            return {"profile": self.profile}
        return {"sigma": self.sigma, "strength": self.strength, "mode": self.mode}

    # ------------------------------------------------------------------------------------------------ running
    def _dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, *args, **kwargs):
        """Stands in for ``dispatch_attention_fn``: (batch, tokens, heads, head_dim) in and out."""
        original = self._route.original

        def plain(q, k, v):
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *args, **kwargs)

        cp = context_parallel_config(kwargs.get("parallel_config"))
        if cp is not None:
            if getattr(self.state, "recorder", None) is not None:
                raise NotImplementedError("record_temporal_attention records one process's attention: run it "
                                          "without context parallelism")
            return self._attend(query, key, value, attn_mask, dropout_p, is_causal, scale, plain,
                                lambda q, k, v: self._with_tar_parallel(q, k, v, attn_mask, dropout_p, is_causal,
                                                                        scale, cp))
        return self._attend(query, key, value, attn_mask, dropout_p, is_causal, scale, plain)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        """Stands in for ``F.scaled_dot_product_attention``: (batch, heads, tokens, head_dim) in and out."""
        original = self._route.original
        if context_parallel_config(self._parallel_config) is not None:
            raise NotImplementedError(f"{type(self.original).__name__} computes attention with "
                                      "F.scaled_dot_product_attention, which diffusers' context parallelism does not "
                                      "route (each rank would attend within its own shard): TAR cannot run under it")

        def plain(q, k, v):
            return original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                            dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa).transpose(1, 2)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, dropout_p,
                           is_causal, scale, plain)
        return out.transpose(1, 2)

    def _attend(self, q, k, v, attn_mask, dropout_p, is_causal, scale, plain, tar=None):
        """TAR (``tar``, default :meth:`_with_tar`) or the original attention (``plain``) on (batch, tokens, heads,
        head_dim), as the step window says."""
        if tar is None:
            def tar(q, k, v):
                return self._with_tar(q, k, v, attn_mask, dropout_p, is_causal, scale)
        recorder = getattr(self.state, "recorder", None)  # (a state unpickled from before recorders existed: none)
        if recorder is not None:
            recorder(self, q, k, scale, attn_mask)
        return by_step_window(self.state.switch, tar, plain, q, k, v)

    def _op_kwargs(self, scale, len_q: int, len_k: int) -> dict:
        return dict(**self.bias_kwargs(), scale=scale, backend=self.backend,
                    **self.layout(len_q, len_k))

    def _with_tar(self, q, k, v, attn_mask, dropout_p, is_causal, scale):
        _check_plain_attention(dropout_p, is_causal)
        kw = self._op_kwargs(scale, q.shape[1], k.shape[1])
        if attn_mask is None:
            return tar_attention(q, k, v, **kw)
        return self._with_key_padding(q, k, v, attn_mask, kw)

    def _with_tar_parallel(self, q, k, v, attn_mask, dropout_p, is_causal, scale, cp):
        """TAR on this rank's shard of the sequence under diffusers' context parallelism ``cp``
        (:mod:`vstar_kernels.diffusers.dit.context_parallel`): every check before the first collective."""
        _check_plain_attention(dropout_p, is_causal)
        tokens = self._geometry().video_tokens
        mesh = sequence_mesh(cp, tokens)
        if self.text == "last":
            return self._with_tar_two_segments(q, k, v, attn_mask, scale, cp, mesh)
        if attn_mask is not None:
            raise NotImplementedError("TAR under context parallelism takes no attention mask over the video alone "
                                      "(the self-attention of Wan and LTX-Video has none)")
        if self.text != "none":
            raise NotImplementedError(f"TAR under context parallelism needs the video tokens alone or the text last "
                                      f"in the self-attention; this model's text sits {self.text} in it")
        return sequence_parallel_tar(q, k, v, mesh, self._op_kwargs(scale, tokens, tokens))

    def _with_tar_two_segments(self, q, k, v, attn_mask, scale, cp, mesh):
        """HunyuanVideo's ``[video shard, text shard]`` on each rank (:func:`hunyuan_video_cp_plan`), its key mask
        (the text padding) as a boolean (batch, 1, 1, tokens)."""
        video = mesh.shard_sizes()
        batch, local = q.shape[0], q.shape[1]
        text_local = local - video[mesh.flat_rank]
        if text_local < 0:
            raise ValueError(f"rank {mesh.flat_rank} holds {local} tokens, fewer than its {video[mesh.flat_rank]} "
                             "video tokens")
        keep = None if attn_mask is None else _key_mask(attn_mask, batch, local, " under context parallelism")
        text = shard_sizes(text_local, flat_group(cp), mesh.uneven, q.device)
        total = sum(video) + sum(text)
        return two_segment_tar(q, k, v, keep, TwoSegmentShards(mesh, video, text),
                               self._op_kwargs(scale, total, total))

    def layout(self, len_q: int, len_k: int) -> dict[str, int | None]:
        """The op's token layout for a self-attention call of ``len_q`` queries (the video tokens of the forward in
        progress plus text where this model puts it). ValueError when the tokens do not fit the geometry."""
        geometry = self._geometry()
        video = geometry.video_tokens
        if len_q != len_k or len_q < video or (self.text == "none" and len_q != video):
            raise ValueError(f"TAR expected self-attention over {video} video tokens ({geometry.frames} latent frames "
                             f"x {geometry.tokens_per_frame}){' plus text' if self.text != 'none' else ''}, got "
                             f"{len_q} queries and {len_k} keys")
        if self.text == "first":
            return dict(tokens_per_frame=geometry.tokens_per_frame, video_start=len_q - video, video_tokens=None)
        return dict(tokens_per_frame=geometry.tokens_per_frame, video_start=0, video_tokens=video)

    def _geometry(self) -> FrameGeometry:
        """The frame geometry of the forward in progress; RuntimeError outside one."""
        geometry = self.state.geometry
        if geometry is None:
            raise RuntimeError("TAR has no frame geometry: the attention ran outside the transformer's forward (its "
                               "pre-hook reads the geometry from the input shape)")
        return geometry

    def _with_key_padding(self, q, k, v, attn_mask: torch.Tensor, kw: dict) -> torch.Tensor:
        """A boolean key-padding mask that keeps a prefix of the keys per batch element (HunyuanVideo's padded text,
        which follows the video) is the op's varlen keys (``k_lengths``): the keys past each prefix get no weight and
        no part in the relative row max, exactly what the mask does. No host sync, so it traces under torch.compile
        (diffusers' HunyuanVideo builds this mask on every call). A mask that is not a prefix raises: before any
        launch in eager calls, by an assert in the graph in compiled ones. Any other mask raises."""
        len_k = k.shape[1]
        keep = _key_mask(attn_mask, k.shape[0], len_k)
        lengths = keep.sum(-1)
        is_prefix = (keep == key_prefix_mask(lengths, len_k)).all()
        message = "TAR supports key-padding masks that keep a prefix of the keys (padding last)"
        if torch.compiler.is_compiling():
            torch._assert_async(is_prefix, message)
        elif not is_prefix:
            raise NotImplementedError(message)
        return tar_attention(q, k, v, k_lengths=lengths, **kw)


def _key_mask(mask: torch.Tensor, batch: int, keys: int, where: str = "") -> torch.Tensor:
    """A boolean key-padding mask of shape (batch, 1, 1, keys) as (batch, keys); NotImplementedError for any other
    mask (``where`` qualifies what does not support it, e.g. " under context parallelism")."""
    if mask.dtype != torch.bool or mask.numel() != batch * keys or mask.shape[0] != batch:
        raise NotImplementedError(f"TAR{where} supports only boolean key-padding masks of shape (batch, 1, 1, keys), "
                                  f"got {mask.dtype} {tuple(mask.shape)}")
    return mask.reshape(batch, keys)


def _check_plain_attention(dropout_p: float, is_causal: bool) -> None:
    if dropout_p or is_causal:
        raise NotImplementedError(f"TAR attention has no dropout or causal mask (dropout_p={dropout_p}, "
                                  f"is_causal={is_causal})")


class WanTARProcessor(DiTTARProcessor):
    """TAR for ``WanTransformer3DModel``'s ``attn1`` (``WanAttnProcessor``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class CogVideoXTARProcessor(DiTTARProcessor):
    """TAR for ``CogVideoXTransformer3DModel``'s ``attn1`` (``CogVideoXAttnProcessor2_0``: text first)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class LTXVideoTARProcessor(DiTTARProcessor):
    """TAR for ``LTXVideoTransformer3DModel``'s ``attn1`` (``LTXVideoAttnProcessor``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class HunyuanVideoTARProcessor(DiTTARProcessor):
    """TAR for ``HunyuanVideoTransformer3DModel``'s double- and single-stream ``attn`` (text last)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class ShardedTextCrossAttention(RoutedProcessor):
    """LTX-Video's cross-attention (``attn2``, ``LTXVideoAttnProcessor``) where diffusers' context parallelism
    cannot run it.

    LTX-Video's ``_cp_plan`` splits the text over the ranks with the video, so diffusers runs its cross-attention
    context-parallel too. Under ``ring_degree > 1`` that is a ring, which needs a backend that returns the
    log-sum-exp (flash, sage, cuDNN): the backends TAR's self-attention runs on under Ring (this package's own)
    leave it without one. Under Ulysses with a text mask, diffusers' gathered mask keeps every head while the
    queries hold a share of them, and the attention fails. In those two cases this processor all-gathers the text's
    keys, values and mask over the context-parallel mesh instead (a few hundred tokens against the video's
    thousands) and runs the original attention function on the local queries: the same numbers, on any backend,
    and differentiable. Otherwise (one process; Ulysses without a mask) the original runs with the original
    arguments, so the output stays bit-identical to diffusers'. Installed on every block's ``attn2`` by
    ``apply_tar`` on an LTX-Video transformer, removed with TAR.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    _redirect = staticmethod(lambda original: functools.partial(sharded_text_dispatch, original))


def sharded_text_dispatch(original: Callable, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                          scale=None, enable_gqa=False, *args, **kwargs):
    """``dispatch_attention_fn`` (``original``) inside :class:`ShardedTextCrossAttention`'s routed code: the text
    gathered where diffusers' context parallelism cannot run the cross-attention, else the original call."""
    cp = context_parallel_config(kwargs.get("parallel_config"))
    if cp is None or (cp.ring_degree <= 1 and attn_mask is None):
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *args, **kwargs)
    key, value, attn_mask = gather_text(cp, key, value, attn_mask)
    return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *args,
                    **{**kwargs, "parallel_config": None})


PROCESSORS: dict[str, type[DiTTARProcessor]] = {
    "WanTransformer3DModel": WanTARProcessor,
    "CogVideoXTransformer3DModel": CogVideoXTARProcessor,
    "LTXVideoTransformer3DModel": LTXVideoTARProcessor,
    "HunyuanVideoTransformer3DModel": HunyuanVideoTARProcessor,
}
