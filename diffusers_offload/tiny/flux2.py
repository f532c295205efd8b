"""Tiny random-weight FLUX.2 pipeline, built fully offline.

Same classes and wiring as ``black-forest-labs/FLUX.2-dev`` (guidance-distilled MMDiT with double- then
single-stream blocks, a ``Mistral3ForConditionalGeneration`` text encoder read at three hidden layers,
``AutoencoderKLFlux2`` whose BatchNorm statistics the pipeline reads directly, flow-matching Euler), small
enough that a 64x64, 2-step call takes tens of milliseconds on CPU.

Shapes (real FLUX.2-dev in brackets):

* Text encoder: Mistral3 with a 30-layer [40], width-32 [5120] language model and a 1-layer Pixtral vision
  tower [24] that text prompts never run; the pipeline stacks hidden states 10, 20, 30 [same], so the
  pipeline's defaults (and the CLI) work unchanged. The tokenizer is a tiny LLM tokenizer with a plain
  chat template instead of the Pixtral processor (the pipeline only calls its ``apply_chat_template``).
* DiT: 2 ``transformer_blocks`` + 2 ``single_transformer_blocks`` [8 + 48], 2 heads x 16 [48 x 128],
  ``axes_dims_rope`` (4, 4, 4, 4) [(32, 32, 32, 32)], ``in_channels`` 128 [same] (32 latent channels in 2x2).
* VAE: ``AutoencoderKLFlux2`` with (8, 8, 16, 16) channels [(128, 256, 512, 512)], 32 latent channels; its
  BatchNorm running statistics are randomised, so a wrong one would show in the image.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

from diffusers_offload.tiny._common import build_flux_style_scheduler, cast_and_eval
from diffusers_offload.tiny._tokenizers import build_tiny_llm_tokenizer

__all__ = ["TINY_FLUX2_CALL", "build_tiny_flux2_pipeline", "build_tiny_flux2_transformer"]

_TEXT_WIDTH = 32
_OUT_LAYERS = (10, 20, 30)  # the pipeline's default text_encoder_out_layers, as FLUX.2-dev
_LATENT_CHANNELS = 32

# One DiT call per step (guidance is an embedded input).
TINY_FLUX2_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=4.0,
    max_sequence_length=32,
)

# The roles in [system, user] order; a stand-in for Mistral's template that keeps every text part.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n{% endfor %}"
)


def build_tiny_flux2_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2, num_single_layers: int = 2
) -> Flux2Transformer2DModel:
    """The tiny FLUX.2 MMDiT alone: ``num_layers`` double- and ``num_single_layers`` single-stream blocks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=len(_OUT_LAYERS) * _TEXT_WIDTH,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # must sum to attention_head_dim
        )
    return cast_and_eval(model, dtype)


def _build_mistral3(seed: int, tokenizer: Any, dtype: torch.dtype) -> Mistral3ForConditionalGeneration:
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=max(_OUT_LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,  # as the published checkpoint stores lm_head
    )
    vision = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=16,
    )
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=len(tokenizer), tie_word_embeddings=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mistral3ForConditionalGeneration(config)
    return cast_and_eval(model, dtype)


def _build_flux2_vae(seed: int, dtype: torch.dtype) -> AutoencoderKLFlux2:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
        )
        with torch.no_grad():  # fresh BatchNorm statistics are 0 / 1; make the pipeline's use of them count
            vae.bn.running_mean.normal_(std=0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
    return cast_and_eval(vae, dtype)


def build_tiny_flux2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Flux2Pipeline:
    """A complete tiny ``Flux2Pipeline`` with random weights, deterministic for a given ``seed``.

    Call it as ``pipe(prompt, **TINY_FLUX2_CALL, generator=...)``. The global torch RNG is not touched.
    """
    tokenizer = build_tiny_llm_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    pipe = Flux2Pipeline(
        scheduler=build_flux_style_scheduler(),
        vae=_build_flux2_vae(seed * 10 + 1, dtype),
        text_encoder=_build_mistral3(seed * 10 + 2, tokenizer, dtype),
        tokenizer=tokenizer,
        transformer=build_tiny_flux2_transformer(seed * 10 + 3, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
