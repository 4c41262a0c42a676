"""TAR attention over a sequence split across ranks: Ulysses (heads), Ring (key chunks) and both composed.

The sequence of one attention call (a video transformer's patch tokens, text included where the model puts it) is
split into contiguous shards over the ranks of a context-parallel mesh, shard ``r`` on flat rank ``r`` (the first
``n % P`` one token larger when the split is uneven, as ``torch.tensor_split`` does: :func:`split_sizes`). The
layout of the whole sequence (:mod:`vstar_kernels.contract`: tokens per frame, where the video tokens are) decides
every bias, so each rank must know where its tokens sit in it: that is all this module adds to the usual schemes.

- **Ulysses** (a group of U ranks holding consecutive shards): one all-to-all gives each rank every token of the
  group's shards for its share of the heads (:func:`ulysses_to_heads`), TAR runs on that span exactly as in one
  process (its first token's index is the ``q_token_offset``/``k_token_offset`` of the call), and the inverse
  all-to-all returns the output to the token layout (:func:`ulysses_to_tokens`). Both are differentiable (the
  adjoint of a permutation is its inverse), so training works.
- **Ring** (R ranks, each holding one span of queries and visiting every span of keys): every pairing gets the
  band of its *global* token positions through token-granular offsets. The relative mode's row max runs over every
  key of the row: a first ring pass rotates K alone and takes the max of :func:`~vstar_kernels.ops.tar_row_max`
  over the chunks, then the second rotates K and V and merges each chunk's partial output through its log-sum-exp
  (exact). Each step's transfer (``batch_isend_irecv`` to the next rank, from the previous) is posted before the
  step's compute, so it overlaps it, and waited even when that compute raises (no transfer is left in flight); a
  rank holds two key chunks at a time, never the whole sequence.
  The ring loop is inference-only; with gradients the keys and values are all-gathered instead (differentiable:
  the adjoint sums every rank's gradient of a shard on its owner) and one op call per rank covers the whole key
  row, the memory diffusers' own ring needs (its ``rotate_method`` is "allgather").
- **Both** (R x U): Ulysses inside each ring group's consecutive shards, then the ring over the groups' spans.
- **Video, then text** (HunyuanVideo): each rank holds ``[video shard, text shard]`` (:func:`two_segment_tar`).
  Ulysses as above; under Ring the keys are all-gathered, put in sequence order, and the queries' two parts (each
  one span of the sequence) take one op call each.

Every check runs before the first collective and depends only on what every rank shares (the config, the global
layout, the shapes), so a bad call raises the same error on every rank instead of hanging the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..backends.profile_tables import spans_interact
from ..contract import TARParams, make_params, validate_profile
from ..ops import select_backend, tar_attention, tar_row_max
from .layout import RankGroup, _exchange, gather_frames, split_sizes


@dataclass(frozen=True)
class SequenceMesh:
    """How one attention call's sequence of ``tokens`` lies over a context-parallel mesh of ``ring.world x
    ulysses.world`` ranks (either may be a group of one, or None for one): flat rank ``ring.rank * U +
    ulysses.rank`` holds shard ``flat rank`` of :func:`shard_sizes`. ``uneven``: shards may differ by one token
    (diffusers' "anything" modes), else they must be equal."""

    tokens: int
    ring: RankGroup | None
    ulysses: RankGroup | None
    uneven: bool = False

    @property
    def ring_world(self) -> int:
        return 1 if self.ring is None else self.ring.world

    @property
    def ulysses_world(self) -> int:
        return 1 if self.ulysses is None else self.ulysses.world

    @property
    def flat_rank(self) -> int:
        return (0 if self.ring is None else self.ring.rank) * self.ulysses_world + (
            0 if self.ulysses is None else self.ulysses.rank)

    def shard_sizes(self) -> list[int]:
        """Tokens of each flat rank's shard, in rank order."""
        return split_sizes(self.tokens, self.ring_world * self.ulysses_world)

    def span_sizes(self) -> list[int]:
        """Tokens of each ring rank's span (its Ulysses group's shards together), in ring order."""
        shards, width = self.shard_sizes(), self.ulysses_world
        return [sum(shards[g * width:(g + 1) * width]) for g in range(self.ring_world)]

    def span_start(self, ring_rank: int) -> int:
        return sum(self.span_sizes()[:ring_rank])


def check_call(mesh: SequenceMesh, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               tar: dict | None = None) -> None:
    """ValueError, before any collective, when the local q/k/v cannot be this rank's shard of ``mesh`` or the heads
    cannot split over the Ulysses ranks; with ``tar`` (the op's keyword arguments) also the op's own checks of its
    scalars and of the backend (RuntimeError when the requested backend cannot run these inputs)."""
    if tar is not None:
        _check_op(q, tar)
    ranks = mesh.ring_world * mesh.ulysses_world
    if mesh.tokens < ranks:
        raise ValueError(f"context parallelism over {ranks} ranks needs at least {ranks} tokens, the sequence has "
                         f"{mesh.tokens}")
    if not mesh.uneven and mesh.tokens % ranks:
        raise ValueError(f"the sequence's {mesh.tokens} tokens do not split evenly over {ranks} ranks (use "
                         "ulysses_anything / ring_anything for uneven shards)")
    expected = mesh.shard_sizes()[mesh.flat_rank]
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.shape[1] != expected:
            raise ValueError(f"rank {mesh.flat_rank} holds {t.shape[1]} {name} tokens, its shard of the "
                             f"{mesh.tokens}-token sequence over {ranks} ranks has {expected}")
    _check_heads(mesh, q.shape[2])
    _check_devices(mesh, q.device)


def _check_heads(mesh: SequenceMesh, heads: int) -> None:
    width = mesh.ulysses_world
    if width > 1 and (heads < width or (not mesh.uneven and heads % width)):
        raise ValueError(f"{heads} attention heads do not split over {width} Ulysses ranks"
                         + ("" if mesh.uneven else " evenly (ulysses_anything allows uneven shares)"))


def _check_op(q: torch.Tensor, tar: dict) -> None:
    """The op's own checks of its scalars and of the backend, for ``tar`` (its keyword arguments; a profile's tables
    for the call's heads, before Ulysses splits them)."""
    params = _params(q, tar)
    validate_profile(params, q)
    select_backend(q, params, tar.get("backend", "auto"))


def _params(q: torch.Tensor, tar: dict, **chunk: int) -> TARParams:
    """The op's parameters of a call with ``tar`` (its keyword arguments) and the token offsets ``chunk``."""
    return make_params(q.shape[-1], **{name: value for name, value in tar.items() if name != "backend"}, **chunk)


def _relative_band(tar: dict) -> bool:
    """Whether the call's band is relative (its row max over every key chunk is needed): from sigma/strength/mode,
    or from the profile's band."""
    profile = tar.get("profile")
    if profile is not None:
        return profile.has_band and profile.mode == "relative" and profile.strength != 0.0
    return tar.get("mode", "relative") == "relative" and tar.get("strength", 1.0) != 0.0


def _row_max_kwargs(tar: dict) -> dict:
    """What :func:`~vstar_kernels.ops.tar_row_max` takes of ``tar``: the scale and backend, and with a profile that
    masks, the profile and the layout (the row max runs over the kept keys)."""
    kw = {"scale": tar.get("scale"), "backend": tar.get("backend", "auto")}
    profile = tar.get("profile")
    if profile is not None and profile.masks:
        layout = ("q_offset", "k_offset", "tokens_per_frame", "video_start", "video_tokens")
        kw.update(profile=profile, **{name: tar[name] for name in layout if name in tar})
    return kw


def _heads_share(tar: dict, heads: list[int], rank: int) -> dict:
    """``tar`` for this Ulysses rank's share of the heads (``heads``: every rank's share): a per-head profile's
    tables sliced to it."""
    profile = tar.get("profile")
    if profile is None or profile.heads == 1:
        return tar
    start = sum(heads[:rank])
    return {**tar, "profile": profile.select_heads(start, start + heads[rank])}


def _check_devices(mesh: SequenceMesh, device: torch.device) -> None:
    for group in (mesh.ring, mesh.ulysses):
        if group is not None:
            group.check_device(device)


# ------------------------------------------------------------------------------------------------------ Ulysses
def ulysses_to_heads(x: torch.Tensor, shard_sizes: list[int], rg: RankGroup) -> torch.Tensor:
    """(..., batch, shard_r, heads, dim) on each rank of ``rg`` -> (..., batch, sum(shard_sizes), heads_r, dim):
    every token of the group's shards (in rank order), this rank's share of the heads (:func:`split_sizes`). One
    all-to-all; differentiable."""
    seq, head_axis = x.dim() - 3, x.dim() - 2
    heads = split_sizes(x.shape[head_axis], rg.world)
    starts = [sum(heads[:r]) for r in range(rg.world)]
    send = [x.narrow(head_axis, s, n) for s, n in zip(starts, heads, strict=True)]
    base = list(x.shape)
    base[head_axis] = heads[rg.rank]
    shapes = []
    for size in shard_sizes:
        shape = list(base)
        shape[seq] = size
        shapes.append(tuple(shape))
    return torch.cat(_exchange(send, shapes, x, rg)[1], dim=seq)


def ulysses_to_tokens(x: torch.Tensor, shard_sizes: list[int], heads: int, rg: RankGroup) -> torch.Tensor:
    """The inverse of :func:`ulysses_to_heads`: (batch, sum(shard_sizes), heads_r, dim) -> (batch, shard_r, heads,
    dim) of ``heads`` in all."""
    starts = [sum(shard_sizes[:r]) for r in range(rg.world)]
    send = [x.narrow(1, s, n) for s, n in zip(starts, shard_sizes, strict=True)]
    shares = split_sizes(heads, rg.world)
    shapes = [(x.shape[0], shard_sizes[rg.rank], share, x.shape[3]) for share in shares]
    return torch.cat(_exchange(send, shapes, x, rg)[1], dim=2)


# --------------------------------------------------------------------------------------------------------- Ring
class _RingPeers:
    """This rank's neighbours in the ring: chunks travel to the next rank and arrive from the previous one.

    A context manager: every transfer :meth:`rotate` posts is waited, by the step that uses it or, when the loop
    stops between posting and waiting (an exception in the step's compute), on leaving the ``with`` block. A posted
    isend/irecv that nobody waits leaves the process group with a transfer in flight on a buffer Python may free,
    and the peer's matching transfer unfinished: a rank hangs or aborts later (at exit, when the group is torn
    down). The exception that stopped the loop is the one raised; a wait that fails while draining does not hide
    it."""

    def __init__(self, rg: RankGroup) -> None:
        self.group = rg.group
        self.next = dist.get_global_rank(rg.group, (rg.rank + 1) % rg.world)
        self.prev = dist.get_global_rank(rg.group, (rg.rank - 1) % rg.world)
        self._pending: list = []  # posted requests not yet waited, in posting order

    def __enter__(self) -> _RingPeers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.drain(raising=exc is None)

    @property
    def pending(self) -> int:
        """How many posted transfers (sends and receives) are not yet waited."""
        return len(self._pending)

    def rotate(self, send: torch.Tensor, recv_shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        """Post the transfer of ``send`` to the next rank and of a ``recv_shape`` tensor from the previous one;
        returns the wait that gives the received tensor."""
        recv = send.new_empty(recv_shape)
        requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group),
                                           dist.P2POp(dist.irecv, recv, self.prev, self.group)])
        self._pending.extend(requests)

        def wait() -> torch.Tensor:
            for request in requests:
                self._wait(request)
            return recv

        return wait

    def _wait(self, request) -> None:
        if any(request is held for held in self._pending):
            self._pending = [held for held in self._pending if held is not request]
            request.wait()

    def drain(self, raising: bool = True) -> None:
        """Wait every posted transfer not yet waited. ``raising=False`` (an exception is already on its way): a
        failing wait is swallowed, the rest are still waited."""
        while self._pending:
            request = self._pending.pop(0)
            try:
                request.wait()
            except Exception:
                if raising:
                    raise


def ring_row_max(q: torch.Tensor, k: torch.Tensor, span_sizes: list[int], rg: RankGroup, *,
                 tar: dict) -> torch.Tensor:
    """max_j S_ij over the keys of every rank's span (over the kept keys, with a profile that masks): K rotates once
    round the ring (QKᵀ only); a span the profile masks for every query of this rank's span is not computed.
    (batch, Lq, heads) float32."""
    starts = [sum(span_sizes[:r]) for r in range(rg.world)]
    chunk, best = k.contiguous(), None
    kw = _row_max_kwargs(tar)
    with _RingPeers(rg) as peers:
        for step in range(rg.world):
            owner = (rg.rank - step) % rg.world
            wait = None
            if step < rg.world - 1:  # the chunk after this one: held by rank - step - 1
                size = span_sizes[(rg.rank - step - 1) % rg.world]
                wait = peers.rotate(chunk, (chunk.shape[0], size, *chunk.shape[2:]))
            offsets = {"q_token_offset": starts[rg.rank], "k_token_offset": starts[owner]}
            if spans_interact(_params(q, tar, **offsets), q.shape[1], chunk.shape[1]):
                part = tar_row_max(q, chunk, **kw, **(offsets if "profile" in kw else {}))
                best = part if best is None else torch.maximum(best, part)
            if wait is not None:
                chunk = wait()
    return best


def ring_tar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span_sizes: list[int], rg: RankGroup,
                       tar: dict) -> torch.Tensor:
    """TAR attention of this rank's query span against every rank's key/value span (inference): the spans' global
    token positions bias every pairing, the relative row max runs over all (kept) keys (:func:`ring_row_max`), and
    the partials merge through their log-sum-exp in float32. A key span that a frame-distance profile masks for
    every query of this span (a window) still travels round the ring but is not computed. ``tar``: the op's keyword
    arguments for the whole sequence (sigma, strength, mode or profile, scale, layout, backend)."""
    starts = [sum(span_sizes[:r]) for r in range(rg.world)]
    row_max = ring_row_max(q, k, span_sizes, rg, tar=tar) if _relative_band(tar) else None
    pair, out, lse = torch.stack([k, v]), None, None
    with _RingPeers(rg) as peers:
        for step in range(rg.world):
            owner = (rg.rank - step) % rg.world
            wait = None
            if step < rg.world - 1:
                size = span_sizes[(rg.rank - step - 1) % rg.world]
                wait = peers.rotate(pair, (2, pair.shape[1], size, *pair.shape[3:]))
            offsets = {"q_token_offset": starts[rg.rank], "k_token_offset": starts[owner]}
            if spans_interact(_params(q, tar, **offsets), q.shape[1], pair.shape[2]):
                part, part_lse = tar_attention(q, pair[0], pair[1], row_max=row_max, return_lse=True, **offsets,
                                               **tar)
                if out is None:
                    out, lse = part.to(torch.float32), part_lse
                else:
                    merged = torch.logaddexp(lse, part_lse)
                    out = out * torch.exp(lse - merged)[..., None] + part.to(torch.float32) * torch.exp(
                        part_lse - merged)[..., None]
                    lse = merged
            if wait is not None:
                pair = wait()
    return out.to(q.dtype)


def gathered_tar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span_sizes: list[int], rg: RankGroup,
                           tar: dict) -> torch.Tensor:
    """The Ring's differentiable form: every rank's key/value span all-gathered (the adjoint returns each span's
    gradient, summed over the ranks, to its owner), then one op call for this rank's queries."""
    keys = gather_frames(k, span_sizes, 1, rg)
    values = gather_frames(v, span_sizes, 1, rg)
    start = sum(span_sizes[:rg.rank])
    return tar_attention(q, keys, values, q_token_offset=start, k_token_offset=0, **tar)


# ----------------------------------------------------------------------------------------------------- composed
def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sequence_parallel_tar(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: SequenceMesh,
                          tar: dict) -> torch.Tensor:
    """TAR attention of this rank's shard ((batch, shard, heads, dim) q, k, v) of a sequence laid out as ``mesh``
    says; the output is this rank's shard of the output over the whole sequence (the same numbers one process gives
    for these tokens). ``tar``: the op's keyword arguments for the whole sequence."""
    check_call(mesh, q, k, v, tar)
    heads = q.shape[2]
    shards = mesh.shard_sizes()
    if mesh.ulysses is not None and mesh.ulysses.world > 1:
        group_shards = shards[(mesh.flat_rank - mesh.ulysses.rank):][:mesh.ulysses.world]
        if q.shape == k.shape == v.shape:  # self-attention: one all-to-all for the three
            q, k, v = ulysses_to_heads(torch.stack([q, k, v]), group_shards, mesh.ulysses).unbind(0)
        else:
            q, k, v = (ulysses_to_heads(t, group_shards, mesh.ulysses) for t in (q, k, v))
        tar = _heads_share(tar, split_sizes(heads, mesh.ulysses.world), mesh.ulysses.rank)
    else:
        group_shards = None
    if mesh.ring is not None and mesh.ring.world > 1:
        spans = mesh.span_sizes()
        attend = gathered_tar_attention if needs_grad(q, k, v) else ring_tar_attention
        out = attend(q, k, v, spans, mesh.ring, tar)
    else:
        start = mesh.span_start(0 if mesh.ring is None else mesh.ring.rank)
        out = tar_attention(q, k, v, q_token_offset=start, k_token_offset=start, **tar)
    if group_shards is not None:
        out = ulysses_to_tokens(out, group_shards, heads, mesh.ulysses)
    return out


# ------------------------------------------------------------------------------------------ video, then text
@dataclass(frozen=True)
class TwoSegmentShards:
    """A sequence of ``video`` tokens then ``text`` tokens (HunyuanVideo's attention) whose two segments are each
    split over the flat ranks of ``mesh``: flat rank ``f`` holds ``[video shard f, text shard f]``. ``video`` and
    ``text``: every flat rank's share of each, in rank order."""

    mesh: SequenceMesh
    video: list[int]
    text: list[int]

    def local(self, rank: int) -> int:
        return self.video[rank] + self.text[rank]


def _reorder(x: torch.Tensor, pieces: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` along dim 1 is ``[video_i, text_i]`` for each (video_i, text_i) of ``pieces``; returns (every video
    part, every text part), each concatenated in order (dim 1)."""
    videos, texts, at = [], [], 0
    for video, text in pieces:
        videos.append(x.narrow(1, at, video))
        texts.append(x.narrow(1, at + video, text))
        at += video + text
    return torch.cat(videos, dim=1), torch.cat(texts, dim=1)


def two_segment_tar(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                    shards: TwoSegmentShards, tar: dict) -> torch.Tensor:
    """TAR attention of this rank's ``[video shard, text shard]`` ((batch, tokens, heads, dim) q, k, v) of a
    video-then-text sequence (:class:`TwoSegmentShards`), text unbiased; ``keep`` ((batch, this rank's tokens)
    bool) masks keys: every video token kept, a prefix of the text (HunyuanVideo's padding; None: all kept). The
    output is this rank's shard, the numbers one process gives for the whole sequence.

    Ulysses gives each rank the whole of its group's shards for a share of the heads; under Ring the keys and
    values of every group are all-gathered (the memory of diffusers' ``rotate_method="allgather"``: the two
    segments' chunks are not one span of the sequence, so the ring loop of :func:`ring_tar_attention` does not
    apply). The keys are put in sequence order (all video, then all text); the queries' video and text parts are
    each one span of it, so two op calls with token offsets cover them. Differentiable throughout."""
    mesh = shards.mesh
    video_total = sum(shards.video)
    f = mesh.flat_rank
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.shape[1] != shards.local(f):
            raise ValueError(f"rank {f} holds {t.shape[1]} {name} tokens, its video and text shards have "
                             f"{shards.video[f]} + {shards.text[f]}")
    heads, width = q.shape[2], mesh.ulysses_world
    _check_heads(mesh, heads)
    _check_op(q, tar)
    _check_devices(mesh, q.device)
    group = _ulysses_ranks(mesh)
    local = [shards.local(r) for r in range(mesh.ring_world * width)]
    if width > 1:
        q, k, v = ulysses_to_heads(torch.stack([q, k, v]), [local[r] for r in group], mesh.ulysses).unbind(0)
        tar = _heads_share(tar, split_sizes(heads, width), mesh.ulysses.rank)
    key_ranks = group
    if mesh.ring_world > 1:
        k, v = (gather_frames(t.contiguous(), _ring_spans(local, mesh), 1, mesh.ring) for t in (k, v))
        key_ranks = list(range(len(local)))
    key_pieces = [(shards.video[r], shards.text[r]) for r in key_ranks]
    keys = torch.cat(_reorder(k, key_pieces), dim=1)
    values = torch.cat(_reorder(v, key_pieces), dim=1)
    q_video, q_text = _reorder(q, [(shards.video[r], shards.text[r]) for r in group])
    video_start, text_start = sum(shards.video[:group[0]]), sum(shards.text[:group[0]])
    lengths = None if keep is None else _kept_lengths(keep, shards, mesh)
    outs = []
    for part, offset in ((q_video, video_start), (q_text, video_total + text_start)):
        outs.append(_attend_kept(part, keys, values, lengths, offset, tar))
    out_video, out_text = outs
    pieces, at_v, at_t = [], 0, 0
    for r in group:
        pieces.append(out_video.narrow(1, at_v, shards.video[r]))
        pieces.append(out_text.narrow(1, at_t, shards.text[r]))
        at_v, at_t = at_v + shards.video[r], at_t + shards.text[r]
    out = torch.cat(pieces, dim=1)
    if width > 1:
        out = ulysses_to_tokens(out, [shards.local(r) for r in group], heads, mesh.ulysses)
    return out


def _ulysses_ranks(mesh: SequenceMesh) -> list[int]:
    """The flat ranks of this rank's Ulysses group, in order."""
    first = mesh.flat_rank - (0 if mesh.ulysses is None else mesh.ulysses.rank)
    return list(range(first, first + mesh.ulysses_world))


def _ring_spans(per_rank: list[int], mesh: SequenceMesh) -> list[int]:
    """Each ring rank's span: the sum of ``per_rank`` (flat-rank order) over its Ulysses group."""
    width = mesh.ulysses_world
    return [sum(per_rank[g * width:(g + 1) * width]) for g in range(mesh.ring_world)]


def _kept_lengths(keep: torch.Tensor, shards: TwoSegmentShards, mesh: SequenceMesh) -> list[int]:
    """The kept keys of each batch element over the whole sequence, from every rank's ``keep`` ((batch, this rank's
    tokens) bool over its ``[video shard, text shard]``, gathered in flat-rank order: within the Ulysses group,
    then over the ring). NotImplementedError, the same on every rank, unless every video token is kept and the
    kept text is a prefix of the text (padding last, as HunyuanVideo pads)."""
    keep = keep.to(torch.uint8).contiguous()
    local = [shards.local(r) for r in range(mesh.ring_world * mesh.ulysses_world)]
    key_ranks = _ulysses_ranks(mesh)
    if mesh.ulysses_world > 1:
        keep = gather_frames(keep, [local[r] for r in key_ranks], 1, mesh.ulysses)
    if mesh.ring_world > 1:
        keep = gather_frames(keep, _ring_spans(local, mesh), 1, mesh.ring)
        key_ranks = list(range(len(local)))
    video, text = (part.bool() for part in _reorder(keep, [(shards.video[r], shards.text[r]) for r in key_ranks]))
    counts = text.sum(-1)
    prefix = torch.arange(text.shape[1], device=text.device) < counts[:, None]
    if not (bool(video.all()) and torch.equal(prefix, text)):
        raise NotImplementedError("TAR under context parallelism supports key masks that keep every video token "
                                  "and a prefix of the text (padding last)")
    return [video.shape[1] + int(count) for count in counts.tolist()]


def _attend_kept(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | None, q_offset: int,
                 tar: dict) -> torch.Tensor:
    """The op on queries ``q`` (one span of the sequence from token ``q_offset``) against the whole sequence's keys,
    each batch element's keys cut to its kept ``lengths`` (None: all kept)."""
    if q.shape[1] == 0:
        return q.new_empty((*q.shape[:3], v.shape[-1]))
    kw = dict(q_token_offset=q_offset, k_token_offset=0, **tar)
    if lengths is None:
        return tar_attention(q, k, v, **kw)
    return tar_on_key_prefixes(q, k, v, lengths, kw)


def tar_on_key_prefixes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                        kw: dict) -> torch.Tensor:
    """The op (keyword arguments ``kw``) with batch element b's keys cut to its first ``lengths[b]``: exactly what
    a key-padding mask that keeps a prefix does (the relative row max runs over the kept keys). One call when the
    lengths agree, one per element otherwise."""
    if len(set(lengths)) == 1:
        return tar_attention(q, k[:, :lengths[0]], v[:, :lengths[0]], **kw)
    return torch.cat([tar_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], **kw)
                      for b, n in enumerate(lengths)])
