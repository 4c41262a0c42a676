"""``enable_frame_parallel`` / ``disable_frame_parallel``: one video UNet forward split over the ranks of a
process group by frames (DSP-style layout switching, DESIGN.md §9).

Contract: every rank calls the UNet with the same full inputs and gets the same full output, equal to the
single-process output to float tolerance, so pipelines run unchanged. Inside, a rank runs the spatial layers on its
share of the frames only; each temporal module (temporal attention, where TAR lives, and temporal convolutions)
runs on every frame and the rank's share of the spatial positions, entered and left by one all-to-all each
(:mod:`.layout`). GroupNorms inside a temporal module span frames and positions, so in the position layout they
all-reduce their per-group sums (:class:`SplitGroupNorm`). At a level with fewer positions than ranks the temporal
module gathers every frame and runs replicated instead. Fewer frames than ranks runs the whole UNet on every rank.

Backward: with autograd recording (grad enabled and a parameter or an input requiring grad) every layout switch,
gather and all-reduce is differentiable (:mod:`.layout`), and the UNet's parameters and tensor inputs enter the
split call through :func:`.layout.enter_replicated`, which sums their gradients over the ranks. Every rank calling
``backward`` on the same loss of the (same) full output gets the single-process gradients of the parameters and
the inputs. Gradient checkpointing is refused while training split (NotImplementedError): its recompute would run
outside the call. Without autograd (``torch.no_grad``, nothing requiring grad) nothing of this runs.

Mechanism: the UNet's class and its temporal modules' classes are switched to subclasses defined here (the same
objects, parameters and state_dict); ``disable_frame_parallel`` switches them back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    I2VGenXLUNet,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.resnet import TemporalConvLayer, TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModel,
    TransformerTemporalModelOutput,
)
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from diffusers.models.unets.unet_i2vgen_xl import I2VGenXLTransformerTemporalEncoder
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, UNetMotionOutput
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput
from torch import nn

from .context import CALL, FrameCall, Scoped
from .layout import (
    RankGroup,
    all_reduce_sum,
    enter_replicated,
    frames_to_positions,
    gather_frames,
    gather_output,
    positions_to_frames,
    resolve_group,
    split_sizes,
)

_STATE_ATTR = "_vstar_frame_parallel"


_NORM_GROUP: Scoped[RankGroup] = Scoped()  # set while a temporal module runs in the position layout


@dataclass
class FrameParallelState:
    """What ``enable_frame_parallel`` did to one UNet: its group and the classes it switched (path -> class)."""

    rg: RankGroup
    switched: dict[str, type]

    def __deepcopy__(self, memo: dict) -> FrameParallelState:
        """A copied model stays frame-parallel on the same group (a process group is a handle, not data)."""
        return FrameParallelState(self.rg, dict(self.switched))

    def __reduce__(self):
        raise TypeError("a frame-parallel model holds a torch.distributed process group, which cannot be pickled: "
                        "disable_frame_parallel(model) before pickling and enable it again after loading")


# ------------------------------------------------------------------------------------------------ GroupNorm
class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics, inside a temporal module in the position layout, are reduced over the group;
    elsewhere it is nn.GroupNorm.

    Per (sample, group) each rank takes its count, mean and variance with ``torch.var_mean`` (no temporary copy of
    its share), one all-reduce sums n, n·mean and n·(var + mean²) in float64, and the normalisation and the affine
    transform are one fused ``x · a + b`` per (sample, channel) in at least fp32: for fp32 inputs the output is the
    only tensor as large as the input (half inputs add one fp32 temporary)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rg = _NORM_GROUP.get()
        if rg is None:
            return super().forward(x)
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, -1)
        count = grouped.shape[-1]
        if count:
            var, mean = torch.var_mean(grouped, dim=-1, correction=0)
        else:  # this rank holds no element of these groups
            var = mean = x.new_zeros(batch, self.num_groups)
        var, mean = var.double(), mean.double()
        moments = all_reduce_sum(torch.stack([torch.full_like(mean, count), count * mean,
                                              count * (var + mean * mean)]), rg)
        total = moments[0]
        mean = moments[1] / total
        rstd = torch.rsqrt((moments[2] / total - mean * mean).clamp_min(0) + self.eps)
        per_channel = channels // self.num_groups  # (batch, groups) -> (batch, channels)
        scale = rstd.repeat_interleave(per_channel, dim=1)
        shift = -(mean * rstd).repeat_interleave(per_channel, dim=1)
        if self.affine:
            weight = self.weight.double()
            scale, shift = scale * weight, shift * weight + self.bias.double()
        shape = (batch, channels) + (1,) * (x.dim() - 2)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # half inputs: x·a + b cancels in fp32
        return torch.addcmul(shift.to(acc).reshape(shape), x.to(acc), scale.to(acc).reshape(shape)).to(x.dtype)


# --------------------------------------------------------------------------------------- temporal modules
def _run_temporal(module_forward, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Run a temporal module's own forward on (batch·F_rank, C, H, W) in the position layout (or replicated) and
    return this rank's frames; ``module_forward(x, num_frames=...)`` returns a tensor."""
    call = CALL.get()
    if call is None or num_frames != call.count:
        return module_forward(hidden_states, num_frames=num_frames)
    rg = call.rg
    height, width = hidden_states.shape[-2:]
    if height * width < rg.world:  # too few positions to split: every frame here, run whole, keep ours
        batch = hidden_states.shape[0] // num_frames
        full = gather_frames(hidden_states.reshape(batch, num_frames, *hidden_states.shape[1:]), call.frame_sizes,
                             1, rg)
        out = module_forward(full.flatten(0, 1), num_frames=call.frames)
        start = call.start
        return out.reshape(batch, call.frames, *out.shape[1:])[:, start:start + num_frames].flatten(0, 1)
    positions = frames_to_positions(hidden_states, call.frame_sizes, rg)
    token = _NORM_GROUP.set(rg)
    try:
        out = module_forward(positions, num_frames=call.frames)
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


def _split_frames(module: nn.Module, inputs: tuple, output: type, return_dict: bool, kwargs: dict,
                  whole: Callable[[], object], local: Callable[..., torch.Tensor], frames_dim: int = 2):
    """The UNet call on this rank's frames (``local(start, count, *inputs)``, frames on ``frames_dim`` of the
    sample, ``inputs[0]``, and of the output), gathered into the full output; ``whole()`` when frame parallelism is
    off for this call (world 1, fewer frames than ranks). ``inputs`` are the call's arguments (nested in tuples,
    lists and dicts); ``local`` gets them back, entered for autograd when it records (:func:`_replicated`)."""
    state: FrameParallelState | None = getattr(module, _STATE_ATTR, None)
    sample = inputs[0]
    frames = sample.shape[frames_dim]
    if state is None or state.rg.world == 1 or frames < state.rg.world or CALL.get() is not None:
        return whole()
    _check_call(sample, kwargs, state.rg)
    sizes = split_sizes(frames, state.rg.world)
    with _replicated(module, inputs, state.rg, refuse_checkpointing=True) as entered:
        token = CALL.set(FrameCall(state.rg, sizes))
        try:
            out = local(sum(sizes[:state.rg.rank]), sizes[state.rg.rank], *entered)
        finally:
            CALL.reset(token)
    out = gather_output(out, sizes, frames_dim, state.rg)
    return output(sample=out) if return_dict else (out,)


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) in (tuple, list):
        return type(obj)(_map_tensors(item, fn) for item in obj)
    if type(obj) is dict:
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    return obj


@contextmanager
def _replicated(module: nn.Module, inputs: tuple, rg: RankGroup, refuse_checkpointing: bool = False
                ) -> Iterator[tuple]:
    """While autograd records (grad enabled, a parameter of ``module`` or a tensor in ``inputs`` requiring grad),
    those parameters are swapped, for the duration, for views from :func:`.layout.enter_replicated` (and those
    inputs, yielded in their place): every rank's share contributes to their gradients, which the views' backward
    sums over the ranks, so each rank's parameters and inputs get the whole call's gradient. Otherwise ``inputs``
    unchanged, nothing swapped. ``refuse_checkpointing``: NotImplementedError, before any collective, if autograd
    records and a submodule has gradient checkpointing on."""
    if not torch.is_grad_enabled():
        yield inputs
        return
    leaves: dict[int, torch.Tensor] = {}
    slots: list[tuple[nn.Module, str, torch.Tensor]] = []
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.requires_grad:
                leaves.setdefault(id(param), param)
                slots.append((sub, name, param))
    _map_tensors(inputs, lambda t: leaves.setdefault(id(t), t) if t.requires_grad else t)
    if not leaves:
        yield inputs
        return
    if refuse_checkpointing:
        _check_no_checkpointing(module)
    views = dict(zip(leaves, enter_replicated(list(leaves.values()), rg), strict=True))
    for sub, name, param in slots:
        sub._parameters[name] = views[id(param)]
    try:
        yield _map_tensors(inputs, lambda t: views.get(id(t), t))
    finally:
        for sub, name, param in slots:
            sub._parameters[name] = param


def _frame_rows(t: torch.Tensor | None, batch: int, frames: int, start: int, count: int) -> torch.Tensor | None:
    """This rank's rows of a per-frame tensor of batch·frames rows (as AnimateDiff passes the prompt); else ``t``."""
    if t is None or frames == 1 or t.shape[0] != batch * frames:
        return t
    return t.reshape(batch, frames, *t.shape[1:])[:, start:start + count].flatten(0, 1)


class FrameParallelUNet3D(UNet3DConditionModel):
    """UNet3DConditionModel whose forward splits the frames over the ranks and gathers the output."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        _check_positional(args)

        def local(start, n, sample, timestep, encoder_hidden_states, args, kwargs):
            return UNet3DConditionModel.forward(self, sample[:, :, start:start + n], timestep, encoder_hidden_states,
                                                *args, return_dict=False, **kwargs)[0]

        return _split_frames(
            self, (sample, timestep, encoder_hidden_states, args, kwargs), UNet3DConditionOutput, return_dict, kwargs,
            lambda: UNet3DConditionModel.forward(self, sample, timestep, encoder_hidden_states, *args,
                                                 return_dict=return_dict, **kwargs),
            local)


class FrameParallelUNetMotion(UNetMotionModel):
    """UNetMotionModel (AnimateDiff, PIA, SparseCtrl's UNet) whose forward splits the frames over the ranks; the
    prompt rows, one per frame, are split with them."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        _check_positional(args)
        batch, frames = sample.shape[0], sample.shape[2]

        def local(start, n, sample, timestep, encoder_hidden_states, args, kwargs):
            return UNetMotionModel.forward(self, sample[:, :, start:start + n], timestep,
                                           _frame_rows(encoder_hidden_states, batch, frames, start, n), *args,
                                           return_dict=False, **kwargs)[0]

        return _split_frames(
            self, (sample, timestep, encoder_hidden_states, args, kwargs), UNetMotionOutput, return_dict, kwargs,
            lambda: UNetMotionModel.forward(self, sample, timestep, encoder_hidden_states, *args,
                                            return_dict=return_dict, **kwargs),
            local)


class FrameParallelTemporalEncoder(I2VGenXLTransformerTemporalEncoder):
    """I2VGen-XL's temporal encoder of the image latents ((batch·H·W, F, C) tokens, at the input resolution): every
    frame gathered, run replicated, this rank's frames kept."""

    def forward(self, hidden_states):
        call = CALL.get()
        if call is None or hidden_states.shape[1] != call.count:
            return I2VGenXLTransformerTemporalEncoder.forward(self, hidden_states)
        out = I2VGenXLTransformerTemporalEncoder.forward(self, gather_frames(hidden_states, call.frame_sizes, 1,
                                                                             call.rg))
        start = call.start
        return out[:, start:start + call.count]


class FrameParallelI2VGenXLUNet(I2VGenXLUNet):
    """I2VGenXLUNet whose forward splits the frames of ``sample`` and ``image_latents`` over the ranks; the image
    context still comes from the first frame of the full ``image_latents``."""

    def forward(self, sample, timestep, fps, image_latents, *args, return_dict=True, **kwargs):
        _check_positional(args, limit=4)

        def local(start, n, sample, timestep, fps, image_latents, args, kwargs):
            first = image_latents[:, :, :1].permute(0, 2, 1, 3, 4).flatten(0, 1)  # what the context embedding takes
            hook = self.image_latents_context_embedding.register_forward_pre_hook(lambda _m, _a: (first,))
            try:
                return I2VGenXLUNet.forward(self, sample[:, :, start:start + n], timestep, fps,
                                            image_latents[:, :, start:start + n], *args, return_dict=False,
                                            **kwargs)[0]
            finally:
                hook.remove()

        return _split_frames(
            self, (sample, timestep, fps, image_latents, args, kwargs), UNet3DConditionOutput, return_dict, kwargs,
            lambda: I2VGenXLUNet.forward(self, sample, timestep, fps, image_latents, *args, return_dict=return_dict,
                                         **kwargs),
            local)


class FrameParallelTemporalBlock(TemporalBasicTransformerBlock):
    """SVD's temporal transformer block ((batch·F, H·W, C) tokens and one context row per (sample, position)),
    frame-parallel: every frame and this rank's positions (the context rows of those positions)."""

    def forward(self, hidden_states, num_frames, encoder_hidden_states=None):
        call = CALL.get()
        if call is None or num_frames != call.count:
            return TemporalBasicTransformerBlock.forward(self, hidden_states, num_frames, encoder_hidden_states)
        positions, rg = hidden_states.shape[1], call.rg
        batch = hidden_states.shape[0] // num_frames
        shares = split_sizes(positions, rg.world)

        def own(x: torch.Tensor, num_frames: int) -> torch.Tensor:  # x: (batch·F, C, 1, P) -> same
            context = encoder_hidden_states
            if context is not None and x.shape[-1] != positions:  # this rank's positions' context rows
                start = sum(shares[:rg.rank])
                context = context.reshape(batch, positions, *context.shape[1:])[:, start:start + x.shape[-1]]
                context = context.flatten(0, 1)
            tokens = TemporalBasicTransformerBlock.forward(self, x.flatten(2).transpose(1, 2), num_frames, context)
            return tokens.transpose(1, 2).unsqueeze(2)

        image = hidden_states.transpose(1, 2).unsqueeze(2)  # (batch·F_rank, C, 1, H·W)
        return _run_temporal(own, image, num_frames).flatten(2).transpose(1, 2)


class FrameParallelTemporalResnet(TemporalResnetBlock):
    """SVD's temporal ResNet block ((batch, C, F, H, W) with a per-frame time embedding), frame-parallel."""

    def forward(self, input_tensor, temb):
        call = CALL.get()
        frames_here = input_tensor.shape[2]
        if call is None or frames_here != call.count:
            return TemporalResnetBlock.forward(self, input_tensor, temb)
        batch = input_tensor.shape[0]
        temb_all = None if temb is None else gather_frames(temb, call.frame_sizes, 1, call.rg)

        def own(x: torch.Tensor, num_frames: int) -> torch.Tensor:  # (batch·F, C, h, w) -> same
            video = x.reshape(batch, num_frames, *x.shape[1:]).transpose(1, 2)
            return TemporalResnetBlock.forward(self, video, temb_all).transpose(1, 2).flatten(0, 1)

        out = _run_temporal(own, input_tensor.transpose(1, 2).flatten(0, 1), frames_here)
        return out.reshape(batch, frames_here, *out.shape[1:]).transpose(1, 2)


class FrameParallelSpatioTemporal(TransformerSpatioTemporalModel):
    """SVD's spatio-temporal transformer: its frame-index embedding counts from this rank's first frame."""

    def forward(self, *args, **kwargs):
        call = CALL.get()
        if call is None:
            return TransformerSpatioTemporalModel.forward(self, *args, **kwargs)
        first = call.start
        hook = self.time_proj.register_forward_pre_hook(lambda _m, inputs: (inputs[0] + first,))
        try:
            return TransformerSpatioTemporalModel.forward(self, *args, **kwargs)
        finally:
            hook.remove()


class FrameParallelUNetSpatioTemporal(UNetSpatioTemporalConditionModel):
    """UNetSpatioTemporalConditionModel (Stable Video Diffusion; frames on dim 1) split over the ranks."""

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
        def local(start, n, sample, timestep, encoder_hidden_states, added_time_ids):
            return UNetSpatioTemporalConditionModel.forward(self, sample[:, start:start + n], timestep,
                                                            encoder_hidden_states, added_time_ids,
                                                            return_dict=False)[0]

        return _split_frames(
            self, (sample, timestep, encoder_hidden_states, added_time_ids), UNetSpatioTemporalConditionOutput,
            return_dict, {},
            lambda: UNetSpatioTemporalConditionModel.forward(self, sample, timestep, encoder_hidden_states,
                                                             added_time_ids, return_dict=return_dict),
            local, frames_dim=1)


class FrameParallelAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose ``decode`` of a batch of frame latents decodes this rank's share and gathers the rest."""

    def decode(self, z, return_dict=True, generator=None):
        state: FrameParallelState | None = getattr(self, _STATE_ATTR, None)
        if state is None or state.rg.world == 1 or z.shape[0] < state.rg.world:
            return AutoencoderKL.decode(self, z, return_dict=return_dict, generator=generator)
        state.rg.check_device(z.device)
        sizes = split_sizes(z.shape[0], state.rg.world)
        start = sum(sizes[:state.rg.rank])
        with _replicated(self, (z,), state.rg) as (z,):
            local = AutoencoderKL.decode(self, z[start:start + sizes[state.rg.rank]], return_dict=False)[0]
        out = gather_output(local, sizes, 0, state.rg)
        return DecoderOutput(sample=out) if return_dict else (out,)


# diffusers class -> its frame-parallel subclass
UNET_CLASSES: dict[type, type] = {UNet3DConditionModel: FrameParallelUNet3D, UNetMotionModel: FrameParallelUNetMotion,
                                  I2VGenXLUNet: FrameParallelI2VGenXLUNet,
                                  UNetSpatioTemporalConditionModel: FrameParallelUNetSpatioTemporal}
TEMPORAL_CLASSES: dict[type, type] = {TransformerTemporalModel: FrameParallelTransformerTemporal,
                                      TemporalConvLayer: FrameParallelTemporalConv,
                                      AnimateDiffTransformer3D: FrameParallelMotionTransformer,
                                      I2VGenXLTransformerTemporalEncoder: FrameParallelTemporalEncoder,
                                      TemporalBasicTransformerBlock: FrameParallelTemporalBlock,
                                      TemporalResnetBlock: FrameParallelTemporalResnet}
# switched without their GroupNorms (those normalise single frames)
FRAME_INDEX_CLASSES: dict[type, type] = {TransformerSpatioTemporalModel: FrameParallelSpatioTemporal}


def _check_positional(args: tuple, limit: int = 4) -> None:
    """NotImplementedError for positional arguments past ``cross_attention_kwargs`` (ControlNet residuals)."""
    if len(args) > limit:
        raise NotImplementedError("frame parallelism does not split ControlNet residuals yet (positional "
                                  "arguments past cross_attention_kwargs); disable_frame_parallel first")


def _check_call(sample: torch.Tensor, kwargs: dict, rg: RankGroup) -> None:
    """Refuse, before any collective, what the split cannot carry."""
    rg.check_device(sample.device)
    extra = [name for name in ("down_block_additional_residuals", "mid_block_additional_residual")
             if kwargs.get(name) is not None]
    if extra:
        raise NotImplementedError(f"frame parallelism does not split ControlNet residuals yet ({', '.join(extra)}); "
                                  "disable_frame_parallel first")


def _check_no_checkpointing(module: nn.Module) -> None:
    """NotImplementedError when a submodule of ``module`` has gradient checkpointing on (called while autograd
    records, when diffusers checkpoints): its recompute in backward would run outside the frame-parallel call, where
    the temporal modules see only this rank's frames. (A mechanism that restores the call's state during the
    recompute would lift this.)"""
    checkpointed = [name or type(module).__name__ for name, sub in module.named_modules()
                    if getattr(sub, "gradient_checkpointing", False) is True]
    if checkpointed:
        raise NotImplementedError(
            "frame parallelism does not support gradient checkpointing yet: its recompute in backward runs outside "
            "the frame-parallel call, so the temporal modules would see only this rank's frames (gradient "
            f"checkpointing is on in {', '.join(checkpointed[:3])}{', ...' if len(checkpointed) > 3 else ''}). "
            "Call disable_gradient_checkpointing() on the UNet to train frame-parallel, or run inference under "
            "torch.no_grad()")


# ---------------------------------------------------------------------------------------------- public API
def enable_frame_parallel(model, group=None) -> FrameParallelState:
    """Split every forward of ``model``'s UNet (a UNet or a pipeline with ``.unet``) by frames over ``group``
    (default: the default process group, initialised from torchrun's environment if needed). For a pipeline, its
    AutoencoderKL also decodes each rank's share of the frames and gathers them.

    Supported: UNet3DConditionModel (ModelScope / zeroscope), UNetMotionModel (AnimateDiff), I2VGenXLUNet and
    UNetSpatioTemporalConditionModel (Stable Video Diffusion). Composes with ``apply_tar`` and frame positions. A
    world of 1 is a no-op. Raises TypeError for other models and a clear error for a bad group or a device the
    group's backend cannot move, before any collective. Returns the state (its ``rg`` names rank and world)."""
    from ..diffusers.shared.components import unet_of

    unet = unet_of(model)
    if type(unet) not in UNET_CLASSES and type(unet) not in UNET_CLASSES.values():
        raise TypeError(f"frame parallelism supports {', '.join(c.__name__ for c in UNET_CLASSES)}; got "
                        f"{type(unet).__name__}")
    device = next(unet.parameters()).device
    rg = resolve_group(group, device)
    disable_frame_parallel(unet)
    switched: dict[str, type] = {"": type(unet)}
    for name, module in unet.named_modules():
        if type(module) in FRAME_INDEX_CLASSES:
            switched[name] = type(module)
        if type(module) in TEMPORAL_CLASSES:
            switched[name] = type(module)
            for sub_name, sub in module.named_modules():
                if type(sub) is nn.GroupNorm:
                    switched[f"{name}.{sub_name}"] = nn.GroupNorm
    for name, cls in switched.items():
        target = unet.get_submodule(name)
        target.__class__ = (UNET_CLASSES.get(cls) or TEMPORAL_CLASSES.get(cls) or FRAME_INDEX_CLASSES.get(cls)
                            or SplitGroupNorm)
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
    from ..diffusers.shared.components import unet_of

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
    from ..diffusers.shared.components import unet_of

    return getattr(unet_of(model), _STATE_ATTR, None)


__all__ = ["FrameParallelState", "SplitGroupNorm", "disable_frame_parallel", "enable_frame_parallel",
           "frame_parallel_state"]
