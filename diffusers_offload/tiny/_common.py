"""Pieces shared by the tiny pipelines: casting and the 16-channel KL VAE several pipelines use."""

from __future__ import annotations

from typing import TypeVar

import torch
from diffusers import AutoencoderKL, ModelMixin

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
