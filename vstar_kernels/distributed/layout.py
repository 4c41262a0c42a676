"""Layout switches of frame parallelism over torch.distributed (DESIGN.md §9), and the group they run on.

A rank holds a contiguous share of the frames for the spatial layers ("frame layout"). Around a temporal module one
all-to-all moves to "every frame, a contiguous share of the spatial positions" ("position layout") and one moves
back. Shares are as even as possible: the first ``n % world`` ranks hold one more (:func:`split_sizes`). Every
switch is a single ``torch.distributed.all_to_all`` (NCCL on GPUs, gloo on CPUs): nothing home-made on the wire.
"""

from __future__ import annotations

import atexit
import math
import os
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
    the backend for ``device`` and :func:`timeout`, and destroyed at exit), checked against ``device``. Clear
    errors, no collective."""
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
        atexit.register(_destroy_if_initialised)  # ours to close: a gloo group left open aborts at exit
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")
    resolved = group if group is not None else dist.group.WORLD
    rank_group = RankGroup(resolved, dist.get_rank(resolved), dist.get_world_size(resolved),
                           str(dist.get_backend(resolved)))
    rank_group.check_device(device)
    return rank_group


def _destroy_if_initialised() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _exchange(send: list[torch.Tensor], recv_shapes: list[tuple[int, ...]], like: torch.Tensor,
              rg: RankGroup) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Send ``send[r]`` to rank r and receive a ``recv_shapes[r]`` tensor from each: one ``all_to_all_single`` of
    flat buffers with split sizes (gloo's list all-to-all needs equal shapes; shares may be uneven). Returns the
    flat receive buffer and its parts, in rank order, as views of it."""
    flat_in = torch.cat([t.reshape(-1) for t in send])
    counts = [math.prod(shape) for shape in recv_shapes]
    flat_out = torch.empty(sum(counts), dtype=like.dtype, device=like.device)
    dist.all_to_all_single(flat_out, flat_in, output_split_sizes=counts,
                           input_split_sizes=[t.numel() for t in send], group=rg.group)
    del flat_in
    return flat_out, [part.view(shape) for part, shape in zip(flat_out.split(counts), recv_shapes, strict=True)]


def gather_frames(x: torch.Tensor, frame_sizes: list[int], dim: int, rg: RankGroup) -> torch.Tensor:
    """Every rank's share of frames along ``dim`` (this rank's is ``x``), concatenated in rank order on every
    rank (uneven shares allowed)."""
    shapes = [(*x.shape[:dim], size, *x.shape[dim + 1:]) for size in frame_sizes]
    return torch.cat(_exchange([x] * rg.world, shapes, x, rg)[1], dim=dim)


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
    """``t`` summed over the group (in place)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=rg.group)
    return t
