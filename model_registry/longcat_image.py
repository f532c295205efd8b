"""LongCat-Image: FLUX-style 6B DiT (double- then single-stream blocks), Qwen2.5-VL-7B text encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

# Qwen2_5_VLForConditionalGeneration in transformers 5.24 (and >= 4.52); 4.51 had model.layers and visual.
_QWEN25VL_LAYERS = "model.language_model.layers"

# A separate unconditional transformer call per step when guidance_scale > 1 (default 4.5).
_CFG = DenoiserCalls("guidance_scale", default=4.5)

_NOTES = (
    "The text encoder is also entered through generate() for prompt rewriting (enable_prompt_rewrite, on by "
    "default, up to 512 new tokens): streaming its layers would move the whole 7B LLM once per token. "
    "The published model_index.json lists no `transformer`; it is loaded from the `transformer` subfolder."
)

LONGCAT_IMAGE = register_adapter(
    ModelAdapter(
        name="longcat-image",
        pipeline_classes=("LongCatImagePipeline",),
        denoiser="transformer",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        encoders={"text_encoder": (_QWEN25VL_LAYERS,)},
        vae="vae",
        entry_methods={"text_encoder": ("generate",), "vae": ("encode", "decode")},
        # Text-to-image never passes pixel_values (rewriting is text-only), so the vision tower never runs.
        host_only={"text_encoder": ("model.visual",)},
        prefer_resident_encoders=("text_encoder",),
        calls=_CFG,
        notes=_NOTES,
    )
)

LONGCAT_IMAGE_EDIT = register_adapter(
    ModelAdapter(
        name="longcat-image-edit",
        pipeline_classes=("LongCatImageEditPipeline",),
        denoiser="transformer",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        encoders={"text_encoder": (_QWEN25VL_LAYERS,)},
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        calls=_CFG,
        notes="The edit pipeline feeds the input image to the text encoder, so its vision tower runs.",
    )
)
