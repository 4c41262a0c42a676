"""Temporal attention analysis of a video UNet (the paper's look at attention maps): record the averaged F x F
temporal attention map of each temporal layer while it runs (``record_temporal_attention``, the entry point, comes
here for a UNet).

Only a sample of ``positions`` spatial positions (rows of the B·H·W batch of a temporal layer) is recorded per call,
through the materialised reference on that sample, so memory stays bounded however long the video is. The maps are
what each layer's processor computes: with TAR if it is on for that call (its sigma, strength, mode), else plain
softmax attention. The model's outputs are unchanged: recording runs beside the real processor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ...reference import tar_attention_probs
from ..shared.attention_maps import TemporalAttentionMaps
from ..shared.components import unet_of
from .discovery import find_temporal_attention
from .patching import unet_tar_state
from .processor import TARAttnProcessor, project_heads


class _RecordingProcessor:
    """Wraps a layer's processor: records the sample's attention map, then returns the wrapped processor's output."""

    def __init__(self, inner, name: str, maps: TemporalAttentionMaps, positions: int, generator: torch.Generator):
        self.inner, self.name, self.maps, self.positions, self.generator = inner, name, maps, positions, generator

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            with torch.no_grad():
                self._record(attn, hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def _record(self, attn, hidden_states: torch.Tensor, attention_mask) -> None:
        rows = hidden_states.shape[0]
        pick = torch.randperm(rows, generator=self.generator)[: self.positions].to(hidden_states.device)
        q, k, _ = project_heads(attn, hidden_states[pick])
        inner = self.inner
        tar_on = isinstance(inner, TARAttnProcessor) and inner.active
        bias = inner.bias_kwargs() if tar_on else {"sigma": 1.0, "strength": 0.0}
        probs = tar_attention_probs(q, k, scale=attn.scale, compute_dtype=torch.float32, **bias)
        self.maps.add(self.name, probs)


@contextlib.contextmanager
def record_unet_attention(model: nn.Module, *, positions: int = 64, layers: Iterable[str] | None = None,
                              seed: int = 0) -> Iterator[TemporalAttentionMaps]:
    """Record averaged temporal attention maps of ``model`` (a UNet or a pipeline with one) inside the ``with``
    block (:func:`vstar_kernels.diffusers.record_temporal_attention` for a UNet).

    Args:
        positions: spatial positions sampled per call (memory: positions x heads x F x F floats at a time).
        layers: module paths to record; default the TAR-patched layers if TAR is applied, else every temporal
            self-attention layer of the model.
        seed: seeds the sampling of positions.

    The processors in place on entry are restored on exit (also on error).
    """
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    unet = unet_of(model)
    if layers is None:
        handle = unet_tar_state(unet)
        names = list(handle.layers) if handle else [layer.name for layer in find_temporal_attention(unet)]
    else:
        names = list(layers)
    modules = dict(unet.named_modules())
    missing = [n for n in names if n not in modules or not hasattr(modules[n], "processor")]
    if missing:
        raise ValueError(f"not attention layers of {type(unet).__name__}: {missing[:3]}")
    maps = TemporalAttentionMaps()
    generator = torch.Generator().manual_seed(seed)
    installed: dict[str, tuple[object, _RecordingProcessor]] = {}
    try:
        for name in names:
            module = modules[name]
            recorder = _RecordingProcessor(module.processor, name, maps, positions, generator)
            installed[name] = (module.processor, recorder)
            module.set_processor(recorder)
        yield maps
    finally:
        for name, (original, recorder) in installed.items():
            if modules[name].processor is recorder:
                modules[name].set_processor(original)
