"""``enable_frame_parallel`` / ``disable_frame_parallel``: one video UNet forward split over the ranks of a
process group by frames (DSP-style layout switching, DESIGN.md §9).

Contract: every rank calls the UNet with the same full inputs and gets the same full output, equal to the
single-process output to float tolerance, so pipelines run unchanged. Inside, a rank runs the spatial layers on its
share of the frames only; each temporal module (temporal attention, where TAR lives, and temporal convolutions)
runs on every frame and the rank's share of the spatial positions, entered and left by one all-to-all each
(:mod:`.layout`). GroupNorms inside a temporal module span frames and positions, so in the position layout they
all-reduce their per-group sums (:class:`SplitGroupNorm`). At a level with fewer positions than ranks the temporal
module gathers every frame and runs replicated instead. Fewer frames than ranks runs the whole UNet on every rank.

Mechanism: the UNet's class and its temporal modules' classes are switched to subclasses defined here (the same
objects, parameters and state_dict); ``disable_frame_parallel`` switches them back.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet3DConditionModel, UNetMotionModel
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel, TransformerTemporalModelOutput
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, UNetMotionOutput
from torch import nn

from .layout import (
    RankGroup,
    all_reduce_sum,
    frames_to_positions,
    gather_frames,
    positions_to_frames,
    resolve_group,
    split_sizes,
)

_STATE_ATTR = "_vstar_frame_parallel"


@dataclass(frozen=True)
class _Call:
    """The frame split of the UNet call in progress on this rank."""

    rg: RankGroup
    frame_sizes: list[int]

    @property
    def frames(self) -> int:
        return sum(self.frame_sizes)


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("vstar_frame_parallel_call", default=None)
_NORM_GROUP: contextvars.ContextVar[RankGroup | None] = contextvars.ContextVar("vstar_split_norm", default=None)


@dataclass
class FrameParallelState:
    """What ``enable_frame_parallel`` did to one UNet: its group and the classes it switched (path -> class)."""

    rg: RankGroup
    switched: dict[str, type]


# ------------------------------------------------------------------------------------------------ GroupNorm
class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics, inside a temporal module in the position layout, are reduced over the group:
    per (sample, group) the sum and then the sum of squared deviations (two all-reduces, the same numbers as one
    process's two-pass mean and biased variance). Elsewhere it is nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rg = _NORM_GROUP.get()
        if rg is None:
            return super().forward(x)
        batch = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        grouped = x.reshape(batch, self.num_groups, -1).to(acc)
        sums = torch.stack([grouped.sum(-1), torch.full_like(grouped[..., 0], grouped.shape[-1])])
        total, count = all_reduce_sum(sums, rg)
        mean = (total / count).unsqueeze(-1)
        var = all_reduce_sum(((grouped - mean) ** 2).sum(-1), rg) / count
        normed = ((grouped - mean) * torch.rsqrt(var.unsqueeze(-1) + self.eps)).reshape(x.shape).to(x.dtype)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            normed = normed * self.weight.reshape(shape) + self.bias.reshape(shape)
        return normed


# --------------------------------------------------------------------------------------- temporal modules
def _run_temporal(module_forward, hidden_states: torch.Tensor, num_frames: int, **kwargs) -> torch.Tensor:
    """Run a temporal module's own forward on (batch·F_rank, C, H, W) in the position layout (or replicated) and
    return this rank's frames; ``module_forward(x, num_frames=...)`` returns a tensor."""
    call = _CALL.get()
    if call is None or num_frames != call.frame_sizes[call.rg.rank]:
        return module_forward(hidden_states, num_frames=num_frames, **kwargs)
    rg = call.rg
    height, width = hidden_states.shape[-2:]
    if height * width < rg.world:  # too few positions to split: every frame here, run whole, keep ours
        batch = hidden_states.shape[0] // num_frames
        full = gather_frames(hidden_states.reshape(batch, num_frames, *hidden_states.shape[1:]), call.frame_sizes,
                             1, rg)
        out = module_forward(full.flatten(0, 1), num_frames=call.frames, **kwargs)
        start = sum(call.frame_sizes[:rg.rank])
        return out.reshape(batch, call.frames, *out.shape[1:])[:, start:start + num_frames].flatten(0, 1)
    positions = frames_to_positions(hidden_states, call.frame_sizes, rg)
    token = _NORM_GROUP.set(rg)
    try:
        out = module_forward(positions, num_frames=call.frames, **kwargs)
    finally:
        _NORM_GROUP.reset(token)
    return positions_to_frames(out, call.frame_sizes, height, width, rg)


def _temporal_forward(base: type, module: nn.Module, args: tuple, kwargs: dict):
    """``base.forward`` of a temporal module, called with diffusers' own (positional or keyword) arguments, run
    through :func:`_run_temporal`; the result has the type ``base.forward`` returns for those arguments."""
    bound = inspect.signature(base.forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return_dict = bound.arguments.get("return_dict")
    if return_dict is not None:
        bound.arguments["return_dict"] = False

    def own(x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bound.arguments["hidden_states"], bound.arguments["num_frames"] = x, num_frames
        out = base.forward(*bound.args, **bound.kwargs)
        return out[0] if isinstance(out, tuple) else out

    out = _run_temporal(own, bound.arguments["hidden_states"], bound.arguments["num_frames"])
    if return_dict is None:
        return out
    return TransformerTemporalModelOutput(sample=out) if return_dict else (out,)


class FrameParallelTransformerTemporal(TransformerTemporalModel):
    """TransformerTemporalModel (UNet3D's and I2VGen-XL's temporal attention), frame-parallel."""

    def forward(self, *args, **kwargs):
        return _temporal_forward(TransformerTemporalModel, self, args, kwargs)


class FrameParallelTemporalConv(TemporalConvLayer):
    """TemporalConvLayer (UNet3D's temporal convolutions), frame-parallel."""

    def forward(self, *args, **kwargs):
        return _temporal_forward(TemporalConvLayer, self, args, kwargs)


class FrameParallelMotionTransformer(AnimateDiffTransformer3D):
    """AnimateDiffTransformer3D (AnimateDiff's motion module), frame-parallel."""

    def forward(self, *args, **kwargs):
        return _temporal_forward(AnimateDiffTransformer3D, self, args, kwargs)


def _unet_forward(base: type, output: type, module: nn.Module, sample: torch.Tensor, timestep,
                  encoder_hidden_states: torch.Tensor, args: tuple, kwargs: dict, return_dict: bool):
    """``base.forward`` on this rank's frames of ``sample`` (frames on dim 2) and of a per-frame
    ``encoder_hidden_states`` (batch·frames rows, as AnimateDiff passes it), gathered back into the full output."""
    state: FrameParallelState | None = getattr(module, _STATE_ATTR, None)
    frames = sample.shape[2]
    if state is None or state.rg.world == 1 or frames < state.rg.world or _CALL.get() is not None:
        return base.forward(module, sample, timestep, encoder_hidden_states, *args, return_dict=return_dict,
                            **kwargs)
    _check_call(sample, args, kwargs, state.rg)
    sizes = split_sizes(frames, state.rg.world)
    start, here = sum(sizes[:state.rg.rank]), sizes[state.rg.rank]
    batch = sample.shape[0]
    if encoder_hidden_states is not None and encoder_hidden_states.shape[0] == batch * frames and frames > 1:
        rows = encoder_hidden_states.reshape(batch, frames, *encoder_hidden_states.shape[1:])
        encoder_hidden_states = rows[:, start:start + here].flatten(0, 1)
    token = _CALL.set(_Call(state.rg, sizes))
    try:
        local = base.forward(module, sample[:, :, start:start + here], timestep, encoder_hidden_states, *args,
                             return_dict=False, **kwargs)[0]
    finally:
        _CALL.reset(token)
    out = gather_frames(local, sizes, 2, state.rg)
    return output(sample=out) if return_dict else (out,)


class FrameParallelUNet3D(UNet3DConditionModel):
    """UNet3DConditionModel whose forward splits the frames over the ranks and gathers the output."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        return _unet_forward(UNet3DConditionModel, UNet3DConditionOutput, self, sample, timestep,
                             encoder_hidden_states, args, kwargs, return_dict)


class FrameParallelUNetMotion(UNetMotionModel):
    """UNetMotionModel (AnimateDiff, PIA, SparseCtrl's UNet) whose forward splits the frames over the ranks."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        return _unet_forward(UNetMotionModel, UNetMotionOutput, self, sample, timestep, encoder_hidden_states, args,
                             kwargs, return_dict)


class FrameParallelAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose ``decode`` of a batch of frame latents decodes this rank's share and gathers the rest."""

    def decode(self, z, return_dict=True, generator=None):
        state: FrameParallelState | None = getattr(self, _STATE_ATTR, None)
        if state is None or state.rg.world == 1 or z.shape[0] < state.rg.world:
            return AutoencoderKL.decode(self, z, return_dict=return_dict, generator=generator)
        state.rg.check_device(z.device)
        sizes = split_sizes(z.shape[0], state.rg.world)
        start = sum(sizes[:state.rg.rank])
        local = AutoencoderKL.decode(self, z[start:start + sizes[state.rg.rank]], return_dict=False)[0]
        out = gather_frames(local, sizes, 0, state.rg)
        return DecoderOutput(sample=out) if return_dict else (out,)


# diffusers class -> its frame-parallel subclass
UNET_CLASSES: dict[type, type] = {UNet3DConditionModel: FrameParallelUNet3D, UNetMotionModel: FrameParallelUNetMotion}
TEMPORAL_CLASSES: dict[type, type] = {TransformerTemporalModel: FrameParallelTransformerTemporal,
                                      TemporalConvLayer: FrameParallelTemporalConv,
                                      AnimateDiffTransformer3D: FrameParallelMotionTransformer}


def _check_call(sample: torch.Tensor, args: tuple, kwargs: dict, rg: RankGroup) -> None:
    """Refuse, before any collective, what the split cannot carry."""
    rg.check_device(sample.device)
    extra = [name for name in ("down_block_additional_residuals", "mid_block_additional_residual")
             if kwargs.get(name) is not None]
    if len(args) > 4:  # beyond (class_labels/timestep_cond, ..., cross_attention_kwargs): residuals by position
        extra.append("positional arguments past cross_attention_kwargs")
    if extra:
        raise NotImplementedError("frame parallelism does not split ControlNet residuals yet "
                                  f"({', '.join(extra) or 'positional residuals'}); disable_frame_parallel first")


# ---------------------------------------------------------------------------------------------- public API
def enable_frame_parallel(model, group=None) -> FrameParallelState:
    """Split every forward of ``model``'s UNet (a UNet or a pipeline with ``.unet``) by frames over ``group``
    (default: the default process group, initialised from torchrun's environment if needed). For a pipeline, its
    AutoencoderKL also decodes each rank's share of the frames and gathers them.

    Supported: UNet3DConditionModel (ModelScope / zeroscope) and UNetMotionModel (AnimateDiff). Composes with
    ``apply_tar`` and frame positions. A world of 1 is a no-op. Raises TypeError for other models and a clear error
    for a bad group or a device the group's backend cannot move, before any collective. Returns the state (its
    ``rg`` names rank and world)."""
    from ..diffusers.components import unet_of

    unet = unet_of(model)
    if type(unet) not in UNET_CLASSES and type(unet) not in UNET_CLASSES.values():
        raise TypeError(f"frame parallelism supports {', '.join(c.__name__ for c in UNET_CLASSES)}; got "
                        f"{type(unet).__name__}")
    device = next(unet.parameters()).device
    rg = resolve_group(group, device)
    disable_frame_parallel(unet)
    switched: dict[str, type] = {"": type(unet)}
    for name, module in unet.named_modules():
        if type(module) in TEMPORAL_CLASSES:
            switched[name] = type(module)
            for sub_name, sub in module.named_modules():
                if type(sub) is nn.GroupNorm:
                    switched[f"{name}.{sub_name}"] = nn.GroupNorm
    for name, cls in switched.items():
        target = unet.get_submodule(name)
        target.__class__ = UNET_CLASSES.get(cls) or TEMPORAL_CLASSES.get(cls) or SplitGroupNorm
    state = FrameParallelState(rg, switched)
    object.__setattr__(unet, _STATE_ATTR, state)
    vae = getattr(model, "vae", None)
    if vae is not None and type(vae) is AutoencoderKL:  # a pipeline: frames decode per rank
        vae.__class__ = FrameParallelAutoencoderKL
        object.__setattr__(vae, _STATE_ATTR, FrameParallelState(rg, {"": AutoencoderKL}))
    return state


def disable_frame_parallel(model) -> bool:
    """Undo :func:`enable_frame_parallel` on a UNet or a pipeline (its UNet and VAE): every switched module gets
    its class back. False if it was not on."""
    from ..diffusers.components import unet_of

    found = False
    for module in (unet_of(model), getattr(model, "vae", None)):
        state: FrameParallelState | None = getattr(module, _STATE_ATTR, None)
        if state is None:
            continue
        for name, cls in state.switched.items():
            module.get_submodule(name).__class__ = cls
        object.__delattr__(module, _STATE_ATTR)
        found = True
    return found


def frame_parallel_state(model) -> FrameParallelState | None:
    """The state of an enabled model, else None."""
    from ..diffusers.components import unet_of

    return getattr(unet_of(model), _STATE_ATTR, None)


__all__ = ["FrameParallelState", "SplitGroupNorm", "disable_frame_parallel", "enable_frame_parallel",
           "frame_parallel_state"]
