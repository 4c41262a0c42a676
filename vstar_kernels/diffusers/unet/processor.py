"""The UNets' TAR attention processor: diffusers' AttnProcessor2_0 semantics with the temporal attention fused.

Data flow: processor -> :func:`vstar_kernels.tar_attention` -> backend. The projections' (B·H·W, F, heads·d)
outputs are viewed as (B·H·W, F, heads, d) and handed over without copies; the result reshapes back for free.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ...ops import tar_attention
from ...profiles import FrameProfile
from ...reference import tar_attention_reference
from ..shared.step_window import TARSwitch, by_step_window

logger = logging.getLogger(__name__)


def project_heads(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a diffusers ``Attention`` as (batch, frames, heads, head_dim) views of its projections (no
    copies), with group_norm, norm_cross and norm_q/norm_k applied as AttnProcessor2_0 applies them.
    ``hidden_states`` is (batch, frames, channels); without ``encoder_hidden_states`` it is self-attention."""
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        context = hidden_states
    else:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    batch, head_dim = hidden_states.shape[0], key.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


class TARAttnProcessor:
    """Temporal self-attention with Temporal Attention Regularization (a plain object, not an nn.Module).

    Constructible with no arguments (IP-Adapter re-creates processors that way): then it is plain attention.
    With a ``switch`` that is off, it is plain attention too: the same SDPA call as AttnProcessor2_0, bit for bit.
    With a ``profile`` (a :class:`~vstar_kernels.FrameProfile`, which holds its own band) the op gets that profile;
    ``sigma`` then only names the band's width for reading.
    """

    _warned_mask = False
    materialise = False  # True: always run the materialised reference (MaterialisedTARProcessor)

    def __init__(
        self,
        sigma: float | None = None,
        strength: float = 1.0,
        mode: str = "relative",
        backend: str = "auto",
        switch: TARSwitch | None = None,
        profile: FrameProfile | None = None,
    ) -> None:
        self.sigma = sigma
        self.strength = strength
        self.mode = mode
        self.backend = backend
        self.switch = switch
        self.profile = profile

    @property
    def configured(self) -> bool:
        """Built with a band or a profile (not the plain processor IP-Adapter re-creates without arguments)."""
        return self.sigma is not None or self.profile is not None

    @property
    def active(self) -> bool:
        return self.configured and (self.switch is None or self.switch.active)

    def bias_kwargs(self) -> dict[str, object]:
        """The op's bias arguments: ``profile=`` when built with one, else ``sigma``, ``strength`` and ``mode``."""
        if self.profile is not None:
            return {"profile": self.profile}
        return {"sigma": self.sigma, "strength": self.strength, "mode": self.mode}

    def __repr__(self) -> str:
        if self.profile is not None:
            return f"{type(self).__name__}(profile={self.profile!r})"
        return f"{type(self).__name__}(sigma={self.sigma}, strength={self.strength}, mode={self.mode!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = project_heads(attn, hidden_states, encoder_hidden_states)

        out = self._attend(q, k, v, attn.scale, attention_mask)
        hidden_states = out.reshape(batch_size, -1, attn.heads * v.shape[-1]).to(v.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, q, k, v, scale: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """TAR or plain attention on (batch, frames, heads, head_dim), as the step window says (traced: both branches
        in the graph, one runs: no graph break, no recompile per step); plain when built without a sigma."""
        def with_tar(q, k, v):
            return self._with_tar(q, k, v, scale, attention_mask)

        def without_tar(q, k, v):
            return self._without_tar(q, k, v, scale, attention_mask)

        if not self.configured:
            return without_tar(q, k, v)
        return by_step_window(self.switch, with_tar, without_tar, q, k, v)

    def _without_tar(self, q, k, v, scale: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """TAR off (outside the step window, or built without arguments): exactly AttnProcessor2_0's SDPA call, so
        those steps are bit-identical to the unpatched model; the materialised processor runs its reference."""
        if self.materialise:
            return self._reference(q, k, v, scale, attention_mask, {"sigma": 1.0, "strength": 0.0})
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale)
        return out.transpose(1, 2)

    def _with_tar(self, q, k, v, scale: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None or self.materialise:
            if attention_mask is not None and not TARAttnProcessor._warned_mask:
                logger.warning("TARAttnProcessor: an attention_mask is set; using the materialised reference "
                               "(correct, not fused)")
                TARAttnProcessor._warned_mask = True
            return self._reference(q, k, v, scale, attention_mask, self.bias_kwargs())
        return tar_attention(q, k, v, scale=scale, backend=self.backend, **self.bias_kwargs())

    @staticmethod
    def _reference(q, k, v, scale: float, attention_mask: torch.Tensor | None, bias: dict) -> torch.Tensor:
        return tar_attention_reference(q, k, v, scale=scale, attn_mask=attention_mask, **bias)


class MaterialisedTARProcessor(TARAttnProcessor):
    """The official method's memory behaviour, for benchmarks: scores, ΔA and probabilities materialised per layer
    (B·H·W·heads x F x F) through :func:`vstar_kernels.tar_attention_reference`. Same results, far more memory."""

    materialise = True
