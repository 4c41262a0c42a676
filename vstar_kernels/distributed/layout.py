"""Layout switches of frame parallelism over torch.distributed (DESIGN.md §9), and the group they run on.

A rank holds a contiguous share of the frames for the spatial layers ("frame layout"). Around a temporal module one
all-to-all moves to "every frame, a contiguous share of the spatial positions" ("position layout") and one moves
back. Shares are as even as possible: the first ``n % world`` ranks hold one more (:func:`split_sizes`). Every
switch is a single ``torch.distributed.all_to_all`` (NCCL on GPUs, gloo on CPUs): nothing home-made on the wire.

Backward: every collective here is differentiable when autograd records (grad enabled and an input requires grad);
otherwise it runs exactly as without autograd. The adjoints, with each rank holding its share of one computation
whose parameters and inputs are replicated (the gradient a rank holds is its share's contribution; summed over the
ranks it is the whole computation's):

- an all-to-all's adjoint is the inverse all-to-all (the split sizes swapped): a layout switch is a permutation;
- :func:`gather_frames` (a share sent to every rank) sums, per share, the gradients every rank holds for it (a
  reduce-scatter, here the inverse all-to-all and a sum);
- :func:`all_reduce_sum`'s adjoint is an all-reduce of the gradient;
- :func:`enter_replicated` (identity) sums the gradients of replicated tensors (parameters, the call's inputs) over
  the ranks, so every rank gets the whole computation's gradient;
- :func:`gather_output` (the replicated result every rank returns) keeps this rank's share of the output gradient,
  with no communication: every rank holds the same loss of the same output, whose gradient counts once.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "VSTAR_KERNELS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def split_sizes(n: int, world: int) -> list[int]:
    """Contiguous shares of ``n`` items over ``world`` ranks, the first ``n % world`` one larger."""
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def timeout() -> timedelta:
    """The collectives' timeout: ``VSTAR_KERNELS_DIST_TIMEOUT_S`` seconds (a finite number > 0), default 300."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a finite number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class RankGroup:
    """A process group with this process's rank and the world size in it."""

    group: object
    rank: int
    world: int
    backend: str

    def check_device(self, device: torch.device) -> None:
        """ValueError, before any collective, when the backend cannot move tensors of ``device``."""
        if self.backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group's backend is nccl, which moves CUDA tensors; the model is on "
                             f"{device}. Use a gloo group for CPU models")
        if self.backend == "gloo" and device.type != "cpu":
            raise ValueError(f"the process group's backend is gloo, whose all-to-all moves CPU tensors; the model is "
                             f"on {device}. Use an nccl group for CUDA models")


def resolve_group(group: object | None, device: torch.device) -> RankGroup:
    """``group``, or the default process group (initialised from torchrun's environment when it is not yet, with
    the backend for ``device`` and :func:`timeout`, and closed at exit by :func:`close_process_group`), checked
    against ``device``. Clear errors, no collective."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if group is None and not dist.is_initialized():
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise RuntimeError("frame parallelism needs a process group: launch with torchrun (missing "
                               f"{', '.join(missing)}) or call torch.distributed.init_process_group first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout())
        atexit.register(_close_at_exit)  # ours to close: a gloo group left open may abort at exit
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")
    resolved = group if group is not None else dist.group.WORLD
    rank_group = RankGroup(resolved, dist.get_rank(resolved), dist.get_world_size(resolved),
                           str(dist.get_backend(resolved)))
    rank_group.check_device(device)
    return rank_group


def close_process_group(barrier: bool = True) -> list[str]:
    """Tear the default process group (and every group made from it) down so that no rank aborts at exit; returns
    a description of each group that is still alive afterwards (empty: the close is complete).

    ``destroy_process_group`` only drops torch's own references: a C++ ``ProcessGroupGloo`` (its sockets, its
    device thread) lives until the last reference to it goes, and a model's device mesh (diffusers'
    ``enable_parallelism``) or a :class:`RankGroup` keeps one. Left to interpreter shutdown, the group is freed
    after the peers have exited and closed their ends, with its threads still running while the process exits:
    the rank can die with SIGABRT although it did all its work. So, on every rank:

    1. ``barrier`` (the default): a barrier on the default group, so that no rank closes a socket while a peer is
       still moving data (skip it when a peer may be gone, e.g. while an exception takes this rank down);
    2. a garbage collection, so the groups held only by unreachable objects (models with hooks are cycles) go;
    3. ``destroy_process_group``; the groups nothing else holds are freed now, while every peer still holds its
       end of their connections; 4. another garbage collection.

    Call it once the models and meshes of the run are no longer referenced (after the function that used them
    has returned): a group still held then is reported, not freed. Nothing to do (an empty list) when no process
    group is initialised."""
    if not dist.is_initialized():
        return []
    world = getattr(dist.distributed_c10d, "_world", None)  # every group torch knows of (private: else the default)
    named = dict(getattr(world, "pg_names", None) or {dist.group.WORLD: "default"})
    groups = [(weakref.ref(pg), f"{name!r} ({dist.get_backend(pg)}, {pg.size()} ranks)") for pg, name in named.items()]
    del world, named
    try:
        if barrier:
            dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    return [name for ref, name in groups if ref() is not None]


def _close_at_exit() -> None:
    """atexit: :func:`close_process_group` of a group this package initialised and the program left open; no
    barrier when an uncaught exception ends the program (the peers may be waiting on this rank elsewhere)."""
    if dist.is_initialized():
        close_process_group(barrier=getattr(sys, "last_value", None) is None)


def _records(t: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``t`` (otherwise the plain collective runs)."""
    return torch.is_grad_enabled() and t.requires_grad


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat buffer with split sizes; its adjoint is the inverse exchange (the sizes
    swapped), itself differentiable."""

    @staticmethod
    def forward(ctx, flat_in: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        flat_out = flat_in.new_empty(sum(recv_counts))
        dist.all_to_all_single(flat_out, flat_in, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=group)
        return flat_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        send_counts, recv_counts = ctx.counts
        return _AllToAll.apply(grad_out.contiguous(), recv_counts, send_counts, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """In-place ``all_reduce`` (sum); its adjoint is the all-reduce of the gradient (every rank's sum used every
    rank's summand)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.mark_dirty(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _GatherOutput(torch.autograd.Function):
    """:func:`gather_frames` of the replicated output; adjoint: this rank's share of the output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, frame_sizes: list[int], dim: int, rg: RankGroup) -> torch.Tensor:
        ctx.share = (dim, sum(frame_sizes[:rg.rank]), frame_sizes[rg.rank])
        return gather_frames(x, frame_sizes, dim, rg)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dim, start, count = ctx.share
        return grad.narrow(dim, start, count), None, None, None


_BUCKET_ELEMENTS = 1 << 24  # gradients summed per all-reduce: 64 MiB of fp32 at most, beyond one larger tensor


class _SumGradients(torch.autograd.Function):
    """Identity on replicated tensors; the adjoint sums their gradients over the group, in buckets of one dtype.
    Which tensors got a gradient on some rank is agreed first (one small all-reduce): a tensor that no rank's share
    used keeps a None gradient, as in one process; one that only some ranks' shares used gets zeros from the others."""

    @staticmethod
    def forward(ctx, group, *tensors: torch.Tensor):
        ctx.group, ctx.device = group, tensors[0].device
        ctx.meta = [(t.shape, t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=ctx.device)
        dist.all_reduce(present, op=dist.ReduceOp.SUM, group=ctx.group)
        out: list[torch.Tensor | None] = [None] * len(grads)
        bucket: list[int] = []

        def flush() -> None:
            parts = [grads[i].reshape(-1) if grads[i] is not None
                     else torch.zeros(ctx.meta[i][0].numel(), dtype=ctx.meta[i][1], device=ctx.device)
                     for i in bucket]
            flat = torch.cat(parts)
            del parts
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
            for i, part in zip(bucket, flat.split([ctx.meta[i][0].numel() for i in bucket]), strict=True):
                out[i] = part.view(ctx.meta[i][0])
            bucket.clear()

        size = 0
        for i in (i for i, n in enumerate(present.tolist()) if n):
            numel = ctx.meta[i][0].numel()
            if bucket and (ctx.meta[i][1] != ctx.meta[bucket[0]][1] or size + numel > _BUCKET_ELEMENTS):
                flush()
                size = 0
            bucket.append(i)
            size += numel
        if bucket:
            flush()
        return (None, *out)


def _exchange(send: list[torch.Tensor], recv_shapes: list[tuple[int, ...]], like: torch.Tensor,
              rg: RankGroup) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Send ``send[r]`` to rank r and receive a ``recv_shapes[r]`` tensor from each: one ``all_to_all_single`` of
    flat buffers with split sizes (gloo's list all-to-all needs equal shapes; shares may be uneven). Returns the
    flat receive buffer and its parts, in rank order, as views of it."""
    flat_in = torch.cat([t.reshape(-1) for t in send])
    counts = [math.prod(shape) for shape in recv_shapes]
    if _records(flat_in):
        flat_out = _AllToAll.apply(flat_in, [t.numel() for t in send], counts, rg.group)
    else:
        flat_out = torch.empty(sum(counts), dtype=like.dtype, device=like.device)
        dist.all_to_all_single(flat_out, flat_in, output_split_sizes=counts,
                               input_split_sizes=[t.numel() for t in send], group=rg.group)
    del flat_in
    return flat_out, [part.view(shape) for part, shape in zip(flat_out.split(counts), recv_shapes, strict=True)]


def gather_frames(x: torch.Tensor, frame_sizes: list[int], dim: int, rg: RankGroup) -> torch.Tensor:
    """Every rank's share of frames along ``dim`` (this rank's is ``x``), concatenated in rank order on every
    rank (uneven shares allowed). Inside a computation (each rank goes on with its own part of the gathered
    frames); its adjoint sums every rank's gradient of this rank's share. For the replicated result returned to
    the caller use :func:`gather_output`."""
    shapes = [(*x.shape[:dim], size, *x.shape[dim + 1:]) for size in frame_sizes]
    return torch.cat(_exchange([x] * rg.world, shapes, x, rg)[1], dim=dim)


def gather_output(x: torch.Tensor, frame_sizes: list[int], dim: int, rg: RankGroup) -> torch.Tensor:
    """:func:`gather_frames` of the result every rank returns (and computes the same loss of): its adjoint is this
    rank's share of the output gradient (no communication), so the loss counts once, not once per rank."""
    if _records(x):
        return _GatherOutput.apply(x, frame_sizes, dim, rg)
    return gather_frames(x, frame_sizes, dim, rg)


def enter_replicated(tensors: list[torch.Tensor], rg: RankGroup) -> tuple[torch.Tensor, ...]:
    """Views of ``tensors``, which every rank holds the same copy of (parameters, a call's inputs), for this rank's
    share of a frame-parallel computation to use: identity forward; in backward their gradients (each rank's share's
    contribution) are summed over the group, so every rank gets the whole computation's gradient."""
    return _SumGradients.apply(rg.group, *tensors)


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _with(shape: tuple[int, ...], dim: int, size: int) -> tuple[int, ...]:
    return (*shape[:dim], size, *shape[dim + 1:])


def grid_to_positions(grid: torch.Tensor, pos_dim: int, frame_sizes: list[int], rg: RankGroup) -> torch.Tensor:
    """(batch, F_rank, ...) with the positions on ``pos_dim`` (2 or 3) -> (batch, F, ...) with this rank's share
    of the positions there: one all-to-all."""
    pos = split_sizes(grid.shape[pos_dim], rg.world)
    send = [grid.narrow(pos_dim, s, n) for s, n in zip(_starts(pos), pos, strict=True)]
    mine = _with(grid.shape, pos_dim, pos[rg.rank])
    flat, recv = _exchange(send, [_with(mine, 1, f) for f in frame_sizes], grid, rg)
    # one sample: the received shares already lie frame after frame (no copy); else they interleave per sample
    return flat.view(_with(mine, 1, sum(frame_sizes))) if grid.shape[0] == 1 else torch.cat(recv, dim=1)


def grid_to_frames(grid: torch.Tensor, pos_dim: int, positions: int, frame_sizes: list[int],
                   rg: RankGroup) -> torch.Tensor:
    """The inverse of :func:`grid_to_positions`: (batch, F, ...) with this rank's positions on ``pos_dim`` ->
    (batch, F_rank, ...) with all ``positions`` there."""
    send = [grid[:, s:s + n] for s, n in zip(_starts(frame_sizes), frame_sizes, strict=True)]
    here = _with(grid.shape, 1, frame_sizes[rg.rank])
    _flat, recv = _exchange(send, [_with(here, pos_dim, p) for p in split_sizes(positions, rg.world)], grid, rg)
    return torch.cat(recv, dim=pos_dim)


def frames_to_positions(x: torch.Tensor, frame_sizes: list[int], rg: RankGroup) -> torch.Tensor:
    """(batch·F_rank, C, H, W) of this rank's frames -> (batch·F, C, 1, P_rank): every frame, this rank's share
    of the H·W positions, laid out as a 1 x P_rank image (per-position modules see the same numbers)."""
    channels, height, width = x.shape[1:]
    batch = x.shape[0] // frame_sizes[rg.rank]
    grid = grid_to_positions(x.reshape(batch, -1, channels, height * width), 3, frame_sizes, rg)
    return grid.reshape(batch * sum(frame_sizes), channels, 1, grid.shape[-1])


def positions_to_frames(y: torch.Tensor, frame_sizes: list[int], height: int, width: int,
                        rg: RankGroup) -> torch.Tensor:
    """The inverse of :func:`frames_to_positions`: (batch·F, C, 1, P_rank) -> (batch·F_rank, C, H, W)."""
    batch, channels = y.shape[0] // sum(frame_sizes), y.shape[1]
    grid = grid_to_frames(y.reshape(batch, -1, channels, y.shape[-1]), 3, height * width, frame_sizes, rg)
    return grid.reshape(batch * frame_sizes[rg.rank], channels, height, width)


def all_reduce_sum(t: torch.Tensor, rg: RankGroup) -> torch.Tensor:
    """``t`` summed over the group (in place); differentiable (the adjoint all-reduces the gradient)."""
    if _records(t):
        return _AllReduceSum.apply(t, rg.group)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=rg.group)
    return t
