"""Tiny random-weight Wan 2.1 / 2.2 text-to-video pipelines, built fully offline.

Same classes and wiring as ``Wan-AI/Wan2.1-T2V-14B-Diffusers`` and ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``
(``WanTransformer3DModel``, a umT5 encoder, the causal 3D ``AutoencoderKLWan``, flow-matching UniPC), small
enough that a 5-frame 32x32 call with CFG takes a few tens of milliseconds on CPU. The two-expert build sets
``transformer_2`` (low-noise expert) and ``boundary_ratio`` 0.875 as Wan 2.2 A14B does; with
:data:`TINY_WAN_CALL`'s 4 steps (timesteps 999, 900, 750, 500) the first two run on ``transformer`` and
the last two on ``transformer_2``, so both experts are used in every call. The TI2V-5B build has Wan 2.2's
residual VAE with 2x2 pixel patches (16x spatial compression) and per-token timesteps
(``expand_timesteps``), with a single DiT.

Shapes (real 14B in brackets):

* Text encoder: ``UMT5EncoderModel`` d_model 32 [4096], 2 layers [24], the tiny T5 tokenizer.
* DiT: 3 ``blocks`` [40] (more than a prefetch-1 ring holds, so blocks really stream), 2 heads x 16
  [40 x 128], ffn 64 [13824], patch (1, 2, 2) [same]; 5 frames at 32x32 are 2 x 4 x 4 latents, 8 tokens.
* VAE: base_dim 8 [96], z_dim 16 [same], 8x spatial and 4x temporal compression [same].
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from diffusers_offload.tiny._common import build_tiny_t5_encoder, cast_and_eval
from diffusers_offload.tiny._tokenizers import build_tiny_t5_tokenizer

__all__ = [
    "TINY_WAN_CALL",
    "WAN22_BOUNDARY_RATIO",
    "build_tiny_wan_pipeline",
    "build_tiny_wan_transformer",
]

# Default Wan call: CFG on (guidance_scale 5.0 > 1), so each step calls the DiT twice (cond, uncond).
TINY_WAN_CALL: dict[str, Any] = dict(
    num_inference_steps=4,
    height=32,
    width=32,
    num_frames=5,
    guidance_scale=5.0,
    max_sequence_length=16,
)

WAN22_BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B's published value
_TEXT_WIDTH = 32
_LATENT_CHANNELS = 16


def build_tiny_wan_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3
) -> WanTransformer3DModel:
    """The tiny Wan DiT alone (``blocks`` has ``num_layers`` entries), seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            text_dim=_TEXT_WIDTH,
            freq_dim=32,
            ffn_dim=64,
            num_layers=num_layers,
            rope_max_seq_len=32,
        )
    return cast_and_eval(model, dtype)


def _build_umt5(seed: int, tokenizer: Any, dtype: torch.dtype) -> UMT5EncoderModel:
    return build_tiny_t5_encoder(
        seed,
        tokenizer,
        dtype,
        d_model=_TEXT_WIDTH,
        d_kv=8,
        d_ff=64,
        config_class=UMT5Config,
        model_class=UMT5EncoderModel,
    )


def _build_wan_vae(seed: int, dtype: torch.dtype, *, wan22_vae: bool = False) -> AutoencoderKLWan:
    # Wan 2.2's VAE (TI2V-5B): residual blocks, 2x2 pixel patches in, 16x spatial compression.
    wan22 = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=_LATENT_CHANNELS, num_res_blocks=1, **(wan22 if wan22_vae else {})
        )
    return cast_and_eval(vae, dtype)


def build_tiny_wan_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, two_experts: bool = False, ti2v_5b: bool = False
) -> WanPipeline:
    """A complete tiny ``WanPipeline``: Wan 2.1 layout, Wan 2.2 A14B's two experts with ``two_experts``, or
    Wan 2.2 TI2V-5B's VAE and per-token timesteps with ``ti2v_5b``.

    Call it as ``pipe(prompt, **TINY_WAN_CALL, generator=...)``. The global torch RNG is not touched.
    """
    if two_experts and ti2v_5b:
        raise ValueError("TI2V-5B has a single transformer: pass two_experts or ti2v_5b, not both")
    tokenizer = build_tiny_t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_build_umt5(seed * 10 + 1, tokenizer, dtype),
        vae=_build_wan_vae(seed * 10 + 2, dtype, wan22_vae=ti2v_5b),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        transformer=build_tiny_wan_transformer(seed * 10 + 3, dtype),
        transformer_2=build_tiny_wan_transformer(seed * 10 + 4, dtype) if two_experts else None,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
        expand_timesteps=ti2v_5b,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
