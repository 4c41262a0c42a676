"""The public attention-map entry points: ``record_temporal_attention`` for every supported model (a video UNet's
temporal layers, :mod:`.unet.attention_maps`; a video transformer's 3D self-attention aggregated per latent frame,
:mod:`.dit.attention_maps`), :class:`TemporalAttentionMaps` and ``plot_temporal_attention``.

    with record_temporal_attention(pipe, positions=64) as maps:
        pipe(prompt, num_frames=64)
    plot_temporal_attention({"with TAR": maps}, "maps.png")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from .dit.attention_maps import is_transformer_model, record_transformer_attention
from .shared.attention_maps import TemporalAttentionMaps, plot_temporal_attention
from .unet.attention_maps import record_unet_attention

__all__ = ["TemporalAttentionMaps", "plot_temporal_attention", "record_temporal_attention"]


@contextlib.contextmanager
def record_temporal_attention(model: object, *, positions: int = 64, layers: Iterable[str] | None = None,
                              seed: int = 0) -> Iterator[TemporalAttentionMaps]:
    """Record averaged temporal attention maps of ``model`` inside the ``with`` block: per layer, the F x F map of
    query frame -> key frame attention, what each layer computes (with TAR or a profile where it is on).

    A video UNet or a pipeline with one: each temporal self-attention layer (``positions`` spatial positions
    sampled per call). A video transformer or a pipeline holding one: each block's self-attention, the attention
    mass of a frame's query tokens on each frame's tokens (``positions`` query tokens per frame and call). ``layers``
    names the module paths to record (default: the TAR-patched layers, else all); ``seed`` seeds the sampling. The
    model's outputs are unchanged, and its processors are as before on exit (also on error).
    """
    recorder = record_transformer_attention if is_transformer_model(model) else record_unet_attention
    with recorder(model, positions=positions, layers=layers, seed=seed) as maps:
        yield maps
