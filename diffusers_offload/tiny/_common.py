"""Pieces shared by the tiny pipelines: casting, the 16-channel KL VAE several pipelines use, the Flux-style
scheduler and a T5-style encoder."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ModelMixin
from transformers import T5Config, T5EncoderModel

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

LATENT_CHANNELS = 16


def cast_and_eval(model: ModelT, dtype: torch.dtype) -> ModelT:
    """``model`` in ``dtype`` and eval mode."""
    if dtype == torch.float32:
        pass
    elif isinstance(model, ModelMixin):
        # ModelMixin.to warns about "modules that should be kept in float32" on every cast, even when the
        # list is empty (as it is for all of these); plain nn.Module.to does the same cast silently.
        torch.nn.Module.to(model, dtype)
    else:
        model.to(dtype)
    return model.eval()


def build_tiny_kl_vae(
    seed: int, dtype: torch.dtype, *, scaling_factor: float, shift_factor: float
) -> AutoencoderKL:
    """A tiny KL VAE: 8x downsampling, 16 latent channels, no quant convs (SD3 and Flux layout);
    pipelines decode ``latents / scaling_factor + shift_factor``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return cast_and_eval(vae, dtype)


def build_flux_style_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler with the resolution-dependent shift of FLUX.1's published scheduler config."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=shift,
        use_dynamic_shifting=True,
    )


def build_tiny_t5_encoder(
    seed: int,
    tokenizer: Any,
    dtype: torch.dtype = torch.float32,
    *,
    d_model: int,
    d_kv: int,
    d_ff: int,
    config_class: type = T5Config,
    model_class: type = T5EncoderModel,
) -> torch.nn.Module:
    """A 2-layer T5 v1.1-style encoder (gated-gelu, 4 heads) with ``tokenizer``'s vocabulary and ids;
    ``config_class``/``model_class`` give the umT5 variant (``UMT5Config``/``UMT5EncoderModel``)."""
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return cast_and_eval(model, dtype)
