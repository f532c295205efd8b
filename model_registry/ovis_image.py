"""Ovis-Image-7B: FLUX-style DiT (6 double- then 27 single-stream blocks), Qwen3-1.7B-class text encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

OVIS_IMAGE = register_adapter(
    ModelAdapter(
        name="ovis-image",
        pipeline_classes=("OvisImagePipeline",),
        denoiser="transformer",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        encoders={"text_encoder": ("layers",)},  # Qwen3Model (no lm_head)
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        calls=DenoiserCalls("guidance_scale", default=5.0),  # separate negative-prompt call when > 1
    )
)
