"""Tiny random-weight Ovis-Image pipeline, built fully offline.

Same classes and wiring as ``AIDC-AI/Ovis-Image-7B`` (Flux-style MMDiT, a Qwen3 text encoder read at its
last hidden state through Qwen3's chat template with thinking off, Flux VAE, dynamically shifted flow-matching
Euler scheduler), small enough that a 64x64, 2-step call with CFG takes a few tens of milliseconds on CPU.

Shapes (real Ovis-Image in brackets):

* Text encoder: the tiny ``Qwen3Model`` of ``diffusers_offload.tiny.z_image`` (hidden 32 [2048], 2 layers).
  The pipeline drops the first 28 tokens (``user_prompt_begin_id``). The tiny tokenizer splits the chat
  prefix + system prompt one token per word, like the real one, so the cut falls after "background" and the
  ":" token is kept, exactly as upstream.
* DiT: 2 ``transformer_blocks`` + 2 ``single_transformer_blocks`` [6 + 27], 2 heads x 16 [24 x 128],
  ``axes_dims_rope`` (4, 6, 6) [(16, 56, 56)], ``in_channels`` = ``out_channels`` = 64 [same],
  ``joint_attention_dim`` 32 [2048].
* VAE: the tiny Flux VAE of ``diffusers_offload.tiny.z_image`` (16 latent channels).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

from diffusers_offload.tiny._common import build_flux_style_scheduler, cast_and_eval
from diffusers_offload.tiny._qwen_tokenizer import QWEN3_CHAT_TEMPLATE, build_tiny_qwen_tokenizer
from diffusers_offload.tiny.z_image import TEXT_HIDDEN, build_tiny_flux_vae, build_tiny_qwen3

__all__ = [
    "TINY_OVIS_IMAGE_CALL",
    "build_tiny_ovis_image_pipeline",
    "build_tiny_ovis_image_transformer",
]

# Default call: CFG on (guidance_scale > 1, default empty negative prompt), so the DiT runs twice per step.
# max_sequence_length 32 (default 256): the pipeline feeds the whole padded text sequence to the DiT.
TINY_OVIS_IMAGE_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=5.0,
    max_sequence_length=32,
)

_LATENT_CHANNELS = 16


def build_tiny_ovis_image_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2, num_single_layers: int = 2
) -> OvisImageTransformer2DModel:
    """The tiny Ovis-Image MMDiT alone: ``num_layers`` double- and ``num_single_layers`` single-stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OvisImageTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,  # 2x2 packed latents
            out_channels=4 * _LATENT_CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )
    return cast_and_eval(model, dtype)


def build_tiny_ovis_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> OvisImagePipeline:
    """A complete tiny ``OvisImagePipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_OVIS_IMAGE_CALL, generator=...)``. The global torch RNG is not touched.
    """
    tokenizer = build_tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    pipe = OvisImagePipeline(
        scheduler=build_flux_style_scheduler(),
        vae=build_tiny_flux_vae(seed * 10 + 1, dtype),
        text_encoder=build_tiny_qwen3(tokenizer, seed * 10 + 2, dtype),
        tokenizer=tokenizer,
        transformer=build_tiny_ovis_image_transformer(seed * 10 + 3, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
