"""Tiny random-weight HunyuanVideo-1.5 text- and image-to-video pipelines, built fully offline.

Same classes and wiring as ``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v`` (a Qwen2.5-VL text
model read two layers from the top, a byT5 glyph encoder run for quoted text in the prompt, a
``ClassifierFreeGuidance`` guider that makes two transformer calls per step, ``AutoencoderKLHunyuanVideo15``,
flow-matching Euler), small enough that a 5-frame 32x32 call takes tens of milliseconds on CPU.

Shapes (real 720p_t2v in brackets):

* Text encoder: ``Qwen2_5_VLTextModel`` width 32 [3584], 3 layers [28], the tiny Qwen tokenizer; the tiny
  build reads 24 tokens after a 16-token crop [1000 after 108] (instance attributes of the pipeline).
* Glyph encoder: ``T5EncoderModel`` d_model 32 [1472], 2 layers [12], ``ByT5Tokenizer`` (no vocabulary
  file), 16 tokens [256].
* DiT: 3 ``transformer_blocks`` [54], 2 heads x 16 [16 x 128], 1 token-refiner layer [2], 4 image tokens
  [729] of width 16 [1152].
* Image encoder (image-to-video only): ``SiglipVisionModel`` width 16 [1152], 2 layers [27], 32x32 input.
* VAE: (16, 16, 32, 64) channels [(128, 256, 512, 1024, 1024)], 32 latent channels [same], 8x spatial
  [16x] and 4x temporal compression [same].
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5EncoderModel,
)

from diffusers_offload.tiny._common import build_tiny_t5_encoder, cast_and_eval
from diffusers_offload.tiny._qwen_tokenizer import build_tiny_qwen_tokenizer

__all__ = [
    "TINY_HUNYUAN_VIDEO15_CALL",
    "TINY_HUNYUAN_VIDEO15_PROMPT",
    "build_tiny_hunyuan_video15_i2v_pipeline",
    "build_tiny_hunyuan_video15_pipeline",
    "shorten_text_lengths",
]

# Quoted text in the prompt makes the pipeline run the glyph encoder; the guider's CFG (scale 6 > 1) makes
# two transformer calls per step.
TINY_HUNYUAN_VIDEO15_CALL: dict[str, Any] = dict(num_inference_steps=2, height=32, width=32, num_frames=5)
TINY_HUNYUAN_VIDEO15_PROMPT = 'a cat holding a sign that says "hello"'

_TEXT_WIDTH = 32
_GLYPH_WIDTH = 32
_IMAGE_WIDTH = 16  # the DiT's image_embed_dim, also the SigLIP width of the image-to-video build
_LATENT_CHANNELS = 32


def _build_transformer(seed: int, dtype: torch.dtype, task: str = "t2v") -> HunyuanVideo15Transformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideo15Transformer3DModel(
            in_channels=2 * _LATENT_CHANNELS + 1,  # latents, condition latents, mask
            out_channels=_LATENT_CHANNELS,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=3,
            num_refiner_layers=1,
            text_embed_dim=_TEXT_WIDTH,
            text_embed_2_dim=_GLYPH_WIDTH,
            image_embed_dim=_IMAGE_WIDTH,
            rope_axes_dim=(4, 6, 6),  # must sum to attention_head_dim
            target_size=32,
            task_type=task,
        )
    return cast_and_eval(model, dtype)


def _build_text_encoder(seed: int, tokenizer: Any, dtype: torch.dtype) -> Qwen2_5_VLTextModel:
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_window_layers=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLTextModel(config)
    return cast_and_eval(model, dtype)


def _build_glyph_encoder(seed: int, tokenizer: Any, dtype: torch.dtype) -> T5EncoderModel:
    return build_tiny_t5_encoder(seed, tokenizer, dtype, d_model=_GLYPH_WIDTH, d_kv=8, d_ff=64)


def _build_vae(seed: int, dtype: torch.dtype) -> AutoencoderKLHunyuanVideo15:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=_LATENT_CHANNELS,
            # The last width must be a multiple of 2 x latent_channels (the encoder's grouped shortcut).
            block_out_channels=(16, 16, 32, 64),
            layers_per_block=1,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
    return cast_and_eval(vae, dtype)


def _components(seed: int, dtype: torch.dtype, task: str) -> dict[str, Any]:
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    return dict(
        text_encoder=_build_text_encoder(seed * 10 + 1, tokenizer, dtype),
        tokenizer=tokenizer,
        transformer=_build_transformer(seed * 10 + 2, dtype, task),
        vae=_build_vae(seed * 10 + 3, dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_build_glyph_encoder(seed * 10 + 4, tokenizer_2, dtype),
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


def build_tiny_hunyuan_video15_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> HunyuanVideo15Pipeline:
    """A complete tiny ``HunyuanVideo15Pipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(TINY_HUNYUAN_VIDEO15_PROMPT, **TINY_HUNYUAN_VIDEO15_CALL, generator=...)``.
    """
    pipe = HunyuanVideo15Pipeline(**_components(seed, dtype, "t2v"))
    pipe.set_progress_bar_config(disable=True)
    return shorten_text_lengths(pipe)


def build_tiny_hunyuan_video15_i2v_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> HunyuanVideo15ImageToVideoPipeline:
    """A complete tiny ``HunyuanVideo15ImageToVideoPipeline`` (a SigLIP image encoder on the first frame).

    Call it as ``pipe(image=<32x32 RGB image>, prompt=..., num_inference_steps=2, num_frames=5, ...)``; the
    output size follows the image.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 10 + 5)
        siglip = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=_IMAGE_WIDTH,
                intermediate_size=2 * _IMAGE_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        )
    pipe = HunyuanVideo15ImageToVideoPipeline(
        **_components(seed, dtype, "i2v"),
        image_encoder=cast_and_eval(siglip, dtype),
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )
    pipe.set_progress_bar_config(disable=True)
    return shorten_text_lengths(pipe)


def shorten_text_lengths(pipe: HunyuanVideo15Pipeline) -> HunyuanVideo15Pipeline:
    """Set the tiny text and image-token lengths on ``pipe`` (the real pipeline fixes them in ``__init__``,
    not in its config, so a reloaded tiny pipeline needs this again); returns ``pipe``."""
    pipe.prompt_template_encode_start_idx = 16
    pipe.tokenizer_max_length = 24
    pipe.tokenizer_2_max_length = 16
    pipe.vision_num_semantic_tokens = 4
    return pipe
