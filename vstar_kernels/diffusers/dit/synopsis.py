"""Video synopsis prompting on video transformers whose text enters through cross-attention (Wan, LTX-Video).

A video transformer's patch tokens are frame-major: token t of the video belongs to latent frame
``t // tokens_per_frame``. With a synopsis, the queries of latent frame f attend to the text of frame f. That is a
reshape of each block's cross-attention into per-frame groups (batch·frames groups of ``tokens_per_frame`` queries,
each with its own text context), never a mask over frames x text: :class:`DiTSynopsisProcessor` calls the model's own
processor once on the regrouped queries, so its projections, QK norms and image branch run exactly as written.

The per-frame embeddings are what a pipeline passes as ``encoder_hidden_states`` (the raw text-encoder output, one
row per latent frame); each call projects them through the model's own text projection (Wan's
``condition_embedder.text_embedder``, LTX-Video's ``caption_projection``), as it projects a single prompt. Context
tokens before the text (Wan I2V's CLIP image tokens) stay shared by every frame.

Which call is conditional: the pipelines call the transformer with the positive prompt's embeddings (Wan: a separate
call per CFG branch; LTX-Video: [negative, positive] in one batch). A batch row whose ``encoder_hidden_states``
equals the synopsis' first row (the first state, as ``pipe(states[0], ...)`` encodes it), bit for bit after the cast
to the call's dtype, and whose text mask (LTX-Video) equals the first row's, is conditioned per frame; any other row
(a negative prompt, the empty default) runs unchanged. Each frame's text is masked by the synopsis' own per-frame
mask (``frame_attention_mask``, what :func:`~vstar_kernels.diffusers.synopsis_prompt_embeds` returns for LTX-Video);
a synopsis without one keeps, in every frame's text, the tokens the call's ``encoder_attention_mask`` keeps for that
row (LTXPipeline always masks its padding), so a synopsis whose every frame is the prompt gives the unpatched model.

Under diffusers' context parallelism a rank's cross-attention holds its shard of the video tokens, which may begin
and end inside a frame: the shard is grouped by the tokens' global latent frames (partial frames at the ends are
groups of their own), and the per-frame calls run the original processor's code locally (its parallel config
dropped: each group's text is whole on every rank).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ...call_state import Scoped
from ..shared.components import (
    SYNOPSIS_STATE_ATTR,
    TAR_STATE_ATTR,
    WrappedSettings,
    prepare_checkpoints,
    set_processor_tracked,
    wrapped_processor,
)
from .context_parallel import context_parallel_config, sequence_mesh
from .model_patch import TransformerPatch, attach_patch, attached_handle, detach_patch
from .processor import route_of
from .video_transformers import (
    FrameGeometry,
    VideoTransformerSpec,
    bind_forward,
    find_cross_attention,
    spec_of,
)

_LTX_MASK_BIAS = -10000.0  # LTX-Video's forward turns its 0/1 text mask into this additive bias (diffusers 0.42)


@dataclass(frozen=True)
class FrameContext:
    """One call's per-frame text: ``rows`` of the batch it conditions (eager) or, in a traced call, ``flags`` (batch,)
    bool saying which, the projected per-frame context (frames, tokens, dim), its additive key bias or None, and the
    call's frame geometry.

    ``bias`` is (1, frames, 1, tokens) from the synopsis' own per-frame text mask, or (batch, 1, 1, tokens) from the
    call's ``encoder_attention_mask`` when the synopsis has none (each frame's text then keeps the tokens the call
    keeps for that row, as the model does for its one prompt)."""

    rows: tuple[int, ...] | None
    text: torch.Tensor
    bias: torch.Tensor | None
    geometry: FrameGeometry
    flags: torch.Tensor | None = None


class SynopsisState:
    """Shared by one transformer's synopsis processors: the per-frame embeddings and, per call and thread, the
    :class:`FrameContext` of the forward in progress (None: no row is conditional)."""

    def __init__(self, frame_embeds: torch.Tensor, frame_mask: torch.Tensor | None) -> None:
        self.frame_embeds = frame_embeds
        self.frame_mask = frame_mask
        self._call: Scoped[FrameContext] = Scoped("synopsis call")

    @property
    def call(self) -> FrameContext | None:
        return self._call.get()

    @call.setter
    def call(self, value: FrameContext | None) -> None:
        self._call.put(value)

    def __deepcopy__(self, memo: dict) -> SynopsisState:
        return SynopsisState(copy.deepcopy(self.frame_embeds, memo), copy.deepcopy(self.frame_mask, memo))

    def __getstate__(self) -> dict:
        return {"frame_embeds": self.frame_embeds, "frame_mask": self.frame_mask}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["frame_embeds"], state["frame_mask"])


def _text_projection(model: nn.Module, spec: VideoTransformerSpec) -> nn.Module:
    return model.get_submodule(spec.text_projection)


def _mask_bias(mask: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 text mask as LTX-Video's forward turns it into an additive key bias (the same numbers)."""
    return (1 - mask.to(device=device, dtype=dtype)) * _LTX_MASK_BIAS


def conditional_flags(context: torch.Tensor, mask: torch.Tensor | None, state: SynopsisState) -> torch.Tensor | None:
    """Which batch rows of a call's ``encoder_hidden_states`` (and text mask: a call without one keeps every token)
    are the synopsis' first state, bit for bit after the cast to the call's dtype: a (batch,) bool tensor (traced
    calls use it as it is, with no data-dependent Python branch); None when no row can be (another text shape)."""
    first = state.frame_embeds[0].to(device=context.device, dtype=context.dtype)
    if context.shape[1:] != first.shape:
        return None
    flags = (context == first).flatten(1).all(1)
    if state.frame_mask is not None:
        want = state.frame_mask[0].to(context.device)
        given = torch.ones_like(want).expand(context.shape[0], -1) if mask is None else mask.to(want.device,
                                                                                                   want.dtype)
        flags = flags & (given == want).all(1)
    return flags


def conditional_rows(context: torch.Tensor, mask: torch.Tensor | None, state: SynopsisState) -> tuple[int, ...]:
    """:func:`conditional_flags` as the indices of the conditional rows (eager calls)."""
    flags = conditional_flags(context, mask, state)
    return () if flags is None else tuple(flags.nonzero().flatten().tolist())


class SynopsisGate:
    """The transformer's forward pre-hook: finds the call's conditional rows and, when there are any, projects the
    per-frame embeddings through the model's text projection for this call (its weights, device and dtype now).
    A call whose latent frame count is not the synopsis' row count raises a ValueError naming both, before
    anything runs."""

    def __init__(self, state: SynopsisState, spec: VideoTransformerSpec) -> None:
        self.state = state
        self.spec = spec

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prepare_checkpoints(module)  # a checkpointed block's recompute sees this call's text, not the last
        bound = bind_forward(module, args, kwargs)
        geometry = self.spec.geometry(module, bound)
        frames = self.state.frame_embeds.shape[0]
        if geometry.frames != frames:
            raise ValueError(f"the synopsis has {frames} per-frame embeddings (latent frames) but this call has "
                             f"{geometry.frames} latent frames: build it for this video length and apply_synopsis "
                             "again")
        context = bound.get("encoder_hidden_states")
        mask = bound.get("encoder_attention_mask")
        flags = None
        if torch.compiler.is_compiling():  # both branches traced, one runs (torch.cond in the processors)
            flags = None if context is None else conditional_flags(context, mask, self.state)
            rows = None if flags is None else ()
        else:
            rows = () if context is None else conditional_rows(context, mask, self.state)
        if rows is None or (flags is None and not rows):
            self.state.call = None
            return
        embeds = self.state.frame_embeds.to(device=context.device, dtype=context.dtype)
        text = _text_projection(module, self.spec)(embeds)
        bias = None
        if self.state.frame_mask is not None:
            bias = _mask_bias(self.state.frame_mask, context.device, text.dtype)[None, :, None]
        elif mask is not None:  # the call masks its text (LTXPipeline's padding): every frame's text keeps those
            bias = _mask_bias(mask, context.device, text.dtype)[:, None, None]
        self.state.call = FrameContext(rows if flags is None else None, text, bias, geometry, flags)

    def __deepcopy__(self, memo: dict) -> SynopsisGate:
        return SynopsisGate(copy.deepcopy(self.state, memo), self.spec)


class DiTSynopsisProcessor(WrappedSettings):
    """A video transformer's cross-attention with per-frame text: the wrapped processor (``inner``) runs on the
    conditional rows regrouped per latent frame, and unchanged on every other row. A plain object, picklable."""

    _WRAPPED = "inner"

    def __init__(self, inner: object, state: SynopsisState) -> None:
        self.inner = inner
        self.state = state
        # the route _local runs under context parallelism, built now, never inside a traced call; a processor TAR
        # cannot route is fine in one process, and under context parallelism _local raises its TypeError
        with contextlib.suppress(TypeError):
            route_of(type(self._innermost()), _without_parallel_config)

    def _innermost(self) -> object:
        innermost = self.inner
        while (below := wrapped_processor(innermost)) is not None:
            innermost = below
        return innermost

    def _run(self, attn, hidden_states, context, mask, rotary):
        call = self.state.call
        if call is None or context is None:
            return self.inner(attn, hidden_states, context, mask, rotary)
        if call.flags is not None:
            return self._traced(attn, hidden_states, context, mask, rotary, call)
        rows = list(call.rows)
        per_frame = self._per_frame(attn, hidden_states[rows], context[rows], call, rotary, rows)
        if len(rows) == hidden_states.shape[0]:
            return per_frame
        # a batch of both kinds (LTX-Video's [negative, positive]): the original call on the whole batch, as
        # without a synopsis (so the other rows are bit-identical to it), the conditional rows then replaced
        out = self.inner(attn, hidden_states, context, mask, rotary).clone()
        out[rows] = per_frame.to(out.dtype)
        return out

    def _traced(self, attn, hidden_states, context, mask, rotary, call: FrameContext):
        """The traced form (torch.compile), as eager computes it: every row marked by ``call.flags`` per frame, none
        marked the original alone, a mix the original on the whole batch with the marked rows replaced
        (``torch.cond``: no graph break, no recompile between the conditional and the unconditional call). Outputs
        are flattened through the cond, as :func:`~vstar_kernels.diffusers.shared.step_window.cond_on_flag` does."""
        flags = call.flags

        def plain(hidden_states, context):
            return self.inner(attn, hidden_states, context, mask, rotary)

        def every(hidden_states, context):
            return self._per_frame(attn, hidden_states, context, call, rotary).reshape(-1)

        def mixed(hidden_states, context):
            out = plain(hidden_states, context)
            per_frame = self._per_frame(attn, hidden_states, context, call, rotary).to(out.dtype)
            return torch.where(flags[:, None, None], per_frame, out).reshape(-1)

        def some(hidden_states, context):
            return torch.cond(flags.all(), every, mixed, (hidden_states, context))

        out = torch.cond(flags.any(), some, lambda hidden_states, context: plain(hidden_states, context).reshape(-1),
                         (hidden_states, context))
        return out.view(*hidden_states.shape[:2], -1)

    def _per_frame(self, attn, hidden_states, context, call: FrameContext, rotary, rows: list[int] | None = None):
        """The rows' video tokens (``rows`` of the call's batch; None: all of it) regrouped by latent frame, each
        group attending to its frame's text. Under
        diffusers' context parallelism the rows hold this rank's shard of the video, which may begin and end
        inside a frame: the partial frames at either end are groups of their own, and the original attention runs
        without the parallel config (every group's text is whole here)."""
        row_bias = call.bias
        if row_bias is not None and row_bias.shape[0] > 1 and rows is not None:  # the call's own mask, per row
            row_bias = row_bias[rows]
        rows, tokens, width = hidden_states.shape
        frames, per_frame = call.geometry.frames, call.geometry.tokens_per_frame
        start, attend = 0, self.inner
        cp = context_parallel_config(self._parallel_config)
        if cp is not None:
            mesh = sequence_mesh(cp, call.geometry.video_tokens)
            start, attend = sum(mesh.shard_sizes()[:mesh.flat_rank]), self._local
        if (cp is None and tokens != frames * per_frame) or start + tokens > frames * per_frame:
            raise ValueError(f"the synopsis expects {frames} latent frames x {per_frame} tokens = "
                             f"{frames * per_frame} video tokens in the cross-attention, got {tokens}"
                             + (f" from token {start}" if start else ""))
        shared = context.shape[1] - call.text.shape[1]  # context tokens before the text (Wan I2V's image tokens)
        if cp is not None and shared < 0:  # LTX-Video's plan splits the text: this rank's share of it, no more
            shared = 0
        if shared < 0:
            raise ValueError(f"the call's context has {context.shape[1]} tokens, fewer than the synopsis' "
                             f"{call.text.shape[1]} text tokens")

        def groups(first: int, count: int, queries: torch.Tensor) -> torch.Tensor:
            """Frames first .. first + count - 1, ``queries`` (rows·count, tokens, width) in frame order."""
            text = call.text[first:first + count].unsqueeze(0).expand(rows, -1, -1, -1)
            if shared:
                image = context[:, :shared].unsqueeze(1).expand(-1, count, -1, -1)
                text = torch.cat([image, text.to(image.dtype)], dim=2)
            bias = None
            if row_bias is not None:
                bias = row_bias if row_bias.shape[1] == 1 else row_bias[:, first:first + count]
                bias = bias.expand(rows, count, -1, -1).reshape(rows * count, *bias.shape[2:])
            return attend(attn, queries, text.reshape(rows * count, *text.shape[2:]), bias, rotary)

        head = min(tokens, -start % per_frame)  # the end of a frame the shard begins inside
        whole = (tokens - head) // per_frame
        tail = tokens - head - whole * per_frame
        first = start // per_frame + (1 if head else 0)
        pieces = []
        if head:
            pieces.append(groups(first - 1, 1, hidden_states[:, :head]))
        if whole:
            body = hidden_states[:, head:head + whole * per_frame].reshape(rows * whole, per_frame, width)
            out = groups(first, whole, body)
            pieces.append(out.reshape(rows, whole * per_frame, *out.shape[2:]))
        if tail:
            pieces.append(groups(first + whole, 1, hidden_states[:, tokens - tail:]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _local(self, attn, hidden_states, context, mask, rotary):
        """The original processor's code (the innermost of the wrapped chain) with its attention run locally,
        whatever parallel config it holds."""
        innermost = self._innermost()
        route = route_of(type(innermost), _without_parallel_config)
        return route.call(innermost, attn, hidden_states, context, mask, rotary)


def _local_dispatch(original, *args, **kwargs):
    return original(*args, **{**kwargs, "parallel_config": None})


def _without_parallel_config(original):
    """A route's redirect: ``dispatch_attention_fn`` without its parallel config."""
    return functools.partial(_local_dispatch, original)


class WanSynopsisProcessor(DiTSynopsisProcessor):
    """Per-frame text for ``WanTransformer3DModel``'s ``attn2`` (``WanAttnProcessor``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class LTXVideoSynopsisProcessor(DiTSynopsisProcessor):
    """Per-frame text for ``LTXVideoTransformer3DModel``'s ``attn2`` (``LTXVideoAttnProcessor``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


PROCESSORS: dict[str, type[DiTSynopsisProcessor]] = {
    "WanTransformer3DModel": WanSynopsisProcessor,
    "LTXVideoTransformer3DModel": LTXVideoSynopsisProcessor,
}


@dataclass
class DiTSynopsisHandle:
    """What ``apply_synopsis`` patched on a video transformer (or a pipeline's transformers): ``layers``, the
    cross-attention module paths (prefixed by the pipeline attribute, e.g. ``transformer_2.blocks.3.attn2``), and
    the per-frame embeddings (latent frames, tokens, text_dim) with their text mask (LTX-Video) or None."""

    layers: list[str]
    frame_embeds: torch.Tensor
    frame_mask: torch.Tensor | None = None
    _patches: dict[str, TransformerPatch] = field(default_factory=dict, repr=False)


def check_frame_inputs(frame_embeds: torch.Tensor, frame_mask: torch.Tensor | None) -> None:
    """ValueError/TypeError for per-frame embeddings that are not (frames, tokens, dim) floats, or a text mask that
    is not (frames, tokens)."""
    if not isinstance(frame_embeds, torch.Tensor) or frame_embeds.dim() != 3:
        raise ValueError("frame_embeds must be a (latent frames, tokens, text_dim) tensor: the text-encoder output "
                         "a pipeline passes as encoder_hidden_states, one row per latent frame")
    if not frame_embeds.is_floating_point():
        raise TypeError(f"frame_embeds must be floating point, got {frame_embeds.dtype}")
    if frame_mask is not None and (not isinstance(frame_mask, torch.Tensor) or
                                   tuple(frame_mask.shape) != tuple(frame_embeds.shape[:2])):
        shape = tuple(frame_mask.shape) if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
        raise ValueError(f"frame_attention_mask must be (frames, tokens) = {tuple(frame_embeds.shape[:2])}, got "
                         f"{shape}")


def apply_transformer_synopsis(transformers: dict[str, nn.Module], frame_embeds: torch.Tensor,
                               frame_mask: torch.Tensor | None) -> DiTSynopsisHandle:
    """Patch per-frame text into each transformer of ``transformers`` (pipeline attribute -> model). Checks
    everything before changing anything; applying again replaces the previous synopsis."""
    check_frame_inputs(frame_embeds, frame_mask)
    plans = {}
    for prefix, transformer in transformers.items():
        spec = spec_of(transformer)
        layers = find_cross_attention(transformer, spec)
        if not layers or spec.class_name not in PROCESSORS:
            raise NotImplementedError(
                f"{spec.class_name} attends to its text inside the self-attention (joint attention), not through a "
                "cross-attention: per-frame prompts would need a text segment per frame in one sequence, which "
                "changes what every video token attends to; synopsis prompting supports Wan and LTX-Video")
        expected = getattr(_text_projection(transformer, spec), "linear_1", None)
        if expected is not None and frame_embeds.shape[-1] != expected.in_features:
            raise ValueError(f"frame_embeds have {frame_embeds.shape[-1]} channels, {spec.class_name}'s text "
                             f"projection takes {expected.in_features} (the text encoder's output)")
        if frame_mask is not None and spec.class_name != "LTXVideoTransformer3DModel":
            raise ValueError(f"frame_attention_mask applies to LTX-Video's masked text; {spec.class_name} takes "
                             "none (Wan pads its text with zeros)")
        plans[prefix] = (transformer, spec, layers)
    handle = DiTSynopsisHandle(layers=[], frame_embeds=frame_embeds, frame_mask=frame_mask)
    for prefix, (transformer, spec, layers) in plans.items():
        remove_transformer_synopsis(transformer)
        state = SynopsisState(frame_embeds, frame_mask)
        patch = TransformerPatch({}, {}, SynopsisGate(state, spec))
        for layer in layers:
            installed = PROCESSORS[spec.class_name](layer.module.processor, state)
            handle.layers.append(f"{prefix}.{layer.name}" if prefix else layer.name)
            set_processor_tracked(layer.module, installed, layer.name, patch.originals, patch.installed)
        attach_patch(transformer, SYNOPSIS_STATE_ATTR, handle, prefix, patch)
    return handle


def remove_transformer_synopsis(transformer: nn.Module) -> bool:
    """Restore the cross-attention processors and remove the hook of the synopsis on ``transformer``; False if
    none. A processor that another patch wrapped since (TAR's, for instance) keeps its wrapper, around the
    original. TAR still applied keeps the checkpoint wrapper."""
    return detach_patch(transformer, SYNOPSIS_STATE_ATTR, TAR_STATE_ATTR)


def transformer_synopsis_state(transformer: nn.Module) -> DiTSynopsisHandle | None:
    """The :class:`DiTSynopsisHandle` of the synopsis on ``transformer``, or None."""
    return attached_handle(transformer, SYNOPSIS_STATE_ATTR)
