"""Tiny random-weight LongCat-Image pipeline, built fully offline.

Same classes and wiring as ``meituan-longcat/LongCat-Image`` (Flux-style MMDiT; a Qwen2.5-VL text encoder that
first rewrites the prompt with ``generate()``, then encodes it; Flux VAE; dynamically shifted flow-matching
Euler scheduler), small enough that a 64x64, 2-step call with CFG and prompt rewriting takes ~0.1 s on CPU.

Shapes (real LongCat-Image in brackets):

* Text encoder: the tiny ``Qwen2_5_VLForConditionalGeneration`` of ``diffusers_offload.tiny.qwen_image``
  (hidden 32 [3584]); its generation config stops the rewrite after 8 greedy tokens [up to 512].
* ``text_processor``: a second tiny Qwen tokenizer [``Qwen2VLProcessor``]. The real processor cannot be built
  without torchvision (its video processor needs it), and the pipeline only uses its text side:
  ``apply_chat_template`` with list-of-parts content, ``__call__(text=...)`` and ``batch_decode``, which the
  tokenizer all does. It is saved as a ``Qwen2Tokenizer`` under ``text_processor/`` and loaded back as one by
  ``DiffusionPipeline.from_pretrained`` (which only logs an "Expected types for text_processor" warning).
* DiT: 2 ``transformer_blocks`` + 2 ``single_transformer_blocks`` [10 + 20], 2 heads x 16 [24 x 128],
  ``axes_dims_rope`` (4, 6, 6) [(16, 56, 56)], ``joint_attention_dim`` and ``pooled_projection_dim`` 32
  [3584].
* VAE: the tiny Flux VAE of ``diffusers_offload.tiny.z_image``; the pipeline hard-codes 16 latent channels.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

from diffusers_offload.tiny._common import cast_and_eval
from diffusers_offload.tiny._qwen_tokenizer import build_tiny_qwen_tokenizer
from diffusers_offload.tiny.qwen_image import TEXT_HIDDEN, build_tiny_qwen2_5_vl
from diffusers_offload.tiny.z_image import build_tiny_flux_vae

__all__ = [
    "TINY_LONGCAT_IMAGE_CALL",
    "build_tiny_longcat_image_pipeline",
    "build_tiny_longcat_image_transformer",
]

# Default call: CFG on (guidance_scale > 1, empty negative prompt), so the DiT runs twice per step, and the
# pipeline's default prompt rewriting (enable_prompt_rewrite=True: one text_encoder.generate()) left on.
TINY_LONGCAT_IMAGE_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=4.5,
)

_LATENT_CHANNELS = 16  # hard-coded in LongCatImagePipeline.__call__


def build_tiny_longcat_image_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2, num_single_layers: int = 2
) -> LongCatImageTransformer2DModel:
    """The tiny LongCat-Image MMDiT alone: ``num_layers`` double- and ``num_single_layers`` single-stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LongCatImageTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,  # 2x2 packed latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            pooled_projection_dim=TEXT_HIDDEN,
            axes_dims_rope=[4, 6, 6],  # must sum to attention_head_dim
        )
    return cast_and_eval(model, dtype)


def build_tiny_longcat_image_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> LongCatImagePipeline:
    """A complete tiny ``LongCatImagePipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_LONGCAT_IMAGE_CALL, generator=...)``; the global torch RNG is untouched.
    With rewriting on, the DiT is conditioned on the random LM's 8-token rewrite, which barely depends on the
    prompt (it follows a ~2k-token system prompt); pass ``enable_prompt_rewrite=False`` to encode the prompt.
    """
    tokenizer = build_tiny_qwen_tokenizer()
    pipe = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=4096,
            max_shift=1.15,
            shift=1.0,
            use_dynamic_shifting=True,
        ),
        vae=build_tiny_flux_vae(seed * 10 + 1, dtype),
        text_encoder=build_tiny_qwen2_5_vl(tokenizer, seed * 10 + 2, dtype),
        tokenizer=tokenizer,
        text_processor=build_tiny_qwen_tokenizer(),
        transformer=build_tiny_longcat_image_transformer(seed * 10 + 3, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
