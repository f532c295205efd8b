"""Z-Image (-Turbo): single-stream 6B DiT with two refiner stages, Qwen3-4B text encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules.
"""

from .adapter import ModelAdapter
from .registry import register_adapter

Z_IMAGE = register_adapter(
    ModelAdapter(
        name="z-image",
        pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
        denoiser="transformer",
        # ZImageTransformer2DModel.forward: noise_refiner (image tokens), then context_refiner (caption
        # tokens), then the unified `layers`.
        block_lists=("noise_refiner", "context_refiner", "layers"),
        encoders={"text_encoder": ("layers",)},  # Qwen3Model (no lm_head)
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        notes=(
            "x_pad_token and cap_pad_token are parameters of the transformer root itself (not of a child "
            "module); they are used inside forward and belong to the non-block remainder. Not served here: "
            "ZImageControlNet*Pipeline (its controlnet shares noise_refiner, context_refiner and the "
            "embedders with the transformer via ZImageControlNetModel.from_transformer) and "
            "ZImageOmniPipeline (adds siglip_refiner, run only when SigLIP features are given, and a "
            "`siglip` encoder)."
        ),
    )
)
