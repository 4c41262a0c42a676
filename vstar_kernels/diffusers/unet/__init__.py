"""TAR and synopsis prompting on diffusers video UNets (UNet3D/zeroscope, AnimateDiff, I2VGen-XL, SVD).

- :mod:`.discovery`: the temporal self-attention layers and their latent level.
- :mod:`.processor`: :class:`~.processor.TARAttnProcessor` (AttnProcessor2_0 with TAR fused) and the materialised one.
- :mod:`.patching`: apply/remove TAR on a UNet, :class:`~.patching.TARHandle`.
- :mod:`.frame_positions`: AnimateDiff's frame-position tables past their length.
- :mod:`.synopsis`: per-frame text on the spatial cross-attention.
- :mod:`.attention_maps`: record and plot the temporal attention maps.

Builds on :mod:`..shared` only; never imports :mod:`..dit`. The public entry points (``apply_tar`` etc. in
:mod:`vstar_kernels.diffusers`) choose between this package and :mod:`..dit`.
"""
