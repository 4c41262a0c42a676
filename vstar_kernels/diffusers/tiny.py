"""Tiny offline diffusers pipelines with random weights (no hub access): tokenizer, text encoder, VAE, UNets.

They exist for ``vstar-kernels demo``, the tests and the benchmarks: real diffusers classes end to end, built from
configs in a second, producing noise (the weights are random) with the memory and time behaviour of the real thing.
"""

from __future__ import annotations

import torch


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes map to themselves, the others to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32)


# Every released AnimateDiff motion adapter (v1.5 v2/v3, AnimateLCM, the SDXL beta, PIA) ships motion_max_seq_length
# = 32: builders here use it, never the frame count, so long runs meet the real table limit.
RELEASED_MOTION_POSITIONS = 32
ANIMATEDIFF_FAMILIES = ("animatediff", "animatediff-sdxl", "pia")


def _cross_attention_split(levels: int) -> int:
    """How many levels have cross-attention blocks: all of two, else all but the deepest (SD1.5 / ModelScope)."""
    return levels if levels <= 2 else levels - 1


def tiny_unet3d(block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1):
    """A UNet3DConditionModel (ModelScope/zeroscope layout) with one cross-attention down/up block per level except
    the deepest down and first up block when there are more than two levels; heads = channels / 8. The released
    layout is ``block_out_channels`` of four levels with ``layers_per_block=2``."""
    from diffusers import UNet3DConditionModel

    levels = len(block_out_channels)
    cross = _cross_attention_split(levels)
    torch.manual_seed(0)
    return UNet3DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D",) * cross + ("DownBlock3D",) * (levels - cross),
        up_block_types=("UpBlock3D",) * (levels - cross) + ("CrossAttnUpBlock3D",) * cross,
    ).eval()


def tiny_svd_unet(block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1):
    """A UNetSpatioTemporalConditionModel (Stable Video Diffusion layout: cross-attention on all but the deepest of
    more than two levels, 8 input channels, 3 added time ids); heads = channels / 16. Released: four levels,
    ``layers_per_block=2``."""
    from diffusers import UNetSpatioTemporalConditionModel

    levels = len(block_out_channels)
    cross = _cross_attention_split(levels)
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=32,
        num_attention_heads=tuple(c // 16 for c in block_out_channels),
        down_block_types=(("CrossAttnDownBlockSpatioTemporal",) * cross
                          + ("DownBlockSpatioTemporal",) * (levels - cross)),
        up_block_types=("UpBlockSpatioTemporal",) * (levels - cross) + ("CrossAttnUpBlockSpatioTemporal",) * cross,
        in_channels=8, out_channels=4, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
    ).eval()


def tiny_i2vgen_unet(block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1):
    """An I2VGenXLUNet (its released layout: cross-attention on all but the deepest of more than two levels, 64-wide
    heads there, 8 here). Released: four levels, ``layers_per_block=2``."""
    from diffusers import I2VGenXLUNet

    levels = len(block_out_channels)
    cross = _cross_attention_split(levels)
    torch.manual_seed(0)
    return I2VGenXLUNet(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=32,
        attention_head_dim=8, num_attention_heads=None, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D",) * cross + ("DownBlock3D",) * (levels - cross),
        up_block_types=("UpBlock3D",) * (levels - cross) + ("CrossAttnUpBlock3D",) * cross,
    ).eval()


def tiny_motion_adapter(block_out_channels: tuple[int, ...] = (32, 64, 64, 64), *, motion_layers_per_block: int = 2,
                        use_motion_mid_block: bool = True, conv_in_channels: int | None = None):
    """A MotionAdapter with a released adapter's structure (8 heads, 32-row position tables), narrower. Defaults:
    AnimateDiff v1.5 v2; v3 and PIA have no mid block, PIA takes ``conv_in_channels=9``."""
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    return MotionAdapter(
        block_out_channels=block_out_channels, motion_layers_per_block=motion_layers_per_block,
        motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=RELEASED_MOTION_POSITIONS,
        use_motion_mid_block=use_motion_mid_block, conv_in_channels=conv_in_channels,
    )


def tiny_unet2d(block_out_channels: tuple[int, ...] = (32, 64, 64, 64), layers_per_block: int = 2, *,
                sdxl: bool = False):
    """The image UNet an adapter plugs into: SD1.5's layout (cross-attention on all but the deepest level) or,
    with ``sdxl``, SDXL's (no cross-attention at the top level, transformer depth 1/2/10, text_time conditioning
    with a 32-wide pooled embedding and 8-wide time ids)."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    torch.manual_seed(0)
    if sdxl:
        return UNet2DConditionModel(
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            transformer_layers_per_block=(1, 2, 10)[:levels], addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    cross = _cross_attention_split(levels)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",) * (levels - cross),
        up_block_types=("UpBlock2D",) * (levels - cross) + ("CrossAttnUpBlock2D",) * cross,
    )


def tiny_animatediff_unet(family: str = "animatediff", block_out_channels: tuple[int, ...] | None = None,
                          layers_per_block: int = 2):
    """A UNetMotionModel with a released family's layer structure and 32-row position tables, narrower:

    - "animatediff": SD1.5 (4 levels) + the v1.5 v2 adapter (motion mid block);
    - "animatediff-sdxl": SDXL (3 levels) + the SDXL beta adapter (no mid block);
    - "pia": SD1.5 + PIA's adapter (no mid block, 9 input channels: latents, mask, image latents).
    """
    from diffusers import UNetMotionModel

    if family not in ANIMATEDIFF_FAMILIES:
        raise ValueError(f"family must be one of {ANIMATEDIFF_FAMILIES}, got {family!r}")
    sdxl = family == "animatediff-sdxl"
    channels = block_out_channels or ((32, 64, 64) if sdxl else (32, 64, 64, 64))
    unet2d = tiny_unet2d(channels, layers_per_block, sdxl=sdxl)
    adapter = tiny_motion_adapter(channels, motion_layers_per_block=layers_per_block,
                                  use_motion_mid_block=family == "animatediff",
                                  conv_in_channels=9 if family == "pia" else None)
    return UNetMotionModel.from_unet2d(unet2d, adapter).eval(), adapter


def text_to_video_pipeline(unet=None):
    """TextToVideoSDPipeline (the ModelScope/zeroscope pipeline) around ``unet`` (default :func:`tiny_unet3d`)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    unet = tiny_unet3d() if unet is None else unet
    tokenizer = tiny_tokenizer()
    return TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                 unet=unet, scheduler=DDIMScheduler())


def animatediff_pipeline(unet, motion_adapter):
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    tokenizer = tiny_tokenizer()
    return AnimateDiffPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                               unet=unet, motion_adapter=motion_adapter, scheduler=DDIMScheduler(),
                               feature_extractor=None, image_encoder=None)


def tiny_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, intermediate_size=37, patch_size=4)
    return CLIPVisionModelWithProjection(config)


def tiny_feature_extractor():
    try:  # transformers >= 5 names the PIL backend explicitly (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(crop_size=32, size=32)


def svd_pipeline(unet):
    """StableVideoDiffusionPipeline with SVD's own scheduler configuration (EDM, continuous timesteps)."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                       down_block_types=["DownEncoderBlock2D"] * 2)
    scheduler = EulerDiscreteScheduler(interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
                                       sigma_min=0.002, timestep_spacing="leading", timestep_type="continuous",
                                       use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=tiny_image_encoder(), unet=unet, scheduler=scheduler,
                                        feature_extractor=tiny_feature_extractor())


def i2vgen_pipeline(unet):
    from diffusers import DDIMScheduler, I2VGenXLPipeline

    tokenizer = tiny_tokenizer()
    return I2VGenXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                            image_encoder=tiny_image_encoder(), feature_extractor=tiny_feature_extractor(), unet=unet,
                            scheduler=DDIMScheduler())
