"""Attention analysis of a video transformer: record, per self-attention layer, the average F x F map of how much
attention the tokens of each latent frame give to each latent frame (``record_temporal_attention``, the entry point,
comes here for a transformer or a pipeline holding one).

A row of the map is the attention mass a query token of that frame puts on the tokens of each key frame (summed over
the key frame's tokens; text keys are left out, so rows of models with text in the sequence sum to less than 1),
averaged over the heads, the batch and a sample of the frame's query tokens: ``positions`` consecutive tokens of each
frame (a random strip, redrawn per call), so memory stays ``positions x heads x tokens`` per frame however long the
video is. The maps are what each layer computes (:func:`vstar_kernels.tar_attention_probs` on the sample): with TAR
or a profile when it is on for that call, else plain softmax attention; the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ...reference import tar_attention_probs
from ..shared.attention_maps import TemporalAttentionMaps
from .patching import apply_transformer_tar, remove_transformer_tar, transformer_tar_state
from .processor import DiTTARProcessor
from .video_transformers import video_transformers_of

_NEVER = (-2.0, -1.0)  # a step window no timestep falls in: the layers run the model's own attention, bit for bit


class _FrameMapRecorder:
    """Called by each TAR processor of the recorded transformers (``DiTState.recorder``) with its q and k (batch,
    tokens, heads, head_dim): adds the frame map of a sample of query tokens to ``maps`` under the layer's name."""

    def __init__(self, maps: TemporalAttentionMaps, names: dict[int, str], positions: int,
                 generator: torch.Generator) -> None:
        self.maps, self.names, self.positions, self.generator = maps, names, positions, generator

    def __call__(self, processor: DiTTARProcessor, q: torch.Tensor, k: torch.Tensor, scale: float | None,
                 attn_mask: torch.Tensor | None) -> None:
        name = self.names.get(id(processor))
        if name is None:
            return
        with torch.no_grad():
            self.maps.add(name, self.frame_map(processor, q, k, scale, attn_mask)[None, None])

    def frame_map(self, processor: DiTTARProcessor, q, k, scale, attn_mask) -> torch.Tensor:
        geometry = processor.state.geometry
        layout = processor.layout(q.shape[1], k.shape[1])
        bias = processor.bias_kwargs() if processor.state.switch.active else {"sigma": 1.0, "strength": 0.0}
        frames, per_frame, start = geometry.frames, geometry.tokens_per_frame, layout["video_start"]
        count = min(self.positions, per_frame)
        rows = []
        for frame in range(frames):
            shift = int(torch.randint(per_frame - count + 1, (), generator=self.generator))
            first = start + frame * per_frame + shift
            mask = attn_mask
            if mask is not None and mask.dim() == 4 and mask.shape[-2] == q.shape[1]:
                mask = mask[..., first:first + count, :]
            probs = tar_attention_probs(q[:, first:first + count], k, scale=scale, attn_mask=mask,
                                        compute_dtype=torch.float32, q_token_offset=first, k_token_offset=0,
                                        **layout, **bias)
            video = probs[..., start:start + frames * per_frame]
            rows.append(video.reshape(*video.shape[:-1], frames, per_frame).sum(-1).mean(dim=(0, 1, 2)))
        return torch.stack(rows)


@contextlib.contextmanager
def record_transformer_attention(model: object, *, positions: int = 64, layers: Iterable[str] | None = None,
                                 seed: int = 0) -> Iterator[TemporalAttentionMaps]:
    """Record the frame maps of ``model`` (a video transformer or a pipeline holding one or two) inside the ``with``
    block (the module docstring says what a map holds).

    Args:
        positions: query tokens sampled per latent frame and call (a strip of consecutive tokens).
        layers: self-attention module paths to record (prefixed by the pipeline attribute, e.g.
            ``transformer.blocks.0.attn1``, as :class:`~vstar_kernels.diffusers.DiTTARHandle` names them); default
            the TAR-patched layers when TAR is applied, else every block's self-attention.
        seed: seeds the sampling.

    Without TAR applied, the recorder installs TAR's processors with a step window no call falls in (the model's
    own attention runs, bit for bit) and removes them on exit; with TAR applied it records what TAR computes. Under
    context parallelism it raises NotImplementedError.
    """
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    transformers = video_transformers_of(model)
    handle = transformer_tar_state(next(iter(transformers.values())))
    installed = handle is None
    if installed:
        handle = apply_transformer_tar(model, transformers, sigma=1.0, blocks=None, timesteps=_NEVER, backend="auto")
    try:
        names = list(handle.layers) if layers is None else list(layers)
        by_name = {}
        for prefix, transformer in transformers.items():
            for name, module in transformer.named_modules():
                by_name[f"{prefix}.{name}" if prefix else name] = module
        missing = [n for n in names if n not in by_name or not isinstance(
            getattr(by_name[n], "processor", None), DiTTARProcessor)]
        if missing:
            raise ValueError(f"not self-attention layers TAR runs on: {missing[:3]}")
        maps = TemporalAttentionMaps()
        recorder = _FrameMapRecorder(maps, {id(by_name[n].processor): n for n in names}, positions,
                                     torch.Generator().manual_seed(seed))
        states = [handle.state(prefix) for prefix in transformers]
        for state in states:
            state.recorder = recorder
        try:
            yield maps
        finally:
            for state in states:
                state.recorder = None
    finally:
        if installed:
            for transformer in transformers.values():
                remove_transformer_tar(transformer)


def is_transformer_model(model: nn.Module | object) -> bool:
    """Whether ``model`` is (or holds) a video transformer the recorder takes."""
    return bool(video_transformers_of(model))
