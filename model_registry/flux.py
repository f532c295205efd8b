"""FLUX.1 (dev, schnell, Kontext, Fill, Control): 12B MMDiT (19 double- then 38 single-stream blocks) with
CLIP-L and T5-XXL encoders.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules and tiny pipelines.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

FLUX = register_adapter(
    ModelAdapter(
        name="flux",
        pipeline_classes=(
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxKontextPipeline",
            "FluxKontextInpaintPipeline",
            "FluxFillPipeline",
            "FluxControlPipeline",
            "FluxControlImg2ImgPipeline",
            "FluxControlInpaintPipeline",
        ),
        denoiser="transformer",
        # FluxTransformer2DModel.forward runs transformer_blocks, then single_transformer_blocks.
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        encoders={
            "text_encoder": ("encoder.layers",),  # CLIPTextModel (transformers 5: no `text_model.` level)
            "text_encoder_2": ("encoder.block",),  # T5EncoderModel
            "image_encoder": (
                "vision_model.encoder.layers",
            ),  # optional IP-Adapter CLIPVisionModelWithProjection
        },
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        # FLUX.1-dev is guidance-distilled: guidance_scale is an input of the one call. True CFG (a second,
        # negative-prompt call) runs only with true_cfg_scale > 1 and a negative prompt.
        calls=DenoiserCalls(
            "true_cfg_scale", default=1.0, needs_one_of=("negative_prompt", "negative_prompt_embeds")
        ),
        notes=(
            "Not served here: the FluxControlNet* pipelines, whose controlnet runs next to the "
            "transformer at every step (swapping the two whole would move both every step), and "
            "FluxPriorReduxPipeline (no denoiser). Fill/Control pipelines have no true CFG (one call per "
            "step)."
        ),
    )
)
