"""Tiny random-weight Stable Diffusion 3 pipeline, built fully offline.

Same classes and wiring as ``stabilityai/stable-diffusion-3-medium-diffusers`` (MMDiT, two CLIP text encoders
with projection, a T5 encoder, a 16-channel VAE with SD3's shift/scale, flow-matching Euler scheduler), with
widths small enough that a 64x64, 2-step call takes a few tens of milliseconds on CPU.

Shapes (real SD3-medium in brackets):

* VAE: 4 levels, ``block_out_channels=(8, 8, 16, 16)``, 16 latent channels -> 8x downsampling [same factor];
  64x64 image -> 8x8 latent.
* DiT: ``patch_size=2`` -> 16 image tokens at 64x64; 2 joint blocks [24], 2 heads x 16 [24 x 64],
  ``joint_attention_dim=96`` [4096], ``pooled_projection_dim=80`` [2048].
* CLIP-L stand-in: hidden 32, projection 32 [768/768]; CLIP-G stand-in: hidden 48, projection 48
  [1280/1280]; both 2 layers (SD3 reads ``hidden_states[-2]``), 77 tokens.
* T5 stand-in: ``d_model=96`` (>= 32 + 48, the pipeline pads the CLIP embeddings up to the T5 width),
  2 layers, gated-gelu like T5 v1.1.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from diffusers_offload.tiny._common import (
    LATENT_CHANNELS,
    build_tiny_kl_vae,
    build_tiny_t5_encoder,
    cast_and_eval,
)
from diffusers_offload.tiny._tokenizers import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

__all__ = [
    "TINY_SD3_CALL",
    "build_tiny_clip_text_encoder",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd3_transformer",
    "build_tiny_sd3_vae",
    "build_tiny_t5",
]

# Default call: CFG on (guidance_scale > 1) so the DiT sees a batch of 2, short T5 context to stay fast.
TINY_SD3_CALL: dict[str, Any] = dict(
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=4.0,
    max_sequence_length=32,
)

_CLIP_WIDTHS = ((32, 32), (48, 48))  # (hidden_size, projection_dim) of text_encoder, text_encoder_2
T5_WIDTH = 96  # also the width of the tiny FLUX.1's T5


def build_tiny_sd3_transformer(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    *,
    heads: int = 2,
    head_dim: int = 16,
) -> SD3Transformer2DModel:
    """The tiny SD3 MMDiT alone (``transformer_blocks`` has ``num_layers`` entries), seeded by ``seed``;
    wider ``heads`` x ``head_dim`` make a heavier one (tests that need megabytes of weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=heads * head_dim,  # must equal num_attention_heads * attention_head_dim
            pooled_projection_dim=sum(proj for _, proj in _CLIP_WIDTHS),
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=16,  # up to 16x16 patches, i.e. 256x256 images
        )
    return cast_and_eval(model, dtype)


def build_tiny_sd3_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The tiny SD3-style VAE: 8x downsampling, 16 latent channels, SD3's shift and scaling factors."""
    # SD3\'s VAE values.
    return build_tiny_kl_vae(seed, dtype, scaling_factor=1.5305, shift_factor=0.0609)


def build_tiny_clip_text_encoder(
    seed: int, hidden: int, projection: int, tokenizer: Any, model_class: type = CLIPTextModelWithProjection
) -> CLIPTextModel:
    """A 2-layer CLIP text encoder of width ``hidden`` with ``tokenizer``'s vocabulary and ids; FLUX.1 uses
    ``model_class=CLIPTextModel`` (pooled output, no projection)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        hidden_act="quick_gelu",
        # CLIPTextTransformer pools at the first eos id; it must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def build_tiny_t5(seed: int, tokenizer: Any) -> T5EncoderModel:
    """A 2-layer, width-96 T5 v1.1-style encoder (gated-gelu) using ``tokenizer``'s vocabulary and ids."""
    return build_tiny_t5_encoder(seed, tokenizer, d_model=T5_WIDTH, d_kv=24, d_ff=192)


def build_tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """A complete tiny ``StableDiffusion3Pipeline`` with random weights, deterministic for a given ``seed``.

    Call it with ``pipe(prompt, **TINY_SD3_CALL, generator=...)``. The global torch RNG is left untouched.
    """
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()
    tokenizer_3 = build_tiny_t5_tokenizer()
    # Distinct sub-seeds so the two CLIP encoders do not get identical weights.
    (h1, p1), (h2, p2) = _CLIP_WIDTHS
    text_encoder = build_tiny_clip_text_encoder(seed * 10 + 1, h1, p1, tokenizer)
    text_encoder_2 = build_tiny_clip_text_encoder(seed * 10 + 2, h2, p2, tokenizer_2)
    text_encoder_3 = build_tiny_t5(seed * 10 + 3, tokenizer_3)
    pipe = StableDiffusion3Pipeline(
        transformer=build_tiny_sd3_transformer(seed * 10 + 4),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_tiny_sd3_vae(seed * 10 + 5),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe
