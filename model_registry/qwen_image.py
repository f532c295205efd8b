"""Qwen-Image (20B MMDiT) with a Qwen2.5-VL-7B text encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules. Two adapters: the text-only
pipelines never pass pixel_values, so the vision tower is never run; the edit/layered pipelines do run it.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

# True CFG: a second, negative-prompt transformer call per step when true_cfg_scale > 1 (default 4.0) and a
# negative prompt is given.
_TRUE_CFG = DenoiserCalls(
    "true_cfg_scale", default=4.0, needs_one_of=("negative_prompt", "negative_prompt_embeds")
)

# Qwen2_5_VLForConditionalGeneration in transformers 5.24 (and >= 4.52); 4.51 had model.layers and visual.
_QWEN25VL_LAYERS = "model.language_model.layers"
_QWEN25VL_VISUAL = "model.visual"

QWEN_IMAGE = register_adapter(
    ModelAdapter(
        name="qwen-image",
        pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
        denoiser="transformer",
        block_lists=("transformer_blocks",),
        encoders={"text_encoder": (_QWEN25VL_LAYERS,)},
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        # Text-only prompts: the 0.68B vision tower is never called, so it need not take device memory.
        host_only={"text_encoder": (_QWEN25VL_VISUAL,)},
        calls=_TRUE_CFG,
        notes=(
            "The text encoder's forward computes lm_head logits for every position (logits_to_keep=0) even "
            "though the pipeline only reads hidden_states[-1], so lm_head (0.545B) must stay resident."
        ),
    )
)

QWEN_IMAGE_EDIT = register_adapter(
    ModelAdapter(
        name="qwen-image-edit",
        pipeline_classes=(
            "QwenImageEditPipeline",
            "QwenImageEditPlusPipeline",
            "QwenImageEditInpaintPipeline",
            "QwenImageLayeredPipeline",
        ),
        denoiser="transformer",
        block_lists=("transformer_blocks",),
        encoders={"text_encoder": (_QWEN25VL_LAYERS,)},
        vae="vae",
        # QwenImageLayeredPipeline captions the input image with text_encoder.generate().
        entry_methods={"text_encoder": ("generate",), "vae": ("encode", "decode")},
        prefer_resident_encoders=("text_encoder",),
        calls=_TRUE_CFG,
        notes=(
            "The text encoder sees pixel_values here, so its vision tower runs (not host-only). "
            "QwenImageLayeredPipeline's auto-caption runs generate() for up to 512 tokens: streaming the "
            "encoder's layers would move the whole 7B LLM once per token."
        ),
    )
)
