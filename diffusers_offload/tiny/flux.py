"""Tiny random-weight FLUX.1 pipeline, built fully offline.

Same classes and wiring as ``black-forest-labs/FLUX.1-dev`` (guidance-distilled MMDiT with double- then
single-stream blocks, a CLIP text encoder read at its pooled output, a T5 encoder, the Flux VAE, dynamically
shifted flow-matching Euler scheduler), small enough that a 64x64, 2-step call takes tens of milliseconds.

Shapes (real FLUX.1-dev in brackets):

* CLIP stand-in: ``CLIPTextModel`` hidden 32 [768], 2 layers [12], 77 tokens.
* T5 stand-in: the tiny T5 of ``diffusers_offload.tiny.sd3`` (d_model 96 [4096], 2 layers [24]).
* DiT: 2 ``transformer_blocks`` + 2 ``single_transformer_blocks`` [19 + 38], 2 heads x 16 [24 x 128],
  ``axes_dims_rope`` (4, 6, 6) [(16, 56, 56)], ``in_channels`` 64 [same], ``guidance_embeds`` [same].
* VAE: the tiny Flux VAE of ``diffusers_offload.tiny.z_image`` (16 latent channels).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from diffusers_offload.tiny._common import LATENT_CHANNELS, build_flux_style_scheduler, cast_and_eval
from diffusers_offload.tiny._tokenizers import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer
from diffusers_offload.tiny.sd3 import T5_WIDTH, build_tiny_clip_text_encoder, build_tiny_t5
from diffusers_offload.tiny.z_image import build_tiny_flux_vae

__all__ = ["TINY_FLUX_CALL", "build_tiny_flux_pipeline", "build_tiny_flux_transformer"]

# Default FLUX.1-dev call: embedded guidance only, so the DiT runs once per step. Passing a negative_prompt
# with true_cfg_scale > 1 adds a second call per step.
TINY_FLUX_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=3.5,
    max_sequence_length=32,
)

_CLIP_HIDDEN = 32


def build_tiny_flux_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2, num_single_layers: int = 2
) -> FluxTransformer2DModel:
    """The tiny FLUX.1 MMDiT alone: ``num_layers`` double- and ``num_single_layers`` single-stream blocks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=_CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )
    return cast_and_eval(model, dtype)


def build_tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A complete tiny ``FluxPipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_FLUX_CALL, generator=...)``. The global torch RNG is not touched.
    """
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=build_flux_style_scheduler(),
        vae=build_tiny_flux_vae(seed * 10 + 1, dtype),
        text_encoder=cast_and_eval(
            build_tiny_clip_text_encoder(seed * 10 + 2, _CLIP_HIDDEN, _CLIP_HIDDEN, tokenizer, CLIPTextModel),
            dtype,
        ),
        tokenizer=tokenizer,
        text_encoder_2=cast_and_eval(build_tiny_t5(seed * 10 + 3, tokenizer_2), dtype),
        tokenizer_2=tokenizer_2,
        transformer=build_tiny_flux_transformer(seed * 10 + 4, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
