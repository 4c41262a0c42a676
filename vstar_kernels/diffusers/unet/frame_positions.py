"""Frame-position tables beyond their length: AnimateDiff's motion modules at 100+ frames.

Every released AnimateDiff motion adapter (v1.5 v2/v3, AnimateLCM, the SDXL beta, PIA) adds a sinusoidal position
table of ``motion_max_seq_length`` = 32 rows to the frames before each temporal attention
(diffusers' ``SinusoidalPositionalEmbedding``, buffer ``pe`` of shape (1, L, C)). diffusers slices the first F rows,
so F > L fails with a shape error. Here each table can answer for any F:

- ``"interpolate"``: frame f gets the *stored* table linearly interpolated at position f·(L-1)/(F-1) (the first and
  last frames get the first and last rows; ``F.interpolate(..., mode="linear", align_corners=True)``). Stored rows,
  because some adapters ship a trained table.
- ``"extrapolate"``: the sinusoid of diffusers' formula at positions 0..F-1, i.e. the table diffusers would have
  built with ``max_seq_length=F``. Defined only where the stored table is that sinusoid; otherwise a ValueError.
- ``"keep"``: diffusers' behaviour, with an error that names the table length and the other two modes.

Calls with F ≤ L run diffusers' own forward: bit-identical in every mode. Nothing is resized or added to the
``state_dict``: the module keeps its identity and its ``pe`` buffer; only its class becomes
:class:`FramePositionEmbedding` (a subclass), and :func:`restore_frame_positions` turns it back. Positions for F
frames are computed once per (F, device, dtype, table version) and cached on the module (recomputed inside
``torch.compile``, where they fold into the graph). ``copy.deepcopy``, pickling and ``.to()`` of the model work as
for any module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn

POSITION_MODES = ("interpolate", "extrapolate", "keep")
DEFAULT_POSITION_MODE = "interpolate"
_CACHE_ENTRIES = 8  # distinct (frames, device, dtype) per table kept at once


def check_position_mode(mode: object) -> str:
    """``mode`` if it is one of POSITION_MODES, else a ValueError listing them."""
    if mode not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def sinusoid_table(num_frames: int, dim: int) -> torch.Tensor:
    """(1, num_frames, dim) float32: diffusers' sinusoid (sin on even channels, cos on odd, base 10000), computed
    with the same operations as ``SinusoidalPositionalEmbedding.__init__`` so its rows are bit-identical."""
    position = torch.arange(num_frames).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, num_frames, dim)
    table[0, :, 0::2] = torch.sin(position * frequency)
    table[0, :, 1::2] = torch.cos(position * frequency)
    return table


def interpolate_table(table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, L, C) -> (1, num_frames, C) in ``table``'s dtype: frame f is the table linearly interpolated at position
    f·(L-1)/(num_frames-1). Index and weight arithmetic in float64, blending in at least float32."""
    rows = table.shape[1]
    if num_frames == 1 or rows == 1:
        return table[:, :1].expand(1, num_frames, table.shape[2]).clone()
    where = torch.arange(num_frames, dtype=torch.float64) * ((rows - 1) / (num_frames - 1))
    lower = where.floor().long().clamp(max=rows - 2)
    weight = (where - lower).to(device=table.device, dtype=torch.promote_types(table.dtype, torch.float32))
    lower = lower.to(table.device)
    work = table[0].to(weight.dtype)
    blended = work[lower] * (1 - weight)[:, None] + work[lower + 1] * weight[:, None]
    return blended.to(table.dtype).unsqueeze(0)


def is_sinusoid_table(table: torch.Tensor) -> bool:
    """Whether ``table`` (1, L, C) holds diffusers' sinusoid, up to the rounding of its dtype."""
    if table.shape[-1] % 2:
        return False
    expected = sinusoid_table(table.shape[1], table.shape[2])
    tolerance = max(4 * torch.finfo(table.dtype).eps, 1e-6)  # the stored table may have been cast to fp16/bf16
    return bool(torch.allclose(table.detach().float().cpu(), expected, rtol=0.0, atol=tolerance))


def _not_sinusoid_error(rows: int) -> ValueError:
    return ValueError(
        f"positions='extrapolate' continues diffusers' sinusoid, but this {rows}-row position table is not that "
        "sinusoid (a trained or modified table); use positions='interpolate', which stretches the stored rows")


class FramePositionEmbedding(SinusoidalPositionalEmbedding):
    """diffusers' ``SinusoidalPositionalEmbedding`` answering for more frames than its table holds.

    Not constructed: :func:`extend_frame_positions` switches an existing module's class to this one (same object,
    same ``pe`` buffer, same state_dict) and sets ``frame_positions`` to the mode.
    """

    frame_positions: str
    _frame_position_cache: dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, rows = x.shape[1], self.pe.shape[1]
        if frames <= rows:
            return super().forward(x)  # diffusers' own code: bit-identical within the table
        return x + self.positions(frames)

    def positions(self, num_frames: int) -> torch.Tensor:
        """The (1, num_frames, C) positions added to ``num_frames`` frames, in the table's dtype and device."""
        rows = self.pe.shape[1]
        if num_frames <= rows:
            return self.pe[:, :num_frames]
        if self.frame_positions == "keep":
            raise ValueError(
                f"{num_frames} frames exceed this motion module's position table of {rows} rows (the adapter's "
                f"motion_max_seq_length); positions='keep' keeps diffusers' limit. Use positions='interpolate' "
                "(stretch the stored table) or positions='extrapolate' (continue the sinusoid), in apply_tar or "
                "extend_frame_positions")
        if torch.compiler.is_compiling():  # traced into the graph; the mode was checked when it was set
            return self._compute(num_frames)
        key = self._cache_key(num_frames)
        cached = self._frame_position_cache.get(key) if key is not None else None
        if cached is None:
            if self.frame_positions == "extrapolate" and not is_sinusoid_table(self.pe):
                raise _not_sinusoid_error(rows)  # the table changed since extend_frame_positions checked it
            cached = self._compute(num_frames)
            if key is not None:
                while len(self._frame_position_cache) >= _CACHE_ENTRIES:
                    self._frame_position_cache.pop(next(iter(self._frame_position_cache)))
                self._frame_position_cache[key] = cached
        return cached

    def _compute(self, num_frames: int) -> torch.Tensor:
        with torch.no_grad():
            if self.frame_positions == "extrapolate":
                return sinusoid_table(num_frames, self.pe.shape[2]).to(self.pe.device, self.pe.dtype)
            return interpolate_table(self.pe, num_frames)

    def _cache_key(self, num_frames: int) -> tuple | None:
        """Frames, device, dtype and the table's storage and version (so loading a new table invalidates);
        None for inference tensors, which have no version counter (then nothing is cached)."""
        try:
            version = self.pe._version
        except RuntimeError:
            return None
        return num_frames, self.pe.device, self.pe.dtype, self.pe.data_ptr(), version


def _components(model: object) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Module):
        return [("", model)]
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        return [(name + ".", module) for name, module in components.items() if isinstance(module, nn.Module)]
    raise TypeError(f"expected a diffusers model or pipeline, got {type(model).__name__}")


def find_position_tables(model: object) -> Iterator[tuple[str, SinusoidalPositionalEmbedding]]:
    """(path, module) of every frame-position table in ``model`` (a model, or every model of a pipeline): diffusers'
    ``SinusoidalPositionalEmbedding`` modules. Other subclasses of it have a forward not known here and are left
    alone."""
    for prefix, root in _components(model):
        for name, module in root.named_modules():
            if type(module) in (SinusoidalPositionalEmbedding, FramePositionEmbedding):
                yield prefix + name, module


def frame_positions_state(model: object) -> dict[str, str | None]:
    """Path -> mode of every position table (None: diffusers' plain behaviour)."""
    return {name: getattr(module, "frame_positions", None) for name, module in find_position_tables(model)}


def _set_mode(module: SinusoidalPositionalEmbedding, mode: str | None) -> None:
    if mode is None:
        if isinstance(module, FramePositionEmbedding):
            module.__class__ = SinusoidalPositionalEmbedding
            del module.frame_positions, module._frame_position_cache
        return
    if type(module) is SinusoidalPositionalEmbedding:
        module.__class__ = FramePositionEmbedding
    if getattr(module, "frame_positions", None) != mode:
        module.frame_positions = mode
        module._frame_position_cache = {}


def check_positions_supported(model: object, mode: str) -> None:
    """Raise before anything changes if ``mode`` cannot serve one of ``model``'s tables."""
    check_position_mode(mode)
    for name, module in find_position_tables(model):
        if mode == "extrapolate" and not is_sinusoid_table(module.pe):
            raise ValueError(f"{name}: " + str(_not_sinusoid_error(module.pe.shape[1])))


def set_frame_positions(model: object, state: dict[str, str | None]) -> None:
    """Put each table named in ``state`` (see :func:`frame_positions_state`) in its mode."""
    tables = dict(find_position_tables(model))
    for name, mode in state.items():
        if name in tables:
            _set_mode(tables[name], mode)


def extend_frame_positions(model: object, mode: str = DEFAULT_POSITION_MODE) -> dict[str, int]:
    """Let every frame-position table of ``model`` (a UNet such as ``UNetMotionModel``, a SparseControlNet, or a
    pipeline: all its models) serve more frames than it holds, in ``mode`` ("interpolate", "extrapolate" or
    "keep"; see the module docstring). Calls within a table stay bit-identical to diffusers.

    For long runs without TAR, FreeNoise or context windows. Returns path -> table length of the tables set (empty
    for models without one: UNet3D, I2VGen-XL and SVD have no table). Raises ValueError, before changing anything,
    for an unknown mode or "extrapolate" on a table that is not diffusers' sinusoid. Undo with
    :func:`restore_frame_positions`.
    """
    check_positions_supported(model, mode)
    tables = dict(find_position_tables(model))
    set_frame_positions(model, dict.fromkeys(tables, mode))
    return {name: module.pe.shape[1] for name, module in tables.items()}


def restore_frame_positions(model: object) -> bool:
    """diffusers' own behaviour back on every table of ``model``; False if none was extended."""
    state = frame_positions_state(model)
    set_frame_positions(model, dict.fromkeys(state))
    return any(mode is not None for mode in state.values())
