"""HunyuanVideo-1.5 text- and image-to-video: 8.3B DiT (54 double-stream blocks), a Qwen2.5-VL-7B text
model and a byT5 glyph encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules and tiny pipelines.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

HUNYUAN_VIDEO15 = register_adapter(
    ModelAdapter(
        name="hunyuanvideo15",
        pipeline_classes=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
        denoiser="transformer",
        # The 2-layer token refiner inside context_embedder runs first but is small (it stays with the rest).
        block_lists=("transformer_blocks",),
        encoders={
            "text_encoder": ("layers",),  # Qwen2_5_VLTextModel (no vision tower, no lm_head)
            "text_encoder_2": ("encoder.block",),  # byT5 T5EncoderModel
            "image_encoder": ("encoder.layers",),  # image-to-video only: SiglipVisionModel
        },
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        # The pipeline's `guider` (ClassifierFreeGuidance) runs one transformer call per condition.
        calls=DenoiserCalls(guider="guider", guider_calls=2),
        notes=(
            "text_encoder_2 (byT5) runs only for quoted text in the prompt; otherwise the pipeline feeds "
            "zeros. The negative prompt is encoded after the prompt, so with model swap the two text "
            "encoders alternate (text_encoder is loaded twice per call)."
        ),
    )
)
