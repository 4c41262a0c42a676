"""diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) as TAR
sees it: the config's meshes and shard rule as a :class:`~vstar_kernels.distributed.sequence_parallel.SequenceMesh`.

diffusers' hooks split the sequence before the blocks and gather it after them (the model's ``_cp_plan``); its
device mesh and process groups carry the traffic. A TAR processor whose attention receives a ``parallel_config``
runs :func:`~vstar_kernels.distributed.sequence_parallel.sequence_parallel_tar` on those groups instead of
diffusers' templated attention, because diffusers' ring loop never says which key chunk it is on and TAR's band
needs every chunk's global token positions. Outside TAR's step window the original attention (diffusers' own CP)
runs with the original arguments.

Also here: what a model needs beyond diffusers to run under its context parallelism, with or without TAR:
HunyuanVideo's plan (:func:`hunyuan_video_cp_plan`, installed by :func:`enable_context_parallelism` with the hook
that gives its token refiner the whole text mask), and :func:`gather_text` for a cross-attention whose text the
model's plan splits (LTX-Video's, see ``dit.processor.ShardedTextCrossAttention``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from ...distributed.layout import RankGroup, gather_frames
from ...distributed.sequence_parallel import SequenceMesh


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


def flat_group(cp: object) -> RankGroup:
    """The whole context-parallel mesh as one group, ranks in the order diffusers' hooks split the sequence."""
    mesh = cp._flattened_mesh
    group = mesh.get_group()
    return RankGroup(group, dist.get_rank(group), dist.get_world_size(group), str(dist.get_backend(group)))


def shard_sizes(local: int, rg: RankGroup, uneven: bool, device: torch.device) -> list[int]:
    """Every rank's share of a sequence split by diffusers' hooks, this rank's being ``local`` tokens: equal shares,
    or (the "anything" modes, uneven) every rank's count, all-gathered."""
    if not uneven:
        return [local] * rg.world
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(rg.world)]
    dist.all_gather(counts, torch.tensor([local], dtype=torch.int64, device=device), group=rg.group)
    return [int(count) for count in counts]


def gather_text(cp: object, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every rank's text keys and values ((batch, tokens, heads, dim), split over the mesh by the model's
    ``_cp_plan``) and its key mask (keys last), concatenated in rank order: the whole text on every rank.
    Differentiable (the adjoint sums every rank's gradient of a shard on its owner)."""
    rg = flat_group(cp)
    sizes = shard_sizes(key.shape[1], rg, bool(cp.ulysses_anything or cp.ring_anything), key.device)
    key, value = (gather_frames(t.contiguous(), sizes, 1, rg) for t in (key, value))
    if mask is not None:
        mask = gather_frames(mask.contiguous(), sizes, mask.dim() - 1, rg)
    return key, value, mask


# ------------------------------------------------------------------------------------------ HunyuanVideo's plan
HUNYUAN_VIDEO = "HunyuanVideoTransformer3DModel"
_MASK_HOOK = "vstar_kernels---context_embedder_mask"


def hunyuan_video_cp_plan() -> dict:
    """The context-parallel plan this package ships for ``HunyuanVideoTransformer3DModel`` (diffusers has none).

    Every rank holds a contiguous shard of the video tokens (``x_embedder``'s output) with their RoPE rows, and a
    contiguous shard of the refined text (``context_embedder``'s output), so its attention sequence is ``[video
    shard, text shard]``; ``proj_out`` gathers the video back. The text padding mask stays right because the
    forward builds each rank's key mask from the *rank's* share of ``encoder_attention_mask`` (split here): its
    valid text is a prefix of its text shard, as it is of the whole text. The token refiner needs the whole mask,
    which :func:`enable_context_parallelism` gathers back before it (without that hook the refiner's shapes
    disagree and it raises: never a wrong mask). Use it through :func:`enable_context_parallelism`.
    """
    return {
        "": {"encoder_attention_mask": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)},
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class GatherRefinerMask(ModelHook):
    """A diffusers hook on HunyuanVideo's token refiner (``context_embedder``): its ``attention_mask`` argument,
    split with the root's ``encoder_attention_mask`` by :func:`hunyuan_video_cp_plan`, gathered back whole over
    ``cp``'s mesh (the refiner attends over all the text and pools it)."""

    def __init__(self, cp: object) -> None:
        super().__init__()
        self.cp = cp

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = self._whole(kwargs["attention_mask"])
        elif len(args) > 2:
            args[2] = self._whole(args[2])
        return tuple(args), kwargs

    def _whole(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if self.cp.ulysses_anything or self.cp.ring_anything:
            return PartitionAnythingSharder.unshard_anything(mask, 1, self.cp._flattened_mesh)
        return EquipartitionSharder.unshard(mask, 1, self.cp._flattened_mesh)


def enable_context_parallelism(transformer: object, config: object) -> None:
    """``transformer.enable_parallelism(config=config)``, with this package's plan for a model diffusers ships none
    for (HunyuanVideo: :func:`hunyuan_video_cp_plan` and the hook that gathers the token refiner's mask). Any
    order with ``apply_tar``. ``config``: a ``ContextParallelConfig`` or a ``ParallelConfig`` holding one."""
    name = type(transformer).__name__
    if not any(cls.__name__ == HUNYUAN_VIDEO for cls in type(transformer).__mro__):
        transformer.enable_parallelism(config=config)
        return
    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError(f"{name} with image_condition_type='token_replace' (HunyuanVideo I2V) treats the "
                                  "first frame's tokens apart by position, which a split sequence does not keep: "
                                  "this package's context-parallel plan covers the text-to-video model")
    transformer.enable_parallelism(config=config, cp_plan=hunyuan_video_cp_plan())
    cp = transformer._parallel_config.context_parallel_config
    registry = HookRegistry.check_if_exists_or_initialize(transformer.context_embedder)
    registry.register_hook(GatherRefinerMask(cp), _MASK_HOOK)
