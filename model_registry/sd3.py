"""Stable Diffusion 3 / 3.5 (medium, large): MMDiT + CLIP-L, CLIP-bigG and T5-XXL encoders.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules.
"""

from .adapter import ModelAdapter
from .registry import register_adapter

SD3 = register_adapter(
    ModelAdapter(
        name="sd3",
        pipeline_classes=(
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
        ),
        denoiser="transformer",
        # SD3Transformer2DModel runs only transformer_blocks (its _repeated_blocks is empty).
        block_lists=("transformer_blocks",),
        encoders={
            "text_encoder": ("text_model.encoder.layers",),  # CLIPTextModelWithProjection
            "text_encoder_2": ("text_model.encoder.layers",),
            "text_encoder_3": ("encoder.block",),  # T5EncoderModel; `shared` is tied to encoder.embed_tokens
            # optional SiglipVisionModel (IP-Adapter); transformers 5 dropped the `vision_model.` level
            "image_encoder": ("encoder.layers",),
        },
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        notes=(
            "text_encoder_3 (T5) and image_encoder may be None. Skip-layer guidance (skip_guidance_layers, "
            "SD3.5-medium's default recipe) skips some transformer_blocks on the guidance pass: a streaming "
            "schedule keyed on block calls must tolerate blocks that are not called. SD3.5 stores a "
            "persistent pos_embed buffer outside the blocks (226.5M elements for medium, 89.7M for large)."
        ),
    )
)
