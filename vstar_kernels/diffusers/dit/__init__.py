"""TAR and synopsis prompting on video diffusion transformers (Wan, CogVideoX, LTX-Video, HunyuanVideo).

- :mod:`.video_transformers`: the supported classes (:class:`~.video_transformers.VideoTransformerSpec`), their blocks,
  text position and frame geometry.
- :mod:`.processor`: :class:`~.processor.DiTTARProcessor`, the model's own processor code with its attention routed
  to the op.
- :mod:`.patching`: apply/remove TAR on a transformer, :class:`~.patching.DiTGate`, :class:`~.patching.DiTTARHandle`.
- :mod:`.synopsis`: per-frame text on the cross-attention (Wan, LTX-Video).
- :mod:`.model_patch`: what one application changed on one transformer, attached and detached the same way for both.
- :mod:`.context_parallel`: diffusers' context parallelism as TAR sees it; HunyuanVideo's plan.

Builds on :mod:`..shared` only; never imports :mod:`..unet`. The public entry points (``apply_tar`` etc. in
:mod:`vstar_kernels.diffusers`) choose between this package and :mod:`..unet`.
"""
