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


def tiny_unet3d(block_out_channels: tuple[int, ...] = (32, 64)):
    """A UNet3DConditionModel (ModelScope/zeroscope layout) with one cross-attention down/up block per level except
    the deepest down and first up block when there are more than two levels; heads = channels / 8."""
    from diffusers import UNet3DConditionModel

    levels = len(block_out_channels)
    cross = levels if levels <= 2 else levels - 1
    torch.manual_seed(0)
    return UNet3DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock3D",) * cross + ("DownBlock3D",) * (levels - cross),
        up_block_types=("UpBlock3D",) * (levels - cross) + ("CrossAttnUpBlock3D",) * cross, norm_num_groups=32,
    ).eval()


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
