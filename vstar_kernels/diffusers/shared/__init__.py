"""What the UNet integration (:mod:`..unet`) and the video-transformer integration (:mod:`..dit`) share: reaching a
model's parts and putting processors and hooks back (:mod:`.components`), the step window at run time
(:mod:`.step_window`) and the ``apply_tar`` arguments both validate alike (:mod:`.arguments`).

Imports nothing of ``unet`` or ``dit``: both build on it, never the other way.
"""
