"""What the attention-map recorders of both integrations fill (:class:`TemporalAttentionMaps`: per layer, the
average F x F map of query frame -> key frame attention), its per-distance profile, and the plot of maps side by
side. The recorders: :mod:`..unet.attention_maps` (a UNet's temporal layers) and :mod:`..dit.attention_maps` (a video
transformer's 3D self-attention, aggregated over each frame's tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...profiles import distance_profile


@dataclass
class TemporalAttentionMaps:
    """Per layer: the sum of recorded (F x F) maps, each averaged over sampled positions and heads, and the count."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, layer: str, probs: torch.Tensor) -> None:
        avg = probs.mean(dim=(0, 1)).float().cpu()
        if layer in self.sums and self.sums[layer].shape == avg.shape:
            self.sums[layer] += avg
            self.counts[layer] += 1
        else:  # a new layer, or a new frame count: start over
            self.sums[layer], self.counts[layer] = avg, 1

    @property
    def layers(self) -> list[str]:
        return list(self.sums)

    def map(self, layer: str) -> torch.Tensor:
        """The average map of one layer over every recorded call: rows are query frames, columns key frames."""
        return self.sums[layer] / self.counts[layer]

    def mean(self) -> torch.Tensor:
        """The average over layers (those with the most common frame count)."""
        if not self.sums:
            raise ValueError("no temporal attention was recorded")
        shapes = [s.shape for s in self.sums.values()]
        common = max(set(shapes), key=shapes.count)
        maps = [self.map(name) for name, s in self.sums.items() if s.shape == common]
        return torch.stack(maps).mean(dim=0)

    def distance_profile(self) -> torch.Tensor:
        """(F,) float64: the mean attention weight of a key at frame distance d = 0..F-1 in :meth:`mean`
        (:func:`vstar_kernels.profiles.distance_profile`; what :meth:`vstar_kernels.FrameProfile.from_attention`
        compares)."""
        return distance_profile(self.mean())


def plot_temporal_attention(maps: dict[str, TemporalAttentionMaps | torch.Tensor], path: str | Path, *,
                            title: str = "temporal attention (average over layers, heads and positions)") -> Path:
    """Heatmaps side by side, one per label (e.g. ``{"without TAR": a, "with TAR": b}``); written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4), squeeze=False)
    for ax, (label, value) in zip(axes[0], maps.items(), strict=True):
        matrix = value.mean() if isinstance(value, TemporalAttentionMaps) else value
        image = ax.imshow(matrix.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("key frame")
        ax.set_ylabel("query frame")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
