"""diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) as TAR
sees it: the config's meshes and shard rule as a :class:`~vstar_kernels.distributed.sequence_parallel.SequenceMesh`.

diffusers' hooks split the sequence before the blocks and gather it after them (the model's ``_cp_plan``); its
device mesh and process groups carry the traffic. A TAR processor whose attention receives a ``parallel_config``
runs :func:`~vstar_kernels.distributed.sequence_parallel.sequence_parallel_tar` on those groups instead of
diffusers' templated attention, because diffusers' ring loop never says which key chunk it is on and TAR's band
needs every chunk's global token positions. Outside TAR's step window the original attention (diffusers' own CP)
runs with the original arguments.
"""

from __future__ import annotations

import torch.distributed as dist

from ..distributed.layout import RankGroup
from ..distributed.sequence_parallel import SequenceMesh


def context_parallel_config(parallel_config: object) -> object | None:
    """The ``ContextParallelConfig`` in force in ``parallel_config`` (a diffusers ``ParallelConfig``), None when
    there is none or it spans one rank."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or (cp.ring_degree or 1) * (cp.ulysses_degree or 1) <= 1:
        return None
    if getattr(cp, "_flattened_mesh", None) is None:
        raise RuntimeError("the context-parallel config has no device mesh: it was not set up by the model's "
                           "enable_parallelism (a config of another model, or one built by hand)")
    return cp


def _group(mesh: object, rank: int, world: int) -> RankGroup | None:
    if world <= 1:
        return None
    group = mesh.get_group()
    return RankGroup(group, rank, world, str(dist.get_backend(group)))


def sequence_mesh(cp: object, tokens: int) -> SequenceMesh:
    """The :class:`SequenceMesh` of a ``tokens``-token sequence split by diffusers' hooks under ``cp``: shards in
    flat-mesh order ("ring" major, "ulysses" minor), as ``tensor_split`` cuts them in the "anything" modes (equal
    shards otherwise)."""
    return SequenceMesh(
        tokens=tokens,
        ring=_group(cp._ring_mesh, cp._ring_local_rank, cp.ring_degree),
        ulysses=_group(cp._ulysses_mesh, cp._ulysses_local_rank, cp.ulysses_degree),
        uneven=bool(cp.ulysses_anything or cp.ring_anything),
    )
