"""Wan 2.1 / 2.2 text- and image-to-video: 14B (or 5B for TI2V-5B) DiT with a umT5-XXL encoder.

Wan 2.2 A14B has two experts of the same layout: ``transformer`` (high noise) runs while
``t >= boundary_ratio * num_train_timesteps`` and ``transformer_2`` (low noise) after; they never interleave.
Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules and tiny pipelines.
"""

from .adapter import ModelAdapter
from .calls import DenoiserCalls
from .registry import register_adapter

WAN = register_adapter(
    ModelAdapter(
        name="wan",
        pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
        denoiser="transformer",
        block_lists=("blocks",),  # WanTransformer3DModel.forward runs `blocks` only
        experts=("transformer_2",),  # None for Wan 2.1 and TI2V-5B
        encoders={
            "text_encoder": ("encoder.block",),  # UMT5EncoderModel
            "image_encoder": ("encoder.layers",),  # Wan 2.1 I2V's CLIPVisionModel (transformers 5 layout)
        },
        vae="vae",
        entry_methods={"vae": ("encode", "decode")},
        # Separate cond and uncond calls whenever guidance_scale > 1 (guidance_scale_2 only scales the
        # low-noise expert's combination; it does not switch the second call).
        calls=DenoiserCalls("guidance_scale", default=5.0),
        notes=(
            "At the expert switch (from the second call on) the low-noise expert's first streamed block "
            "is prefetched into a ring slot of the high-noise expert; its non-block part and resident "
            "blocks are copied then too only where the plan leaves room beside the running expert; else "
            "its entry waits for the non-block part only and each resident block for its own copy. The "
            "pipelines also accept "
            "transformer=None (only transformer_2), which this adapter does not serve. Wan 2.2 A14B "
            "stores its experts in float32 on disk; plan with the dtype they are loaded in. Not served: "
            "WanVACEPipeline, WanAnimatePipeline, WanVideoToVideoPipeline (not checked)."
        ),
    )
)
