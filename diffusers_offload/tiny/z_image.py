"""Tiny random-weight Z-Image pipeline, built fully offline.

Same classes and wiring as ``Tongyi-MAI/Z-Image-Turbo`` (single-stream DiT with noise and context refiners,
a Qwen3 text encoder read at ``hidden_states[-2]`` through Qwen3's chat template, the Flux VAE with its
shift/scale, flow-matching Euler scheduler with a static shift of 3), small enough that a 64x64, 2-step call
with CFG takes a few tens of milliseconds on CPU.

Shapes (real Z-Image-Turbo in brackets):

* Text encoder ``Qwen3Model``: hidden 32 [2560], 2 layers [36], 2 heads [32] with 1 KV head [8], head_dim 16
  [128]. Vocabulary: the tiny Qwen tokenizer, ~4.7k [151k].
* DiT: ``dim`` 32 [3840], 2 heads [30], 2 blocks in each of ``noise_refiner``, ``context_refiner`` and
  ``layers`` [2, 2, 30], ``axes_dims`` (4, 6, 6) [(32, 48, 48)], ``cap_feat_dim`` 32 [2560].
* VAE: Flux-style ``AutoencoderKL``, 4 levels ``(8, 8, 16, 16)`` [(128, 256, 512, 512)] -> 8x downsampling,
  16 latent channels [same], Flux's ``scaling_factor``/``shift_factor``; a 64x64 image is 16 DiT tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

from diffusers_offload.tiny._common import LATENT_CHANNELS, build_tiny_kl_vae, cast_and_eval
from diffusers_offload.tiny._qwen_tokenizer import QWEN3_CHAT_TEMPLATE, build_tiny_qwen_tokenizer

__all__ = [
    "TEXT_HIDDEN",
    "TINY_Z_IMAGE_CALL",
    "build_tiny_flux_vae",
    "build_tiny_qwen3",
    "build_tiny_z_image_pipeline",
    "build_tiny_z_image_transformer",
]

# Default call: CFG on (Z-Image's guidance_scale > 0) with the default empty negative prompt: the DiT runs
# once per step on a batch of 2 (prompt, negative). max_sequence_length 64 (default 512) keeps the text
# encoder's padded input short; the pipeline drops the padding before the DiT anyway.
TINY_Z_IMAGE_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=4.0,
    max_sequence_length=64,
)

TEXT_HIDDEN = 32  # Qwen3 width, also the DiT's cap_feat_dim


def build_tiny_qwen3(
    tokenizer: Qwen2TokenizerFast, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen3Model:
    """A 2-layer, width-32 ``Qwen3Model`` (GQA 2:1, q/k RMSNorm) using ``tokenizer``'s vocabulary and ids."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=8192,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    return cast_and_eval(model, dtype)


def build_tiny_flux_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A tiny Flux-style VAE: 8x downsampling, 16 latent channels, no quant convs, Flux's shift/scale.

    Z-Image, LongCat-Image and Ovis-Image all ship the Flux VAE and decode ``latents / scaling + shift``.
    """
    return build_tiny_kl_vae(seed, dtype, scaling_factor=0.3611, shift_factor=0.1159)


def build_tiny_z_image_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2
) -> ZImageTransformer2DModel:
    """The tiny Z-Image DiT alone: ``num_layers`` blocks in each of its 3 block lists, seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=LATENT_CHANNELS,
            dim=32,
            n_layers=num_layers,
            n_refiner_layers=num_layers,
            n_heads=2,
            n_kv_heads=2,
            qk_norm=True,
            cap_feat_dim=TEXT_HIDDEN,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[4, 6, 6],  # must sum to the head dim, 32 / 2
            axes_lens=[1536, 512, 512],  # as Z-Image-Turbo: RoPE tables for text/height/width positions
        )
        # The pad tokens fill image and caption sequences up to a multiple of 32. Older diffusers create them
        # with torch.empty (garbage, sometimes NaN), newer ones with zeros; random values make them count, and
        # leave every weight determined by the seed either way.
        with torch.no_grad():
            model.x_pad_token.normal_(std=0.02)
            model.cap_pad_token.normal_(std=0.02)
    return cast_and_eval(model, dtype)


def build_tiny_z_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> ZImagePipeline:
    """A complete tiny ``ZImagePipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_Z_IMAGE_CALL, generator=...)``. The global torch RNG is not touched.
    """
    tokenizer = build_tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=build_tiny_flux_vae(seed * 10 + 1, dtype),
        text_encoder=build_tiny_qwen3(tokenizer, seed * 10 + 2, dtype),
        tokenizer=tokenizer,
        transformer=build_tiny_z_image_transformer(seed * 10 + 3, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
