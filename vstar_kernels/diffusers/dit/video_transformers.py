"""The video diffusion transformers TAR supports, and where their 3D self-attention and frame geometry live.

A video transformer attends over one sequence of patch tokens in (latent frame, height, width) row-major order, with
text tokens joined before it (CogVideoX), after it (HunyuanVideo) or kept in separate cross-attention (Wan, LTX-Video).
TAR on such a model biases the *self*-attention logits by latent-frame distance: token t of the video part belongs
to latent frame ``t // tokens_per_frame``. Each :class:`VideoTransformerSpec` says, for one diffusers class, which
blocks hold that self-attention, where its text sits, and how a forward's arguments give the frame geometry after
patchify. Facts from diffusers 0.42 (the processors' own code is what runs; see :mod:`.processor`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ...video_families import FAMILIES, PIPELINE_TRANSFORMERS, family_of, transformers_of

TEXT_POSITIONS = ("none", "first", "last")  # where a spec may put text in the self-attention sequence


@dataclass(frozen=True)
class FrameGeometry:
    """The video tokens of one forward: ``frames`` latent frames (after temporal patchify) of ``tokens_per_frame``
    patch tokens each, row-major."""

    frames: int
    tokens_per_frame: int

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame


def _patched_grid(shape: Sequence[int], patch_t: int | None, patch_hw: int | Sequence[int]) -> FrameGeometry:
    """(frames, height, width) latent dims divided by the patch sizes (floor, as the patch embeddings do)."""
    frames, height, width = shape
    p_h, p_w = (patch_hw, patch_hw) if isinstance(patch_hw, int) else tuple(patch_hw)
    return FrameGeometry(frames // (patch_t or 1), (height // p_h) * (width // p_w))


def _wan_geometry(model: nn.Module, args: dict[str, object]) -> FrameGeometry:
    # hidden_states (batch, channels, frames, height, width); a Conv3d of patch_size (p_t, p_h, p_w), then flatten
    p_t, p_h, p_w = model.config.patch_size
    return _patched_grid(args["hidden_states"].shape[2:], p_t, (p_h, p_w))


def _cogvideox_geometry(model: nn.Module, args: dict[str, object]) -> FrameGeometry:
    # hidden_states (batch, frames, channels, height, width); CogVideoX 1.0 patches per frame, 1.5 by patch_size_t
    _, frames, _, height, width = args["hidden_states"].shape
    return _patched_grid((frames, height, width), model.config.patch_size_t, model.config.patch_size)


def _ltx_geometry(model: nn.Module, args: dict[str, object]) -> FrameGeometry:
    # hidden_states arrive packed (batch, tokens, channels); num_frames, height, width give the token grid (RoPE's)
    grid = [args.get(name) for name in ("num_frames", "height", "width")]
    if any(value is None for value in grid):
        raise ValueError("LTXVideoTransformer3DModel needs num_frames, height and width in its forward call to place "
                         "tokens in frames (the LTX pipelines pass them)")
    frames, height, width = (int(value) for value in grid)
    return FrameGeometry(frames, height * width)


def _hunyuan_geometry(model: nn.Module, args: dict[str, object]) -> FrameGeometry:
    # hidden_states (batch, channels, frames, height, width); a Conv3d of (patch_size_t, patch_size, patch_size)
    return _patched_grid(args["hidden_states"].shape[2:], model.config.patch_size_t, model.config.patch_size)


@dataclass(frozen=True)
class VideoTransformerSpec:
    """Where TAR goes in one diffusers video transformer class.

    ``block_lists``: the ModuleList attributes of its transformer blocks, in the order the forward runs them (block
    indices of ``apply_tar(blocks=...)`` count through them in that order); ``attention``: the attribute of each
    block's self-attention; ``text``: where text tokens sit in that attention's sequence ("none": not there);
    ``geometry``: the frame geometry from the forward's bound arguments.
    """

    class_name: str
    block_lists: tuple[str, ...]
    attention: str
    text: str
    geometry: Callable[[nn.Module, dict[str, object]], FrameGeometry]
    # each block's cross-attention to the text (None: the text is inside the self-attention) and the module path of
    # the model's text projection (raw text-encoder output -> the cross-attention's context), for per-frame prompts
    cross_attention: str | None = None
    text_projection: str | None = None
    # the model's _cp_plan splits the text with the video (LTX-Video): under Ring, TAR's patch gathers that text in
    # the cross-attention (dit.processor.ShardedTextCrossAttention)
    cp_plan_splits_text: bool = False

    def __post_init__(self) -> None:
        if self.text not in TEXT_POSITIONS:
            raise ValueError(f"{self.class_name}: text must be one of {TEXT_POSITIONS}, got {self.text!r}")

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame after the first (the model's released VAE: 4n+1 -> n+1)."""
        return FAMILIES[self.class_name].temporal_compression


SPECS: dict[str, VideoTransformerSpec] = {
    spec.class_name: spec
    for spec in (
        VideoTransformerSpec("WanTransformer3DModel", ("blocks",), "attn1", "none", _wan_geometry,
                             cross_attention="attn2", text_projection="condition_embedder.text_embedder"),
        VideoTransformerSpec("CogVideoXTransformer3DModel", ("transformer_blocks",), "attn1", "first",
                             _cogvideox_geometry),
        VideoTransformerSpec("LTXVideoTransformer3DModel", ("transformer_blocks",), "attn1", "none", _ltx_geometry,
                             cross_attention="attn2", text_projection="caption_projection", cp_plan_splits_text=True),
        VideoTransformerSpec("HunyuanVideoTransformer3DModel", ("transformer_blocks", "single_transformer_blocks"),
                             "attn", "last", _hunyuan_geometry),
    )
}
def spec_of(model: object) -> VideoTransformerSpec | None:
    """The spec of a supported video transformer (by class, subclasses included), else None."""
    family = family_of(model)
    return None if family is None else SPECS[family.class_name]


def video_transformers_of(model: object) -> dict[str, nn.Module]:
    """The supported video transformers of ``model``: {"": model} for a transformer itself, {"transformer": ...,
    "transformer_2": ...} for a pipeline; empty when there is none (a UNet, a UNet pipeline)."""
    return transformers_of(model)


def is_video_transformer_like(model: object) -> bool:
    """A transformer (or a pipeline holding one) of a class TAR does not know: used for a clear error."""
    return any(isinstance(getattr(model, name, None), nn.Module) for name in PIPELINE_TRANSFORMERS) or (
        isinstance(model, nn.Module) and "Transformer" in type(model).__name__)


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One block's self-attention: its module path, the block's index in forward order, and the module."""

    name: str
    block: int
    module: nn.Module


def find_self_attention(model: nn.Module, spec: VideoTransformerSpec) -> list[SelfAttentionLayer]:
    """Every block's self-attention module of ``model``, in forward order."""
    return _block_attention(model, spec, spec.attention)


def find_sharded_text_cross_attention(model: nn.Module, spec: VideoTransformerSpec) -> list[SelfAttentionLayer]:
    """Every block's cross-attention over text split with the video by the model's ``_cp_plan`` (none for most
    models), in forward order."""
    if not spec.cp_plan_splits_text or spec.cross_attention is None:
        return []
    return _block_attention(model, spec, spec.cross_attention)


def find_cross_attention(model: nn.Module, spec: VideoTransformerSpec) -> list[SelfAttentionLayer]:
    """Every block's cross-attention to the text, in forward order (empty when the text is inside the
    self-attention: CogVideoX, HunyuanVideo)."""
    return [] if spec.cross_attention is None else _block_attention(model, spec, spec.cross_attention)


def _block_attention(model: nn.Module, spec: VideoTransformerSpec, attribute: str) -> list[SelfAttentionLayer]:
    layers = []
    for list_name in spec.block_lists:
        for index, block in enumerate(getattr(model, list_name)):
            layers.append(SelfAttentionLayer(f"{list_name}.{index}.{attribute}", len(layers),
                                             getattr(block, attribute)))
    return layers


def select_blocks(layers: list[SelfAttentionLayer], blocks: object) -> list[SelfAttentionLayer]:
    """The layers of the chosen block indices (None: all). ValueError/TypeError, naming the range, for anything
    else than distinct integers in [-n, n)."""
    if blocks is None:
        return layers
    if isinstance(blocks, int | str) or not isinstance(blocks, Sequence | set | frozenset | range):
        raise TypeError(f"blocks must be a sequence of block indices or None, got {type(blocks).__name__}")
    count, chosen = len(layers), []
    for index in blocks:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"blocks must hold integer block indices, got {index!r}")
        if not -count <= index < count:
            raise ValueError(f"block index {index} is out of range: the model has {count} blocks (0..{count - 1})")
        chosen.append(index % count)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"blocks lists a block twice: {list(blocks)}")
    return [layers[i] for i in sorted(chosen)]


_SIGNATURES: dict[type, inspect.Signature] = {}  # forward signature per class (a plain dict: torch.compile traces it)


def cache_forward_signature(cls: type) -> inspect.Signature:
    """``cls.forward``'s signature, computed once (``apply_tar`` calls this, so a compiled first call finds it)."""
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def bind_forward(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, object]:
    """The forward call's arguments by name (a pre-hook sees them as given, positional or not)."""
    return dict(cache_forward_signature(type(model)).bind_partial(model, *args, **kwargs).arguments)


def temporal_compression(pipe: object) -> int | None:
    """Video frames per latent frame (after the first) of the video transformer in ``pipe`` (a pipeline or the
    transformer itself): the pipeline's VAE factor (Wan's ``vae_scale_factor_temporal``, LTX-Video's
    ``vae_temporal_compression_ratio``), else the model's released VAE's. None for a UNet (it conditions video
    frames)."""
    transformers = video_transformers_of(pipe)
    if not transformers:
        return None
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):
        value = getattr(pipe, name, None)
        if isinstance(value, int) and value >= 1:
            return value
    return spec_of(next(iter(transformers.values()))).temporal_compression
