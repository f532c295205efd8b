"""Tiny random-weight Qwen-Image pipeline, built fully offline.

Same classes and wiring as ``Qwen/Qwen-Image`` (MMDiT, Qwen2.5-VL text encoder read at its last hidden state,
Wan-style causal 3D VAE with per-channel latent mean/std, dynamically shifted flow-matching Euler scheduler),
small enough that a 64x64, 2-step call with true CFG takes a few tens of milliseconds on CPU.

Shapes (real Qwen-Image in brackets):

* Text encoder ``Qwen2_5_VLForConditionalGeneration``: hidden 32 [3584], 2 layers [28], 2 heads [28] with
  1 KV head [4], ``mrope_section`` (2, 3, 3) [(16, 24, 24)]; a 2-block, width-32 vision tower [32 x 1280],
  unused by text-to-image but part of the class. Vocabulary: the tiny Qwen tokenizer, ~4.7k [151k].
* DiT: 2 blocks [60], 2 heads x 16 [24 x 128], ``axes_dims_rope`` (4, 6, 6) [(16, 56, 56)],
  ``in_channels`` 64 / ``out_channels`` 16 [same], ``joint_attention_dim`` 32 [3584].
* VAE: ``base_dim`` 8 [96], ``dim_mult`` (1, 2, 4, 4) [same] -> 8x downsampling, 16 latent channels [same],
  1 res block per level [2]; a 64x64 image is an 8x8 latent, 16 packed DiT tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

from diffusers_offload.tiny._common import cast_and_eval
from diffusers_offload.tiny._qwen_tokenizer import build_tiny_qwen_tokenizer

__all__ = [
    "REWRITE_TOKENS",
    "TEXT_HIDDEN",
    "TINY_QWEN_IMAGE_CALL",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_qwen_image_scheduler",
    "build_tiny_qwen_image_transformer",
    "build_tiny_qwen_image_vae",
]

# Default call: true CFG on (true_cfg_scale > 1 and a negative prompt), so the DiT runs twice per step,
# with the prompt and with the negative prompt, batch 1 each.
TINY_QWEN_IMAGE_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    true_cfg_scale=4.0,
    negative_prompt="bad quality",
)

TEXT_HIDDEN = 32  # Qwen2.5-VL text width, also the DiT's joint_attention_dim
REWRITE_TOKENS = 8  # tokens the tiny Qwen2.5-VL generates before <|im_end|>
_LATENT_CHANNELS = 16


def build_tiny_qwen2_5_vl(
    tokenizer: Qwen2TokenizerFast, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer, width-32 ``Qwen2_5_VLForConditionalGeneration`` using ``tokenizer``'s vocabulary and ids.

    Its ``generation_config`` makes greedy ``generate()`` write ``REWRITE_TOKENS`` tokens and ``<|im_end|>``.
    """
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=2 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_window_layers=2,
            max_position_embeddings=8192,
            # Multimodal RoPE spreads the 8 rotary pairs of a 16-wide head over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=im_end,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[1],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    # A random LM never says <|im_end|>, and LongCat-Image rewrites prompts with generate(max_new_tokens=512):
    # ~1 s of decoding. Forbid eos for REWRITE_TOKENS tokens (the model's own greedy picks), then bias it so
    # it wins next. Both are plain generation-config fields: saved in generation_config.json, reloaded.
    model.generation_config.min_new_tokens = REWRITE_TOKENS
    model.generation_config.sequence_bias = [[[im_end], 100.0]]
    return cast_and_eval(model, dtype)


def build_tiny_qwen_image_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2
) -> QwenImageTransformer2DModel:
    """The tiny Qwen-Image MMDiT alone, with ``num_layers`` ``transformer_blocks``, seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * _LATENT_CHANNELS,  # 2x2 packed latents
            out_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )
    return cast_and_eval(model, dtype)


def build_tiny_qwen_image_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKLQwenImage:
    """The tiny Qwen-Image VAE: 8x spatial downsampling, 16 latent channels, the real latents mean/std."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The pipeline's vae_scale_factor is 2 ** len(temperal_downsample): 3 entries give 8x, as upstream.
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    return cast_and_eval(vae, dtype)


def build_tiny_qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler config: dynamic shifting up to 8192 tokens, ``shift_terminal`` 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )


def build_tiny_qwen_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImagePipeline:
    """A complete tiny ``QwenImagePipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_QWEN_IMAGE_CALL, generator=...)``. The global torch RNG is not touched.
    """
    tokenizer = build_tiny_qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=build_tiny_qwen_image_scheduler(),
        vae=build_tiny_qwen_image_vae(seed * 10 + 1, dtype),
        text_encoder=build_tiny_qwen2_5_vl(tokenizer, seed * 10 + 2, dtype),
        tokenizer=tokenizer,
        transformer=build_tiny_qwen_image_transformer(seed * 10 + 3, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
