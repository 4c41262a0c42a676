"""Tiny offline diffusers pipelines with random weights (no hub access): tokenizer, text encoder, VAE, UNets.

They exist for ``vstar-kernels demo``, the tests and the benchmarks: real diffusers classes end to end, built from
configs in a second, producing noise (the weights are random) with the memory and time behaviour of the real thing.
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch


class KnownNoise(logging.Filter):
    """Drops the library warnings that these tiny builders and the demo cause, which say nothing about the user's
    setup.

    Each entry: (logger, message pattern, why it is noise here). What is not listed still prints.
    """

    RULES = (
        ("diffusers.pipelines.pipeline_utils", r"^The TextToVideoSDPipeline has been deprecated",
         "the tiny modelscope pipeline is a TextToVideoSDPipeline on purpose: the released UNet3D's class"),
        ("diffusers.models.modeling_utils", r"should be kept in float32: \[\]",
         "an empty list: no module is kept in float32, so moving the pipeline changes nothing"),
        ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to",
         "diffusers' IP-adapter loader imports image processors the tiny pipelines never use; PIL serves them"),
    )

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def known_noise_silenced():
    """Installs :class:`KnownNoise` on the loggers that emit the listed records (a filter on a logger sees only
    its own records, not its children's) for the duration."""
    installed = []
    for name, pattern, _why in KnownNoise.RULES:
        logger, noise = logging.getLogger(name), KnownNoise(pattern)
        logger.addFilter(noise)
        installed.append((logger, noise))
    try:
        yield
    finally:
        for logger, noise in installed:
            logger.removeFilter(noise)


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


@known_noise_silenced()
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


@known_noise_silenced()
def text_to_video_pipeline(unet=None):
    """TextToVideoSDPipeline (the ModelScope/zeroscope pipeline) around ``unet`` (default :func:`tiny_unet3d`)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    unet = tiny_unet3d() if unet is None else unet
    tokenizer = tiny_tokenizer()
    return TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                 unet=unet, scheduler=DDIMScheduler())


@known_noise_silenced()
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


@known_noise_silenced()
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


@known_noise_silenced()
def i2vgen_pipeline(unet):
    from diffusers import DDIMScheduler, I2VGenXLPipeline

    tokenizer = tiny_tokenizer()
    return I2VGenXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                            image_encoder=tiny_image_encoder(), feature_extractor=tiny_feature_extractor(), unet=unet,
                            scheduler=DDIMScheduler())


# ------------------------------------------------------------------------------------------ video transformers
# Each builder keeps the released model's structure (patch sizes, QK norm, RoPE tables and axes, text length, block
# kinds) and narrows only widths, heads and depth. Released configs: Wan2.1-T2V-1.3B, CogVideoX-5b, LTX-Video 0.9,
# HunyuanVideo.
def tiny_wan_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 24):
    """Wan 2.1 T2V: patch (1, 2, 2), rms_norm_across_heads, RoPE table of 1024 positions; ``heads`` x ``head_dim``,
    default 2 x 24 (released: 12 x 128 for 1.3B; context parallelism's Ulysses needs heads divisible by its
    degree)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                 rope_max_seq_len=1024)


def tiny_wan_i2v_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 24):
    """Wan 2.1 I2V: :func:`tiny_wan_transformer` plus the image branch (36 input channels: noise, mask and the
    image latent; CLIP image tokens through ``added_kv_proj_dim`` into the cross-attention)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, image_dim=16, added_kv_proj_dim=heads * head_dim, rope_max_seq_len=1024)


def tiny_cogvideox_transformer(num_layers: int = 2):
    """CogVideoX-5b: patch 2 per frame, text (226 tokens) first, RoPE on the video part; 2 heads x 16 (released: 48 x
    64)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                                       time_embed_dim=32, text_embed_dim=32, num_layers=num_layers, patch_size=2,
                                       sample_width=90, sample_height=60, sample_frames=49,
                                       temporal_compression_ratio=4, max_text_seq_length=226,
                                       use_rotary_positional_embeddings=True)


def cogvideox_rotary_embedding(model, frames: int, height: int, width: int):
    """CogVideoX's 3D RoPE for a latent of ``frames`` x ``height`` x ``width`` (what its pipeline computes)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = model.config.patch_size
    grid_h, grid_w = height // p, width // p
    base_h, base_w = model.config.sample_height // p, model.config.sample_width // p
    return get_3d_rotary_pos_embed(embed_dim=model.config.attention_head_dim,
                                   crops_coords=((0, 0), (grid_h, grid_w)) if grid_h <= base_h else None,
                                   grid_size=(grid_h, grid_w), temporal_size=frames, grid_type="slice",
                                   max_size=(base_h, base_w))


def tiny_ltx_transformer(num_layers: int = 2, heads: int = 2, head_dim: int = 16):
    """LTX-Video 0.9: patch 1 x 1 (the VAE patchifies), rms_norm_across_heads, cross-attention to the caption;
    ``heads`` x ``head_dim``, default 2 x 16 (released: 32 x 64, 128 latent channels)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
                                      num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=32,
                                      num_layers=num_layers, qk_norm="rms_norm_across_heads", caption_channels=32)


def tiny_hunyuan_transformer(num_layers: int = 1, num_single_layers: int = 1, heads: int = 2):
    """HunyuanVideo: patch 2 (1 in time), double- then single-stream blocks with the text last, RoPE axes split like
    the released (16, 56, 56) of 128; ``heads`` x 32 (released: 24 x 128, 20 + 40 blocks)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=heads,
                                          attention_head_dim=32,
                                          num_layers=num_layers, num_single_layers=num_single_layers,
                                          num_refiner_layers=1, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                                          text_embed_dim=32, pooled_projection_dim=8, rope_axes_dim=(4, 14, 14))


def tiny_t5_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer standing in for Wan's UMT5 tokenizer: pad 0, eos 1, unknown 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@known_noise_silenced()
def wan_pipeline(transformer=None):
    """WanPipeline with a tiny UMT5 encoder, Wan VAE and ``transformer`` (default :func:`tiny_wan_transformer`)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                               relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=transformer if transformer is not None else tiny_wan_transformer())


@known_noise_silenced()
def ltx_pipeline(transformer=None):
    """LTXPipeline with a tiny T5 encoder, an LTX-Video VAE of the released compression (8 in time, 32 in space: three
    spatio-temporal downsamplings and patch 4; 128 latent channels) and ``transformer`` (default
    :func:`tiny_ltx_transformer`)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                           relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, True, False),
                                decoder_spatio_temporal_scaling=(True, True, True, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tiny_t5_tokenizer(),
                       transformer=transformer if transformer is not None else tiny_ltx_transformer())
