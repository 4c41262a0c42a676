"""Frame-distance profiles: how attention between two framed tokens depends on their frame distance.

A :class:`FrameProfile` generalises TAR's Gaussian band. For a pair of tokens that both have a frame, at frame
distance ``d = |gi - gj|``, the op contract (:mod:`vstar_kernels.contract`) computes

    S'_ij = (S_ij > 0 ? scale(d) * S_ij : S_ij) + bias(d) + c_i * G_sigma(d),   over kept pairs only
    c_i   = sat(strength * max_{j kept} S_ij)       (relative; absolute: sat(strength))

where ``scale`` and ``bias`` are per-distance tables (indexed by ``min(d, D)``: the last entry holds for every larger
distance), ``G_sigma`` is TAR's Gaussian band, and a pair is *kept* unless the profile masks it: a ``-inf`` bias
entry, or a window (``d > radius`` and the key's frame not a sink). A masked pair gets no weight, takes no part in
the relative row max and passes no gradient. Pairs with a text token (no frame) keep ``S_ij`` unchanged.

The profile is a plain, immutable value: it holds its tables as float64 tensors, pickles and deep-copies, and adds
(``p + q``). It knows nothing of tensors' layouts or backends; :func:`vstar_kernels.tar_attention` takes it as
``profile=`` and every backend evaluates the formula above (defined once per language: the Python reference, the
Triton kernel, ``csrc/tar_attention.h``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .limits import FLOAT32_MAX, MAX_OFFSET, MODES
from .video_families import trained_latent_frames, transformers_of

__all__ = ["ULTRAVICO_FACTOR", "FrameProfile", "distance_profile"]

# UltraViCo's decay factor: the default ``--alpha`` of its public inference script (thu-ml/DiT-Extrapolation,
# inference.py, Wan 2.1 T2V 1.3B), the value its kernel multiplies the positive out-of-window logits by.
ULTRAVICO_FACTOR = 0.9


def _finite_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _frame_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer number of frames, got {type(value).__name__}")
    out = int(value)
    if not 0 <= out <= MAX_OFFSET:
        raise ValueError(f"{name} must be in [0, 2^53] frames, got {out}")
    return out


def _table(name: str, value: object) -> torch.Tensor:
    """A validated (heads, D+1) float64 copy of a table given as (D+1,) or (heads, D+1), on its own device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (D+1,) or (heads, D+1), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}")
    if value.dim() not in (1, 2) or value.shape[-1] == 0 or (value.dim() == 2 and value.shape[0] == 0):
        raise ValueError(f"{name} must have shape (D+1,) or (heads, D+1) with D+1 >= 1 and heads >= 1, got "
                         f"{tuple(value.shape)}")
    if value.requires_grad:
        raise ValueError(f"{name} requires grad: a profile's tables are constants of the call (gradients flow to q, "
                         "k and v only); pass table.detach()")
    table = value.detach().to(torch.float64).reshape(-1, value.shape[-1]).clone()
    if torch.isnan(table).any():
        raise ValueError(f"{name} holds NaN")
    return table


def distance_profile(frame_map: torch.Tensor) -> torch.Tensor:
    """(F,) float64 mean of ``frame_map[i, j]`` over the pairs with ``|i - j| = d``, d = 0..F-1, for an (F, F)
    attention map (rows: query frames, columns: key frames)."""
    if frame_map.dim() != 2 or frame_map.shape[0] != frame_map.shape[1] or frame_map.shape[0] == 0:
        raise ValueError(f"an attention map must be (F, F) with F >= 1, got shape {tuple(frame_map.shape)}")
    frames = frame_map.shape[0]
    index = torch.arange(frames)
    dist = (index[:, None] - index[None, :]).abs().flatten()
    sums = torch.zeros(frames, dtype=torch.float64).index_add_(0, dist, frame_map.detach().double().flatten().cpu())
    return sums / torch.bincount(dist, minlength=frames).double()


def _distance_profile_of(maps: object, name: str) -> torch.Tensor:
    """The (F,) per-distance profile of recorded attention: a TemporalAttentionMaps (its ``distance_profile()``) or
    an (F, F) map."""
    if hasattr(maps, "distance_profile"):
        return maps.distance_profile()
    if isinstance(maps, torch.Tensor):
        return distance_profile(maps)
    raise TypeError(f"{name} must be recorded attention (TemporalAttentionMaps) or an (F, F) tensor, got "
                    f"{type(maps).__name__}")


def _check_bias(bias: torch.Tensor) -> None:
    if torch.isposinf(bias).any():
        raise ValueError("bias holds +inf: an entry must be finite, or -inf to mask the pairs at that distance")
    if not torch.isfinite(bias[:, 0]).all():
        raise ValueError("bias[..., 0] must be finite: every framed query keeps its own frame (distance 0)")


def _check_scale(scale: torch.Tensor) -> None:
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("positive_scale must be finite and > 0 everywhere (it multiplies the positive logits)")
    if (scale > FLOAT32_MAX).any():
        raise ValueError(f"positive_scale must fit in float32 (<= {FLOAT32_MAX:.4g})")


def widen_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """``table`` (heads, D+1) extended to ``length`` entries by repeating its last (which holds for larger d)."""
    if table.shape[1] >= length:
        return table
    return torch.cat([table, table[:, -1:].expand(-1, length - table.shape[1])], dim=1)


def _heads_of(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"cannot compose {what} tables for {a.shape[0]} and {b.shape[0]} heads (one table per head, "
                         "or one for every head)")


def _combine(a: torch.Tensor | None, b: torch.Tensor | None, op, what: str) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    _heads_of(a, b, what)
    if a.device != b.device:
        if a.device.type == "cpu":
            a = a.to(b.device)
        elif b.device.type == "cpu":
            b = b.to(a.device)
        else:
            raise ValueError(f"cannot compose {what} tables on {a.device} and {b.device}")
    length = max(a.shape[1], b.shape[1])
    return op(widen_table(a, length), widen_table(b, length))


@dataclass(frozen=True, eq=False)
class FrameProfile:
    """How attention between two framed tokens depends on their frame distance (module docstring: the formula).

    Build one with the constructors and add them: :meth:`gaussian` (TAR), :meth:`table` (per-distance bias and
    positive-logit scale, one row per head or one for all), :meth:`decay_beyond` (UltraViCo's rule),
    :meth:`window` (a sliding window over frames with sink frames), :meth:`ultravico` (a model's UltraViCo
    profile) and :meth:`from_attention` (a bias fitted to recorded attention). ``p + q`` composes: biases add,
    positive scales multiply, masks intersect (the smaller radius, the larger ``sink_frames``), at most one Gaussian.

    Attributes:
        sigma: the Gaussian band's width in frames, or None (no band).
        strength: the band's strength (1.0 without a band).
        mode: "relative" (the band scaled by each row's max logit over the kept keys) or "absolute".
        bias: (heads, D+1) float64 added to the logit at distance ``min(d, D)``; ``-inf`` masks; or None.
        positive_scale: (heads, D+1) float64 multiplying a positive logit at distance ``min(d, D)``; or None.
        radius: keys further than ``radius`` frames are masked (except sinks); None: no window.
        sink_frames: keys whose (global) frame is below this stay visible to every query of a window.
        heads: rows of the tables: 1 (every head alike) or the heads they were given for.
        table_masks: whether the bias table masks some distance (a ``-inf`` entry).
        table_reach: when the bias table's last entry masks every head, the largest distance some head keeps
            (beyond it every pair is masked, sinks included); else None.
    """

    sigma: float | None = None
    strength: float = 1.0
    mode: str = "relative"
    bias: torch.Tensor | None = field(default=None, repr=False)
    positive_scale: torch.Tensor | None = field(default=None, repr=False)
    radius: int | None = None
    sink_frames: int = 0
    # facts of the tables, found once here so that a traced call (torch.compile) reads Python values, not tensors
    heads: int = field(default=1, init=False, repr=False)
    table_masks: bool = field(default=False, init=False, repr=False)
    table_reach: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.sigma is not None:
            sigma = _finite_real("sigma", self.sigma)
            if sigma <= 0.0:
                raise ValueError(f"sigma must be > 0, got {sigma}")
            object.__setattr__(self, "sigma", sigma)
        strength = _finite_real("strength", self.strength)
        if abs(strength) > FLOAT32_MAX:
            raise ValueError(f"strength must fit in float32 (|strength| <= {FLOAT32_MAX:.4g}), got {strength}")
        object.__setattr__(self, "strength", strength)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.bias is not None:
            bias = _table("bias", self.bias)
            _check_bias(bias)
            object.__setattr__(self, "bias", bias)
        if self.positive_scale is not None:
            scale = _table("positive_scale", self.positive_scale)
            _check_scale(scale)
            object.__setattr__(self, "positive_scale", scale)
        if self.bias is not None and self.positive_scale is not None:
            _heads_of(self.bias, self.positive_scale, "bias and positive_scale")
        if self.radius is not None:
            object.__setattr__(self, "radius", _frame_count("radius", self.radius))
        object.__setattr__(self, "sink_frames", _frame_count("sink_frames", self.sink_frames))
        if self.sink_frames and self.radius is None:
            raise ValueError("sink_frames needs a window (radius=): without one every key is visible already")
        tables = [t for t in (self.bias, self.positive_scale) if t is not None]
        object.__setattr__(self, "heads", max([t.shape[0] for t in tables], default=1))
        if self.bias is not None:
            masked = torch.isneginf(self.bias)
            object.__setattr__(self, "table_masks", bool(masked.any()))
            if bool(masked[:, -1].all()):  # beyond the last distance some head keeps, every pair is masked
                object.__setattr__(self, "table_reach", int((~masked).any(dim=0).nonzero()[-1]))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def gaussian(cls, sigma: float, strength: float = 1.0, mode: str = "relative") -> FrameProfile:
        """TAR's Gaussian band ``c_i * exp(-d^2 / (2 sigma^2))``: the same formula and results as
        ``tar_attention(sigma=, strength=, mode=)``."""
        if sigma is None:
            raise TypeError("sigma must be a real number, got NoneType")
        return cls(sigma=sigma, strength=strength, mode=mode)

    @classmethod
    def table(cls, bias: torch.Tensor | None = None, positive_scale: torch.Tensor | None = None) -> FrameProfile:
        """Per-distance tables of shape (D+1,) or (heads, D+1), indexed by ``min(d, D)``.

        ``bias`` is added to the logit (``-inf`` masks the pair; ``bias[..., 0]`` must be finite: every framed
        query keeps its own frame); ``positive_scale`` (> 0) multiplies the logit where it is positive. Any float
        dtype, on any device (a CPU table serves every device; another table only its own); kept as float64.
        """
        if bias is None and positive_scale is None:
            raise ValueError("FrameProfile.table needs bias= or positive_scale= (or both)")
        return cls(bias=bias, positive_scale=positive_scale)

    @classmethod
    def decay_beyond(cls, window: int, factor: float) -> FrameProfile:
        """UltraViCo's rule (arXiv 2511.20123): a positive logit at frame distance ``d > window`` is multiplied by
        ``factor``, 0 < factor <= 1; nearer pairs and negative logits are unchanged."""
        window = _frame_count("window", window)
        factor = _finite_real("factor", factor)
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        scale = torch.ones(window + 2, dtype=torch.float64)
        scale[-1] = factor
        return cls(positive_scale=scale)

    @classmethod
    def window(cls, radius: int, sink_frames: int = 0) -> FrameProfile:
        """A sliding window over frames: keys more than ``radius`` frames away are masked, except keys whose global
        frame is below ``sink_frames`` (sink or anchor frames, visible to every query). Masked tiles are skipped by
        the kernels that can (their cost falls with the kept share of the pairs)."""
        return cls(radius=radius, sink_frames=sink_frames)

    @classmethod
    def ultravico(cls, model: object, factor: float = ULTRAVICO_FACTOR) -> FrameProfile:
        """UltraViCo's profile for a video transformer or a pipeline holding one (arXiv 2511.20123, ICLR 2026):
        ``decay_beyond(L // 2, factor)`` with L the latent frames of the length the model was trained at.

        UltraViCo scales the positive attention logits of token pairs beyond the training window by a constant
        factor below 1. Its public kernel (thu-ml/DiT-Extrapolation, ``sageattn/attn_qk_int8_per_block.py``, the
        Wan 2.1 T2V 1.3B release) keeps the pairs whose token distance is at most ``frame_tokens * 21 / 2`` (half of
        the 21 latent frames of Wan's 81 training frames, on either side) and multiplies the other positive logits
        by ``multi_factor``, 0.9 by default (``--alpha`` of its ``inference.py``). Here the window is counted in
        whole latent frames: frame distance ``d > L // 2`` decays (Wan: d > 10). Its kernel also masks the first
        latent frame's queries against keys past frame 21, a rule that is not a function of frame distance and is
        not part of this profile.

        L comes from each family's training length (:func:`vstar_kernels.video_families.trained_latent_frames`):
        Wan 2.1/2.2 A14B 81 frames (21 latent frames), Wan 2.2 TI2V-5B 121 (31),
        CogVideoX 49 (13; 1.5: 81 frames, 21 latent frames, 10 after its temporal patch), LTX-Video 121 (16),
        HunyuanVideo 129 (33). The factor is UltraViCo's published Wan value for every family (its code holds no
        other). Compose it with TAR: ``FrameProfile.ultravico(pipe) + FrameProfile.gaussian(2.0)``.
        """
        transformers = transformers_of(model)
        if not transformers:
            raise ValueError(f"FrameProfile.ultravico needs a video transformer (Wan, CogVideoX, LTX-Video, "
                             f"HunyuanVideo) or a pipeline holding one, got {type(model).__name__}")
        windows = {trained_latent_frames(t) // 2 for t in transformers.values()}
        if len(windows) > 1:
            raise ValueError(f"the pipeline's transformers were trained at different lengths (windows {windows})")
        return cls.decay_beyond(windows.pop(), factor)

    @classmethod
    def from_attention(cls, reference: object, generated: object, *, strength: float = 1.0,
                       max_distance: int | None = None, floor: float = 1e-6) -> FrameProfile:
        """A per-distance bias table that moves the model's temporal attention toward a reference video's:
        VSTAR's "nursing towards real dynamics" made a profile.

        ``reference`` and ``generated`` are recorded attention (a
        :class:`~vstar_kernels.diffusers.TemporalAttentionMaps` from ``record_temporal_attention``, or an (F, F)
        map): the first on a real video, the second on the model's own generation. From each, the mean attention
        weight of a key at frame distance d (``distance_profile``: r(d) and g(d)); the bias is

            bias(d) = strength * (log max(r(d), floor) - log max(g(d), floor)),   shifted so that bias(0) = 0,

        for d up to the shorter map's last distance (or ``max_distance``), the last entry holding beyond. A
        softmax weight times exp(bias(d)) is the generated weight moved to the reference's, up to the row's
        normalisation; ``strength`` < 1 moves part of the way. One row, for every head.
        """
        ref, gen = _distance_profile_of(reference, "reference"), _distance_profile_of(generated, "generated")
        strength = _finite_real("strength", strength)
        floor = _finite_real("floor", floor)
        if floor <= 0.0:
            raise ValueError(f"floor must be > 0, got {floor}")
        length = min(ref.shape[0], gen.shape[0])
        if max_distance is not None:
            length = min(length, _frame_count("max_distance", max_distance) + 1)
        bias = strength * (ref[:length].clamp_min(floor).log() - gen[:length].clamp_min(floor).log())
        return cls.table(bias=bias - bias[0])

    # ------------------------------------------------------------------------------------------- composition
    def __add__(self, other: object) -> FrameProfile:
        if not isinstance(other, FrameProfile):
            return NotImplemented
        if self.sigma is not None and other.sigma is not None:
            raise ValueError("cannot compose two Gaussian bands: a profile holds at most one (add their effect as a "
                             "bias table instead)")
        band = self if self.sigma is not None else other
        radii = [r for r in (self.radius, other.radius) if r is not None]
        return FrameProfile(
            sigma=band.sigma, strength=band.strength, mode=band.mode,
            bias=_combine(self.bias, other.bias, torch.add, "bias"),
            positive_scale=_combine(self.positive_scale, other.positive_scale, torch.mul, "positive_scale"),
            radius=min(radii) if radii else None,
            sink_frames=max(self.sink_frames, other.sink_frames) if radii else 0,
        )

    def __radd__(self, other: object) -> FrameProfile:
        if isinstance(other, int) and other == 0:  # sum(profiles)
            return self
        return NotImplemented

    # ------------------------------------------------------------------------------------------------- facts
    @property
    def has_band(self) -> bool:
        """Whether the profile holds a Gaussian band."""
        return self.sigma is not None

    @property
    def shaped(self) -> bool:
        """Whether the profile holds anything beyond a Gaussian band (tables or a window)."""
        return self.bias is not None or self.positive_scale is not None or self.radius is not None

    @property
    def masks(self) -> bool:
        """Whether some framed pairs may be masked (a window, or a ``-inf`` bias entry)."""
        return self.radius is not None or self.table_masks

    def select_heads(self, start: int, stop: int) -> FrameProfile:
        """The profile for heads ``start:stop`` of a call (context parallelism's Ulysses gives each rank a share of
        the heads): per-head tables sliced, everything else as is; ``self`` when the tables serve every head."""
        if self.heads == 1:
            return self
        if not 0 <= start < stop <= self.heads:
            raise ValueError(f"heads {start}:{stop} are not a share of the profile's {self.heads} heads")

        def share(table: torch.Tensor | None) -> torch.Tensor | None:
            return table if table is None or table.shape[0] == 1 else table[start:stop]

        return FrameProfile(sigma=self.sigma, strength=self.strength, mode=self.mode, bias=share(self.bias),
                            positive_scale=share(self.positive_scale), radius=self.radius,
                            sink_frames=self.sink_frames)

    def check_heads(self, heads: int) -> None:
        """ValueError unless the tables serve ``heads`` attention heads (one row per head, or one row)."""
        if self.heads not in (1, heads):
            raise ValueError(f"the profile's tables have {self.heads} rows, but the call has {heads} heads (one row "
                             "per head, or one for every head)")

    def check_device(self, device: torch.device) -> None:
        """ValueError when a table lives on a device other than the CPU and ``device``."""
        for name, t in (("bias", self.bias), ("positive_scale", self.positive_scale)):
            if t is not None and t.device.type != "cpu" and t.device != device:
                raise ValueError(f"the profile's {name} table is on {t.device}, the inputs on {device} (keep tables on "
                                 "the CPU to serve every device)")

    def __repr__(self) -> str:
        parts = []
        if self.sigma is not None:
            parts.append(f"gaussian(sigma={self.sigma:g}, strength={self.strength:g}, mode={self.mode!r})")
        scale = self.positive_scale
        decay = (scale is not None and scale.shape == (1, scale.shape[1]) and scale.shape[1] >= 2
                 and bool((scale[0, :-1] == 1.0).all()) and float(scale[0, -1]) < 1.0)
        if decay:
            parts.append(f"decay_beyond(window={scale.shape[1] - 2}, factor={float(scale[0, -1]):g})")
        tables = [f"{n}={tuple(t.shape)}" for n, t in (("bias", self.bias), ("positive_scale", scale))
                  if t is not None and not (decay and t is scale)]
        if tables:
            parts.append(f"table({', '.join(tables)})")
        if self.radius is not None:
            parts.append(f"window(radius={self.radius}, sink_frames={self.sink_frames})")
        return f"FrameProfile({' + '.join(parts) or 'identity'})"
