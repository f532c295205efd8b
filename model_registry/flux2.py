"""FLUX.2-dev: 32B MMDiT (8 double- then 48 single-stream blocks) with a Mistral-Small-3.x 24B text encoder.

Verified against diffusers 0.42.1 / transformers 5.24 on meta-built modules and tiny pipelines.
"""

from .adapter import ModelAdapter
from .registry import register_adapter

# Mistral3ForConditionalGeneration in transformers 5.24: model.{vision_tower, multi_modal_projector,
# language_model} and lm_head.
_MISTRAL3_LAYERS = "model.language_model.layers"

FLUX2 = register_adapter(
    ModelAdapter(
        name="flux2",
        pipeline_classes=("Flux2Pipeline",),
        denoiser="transformer",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        encoders={"text_encoder": (_MISTRAL3_LAYERS,)},
        vae="vae",
        # upsample_prompt() (caption_upsample_temperature) enters the text encoder through generate().
        entry_methods={"text_encoder": ("generate",), "vae": ("encode", "decode")},
        # Text prompts never pass pixel_values, so the vision tower and projector (0.44B) are not run; image
        # prompts to upsample_prompt() do run them, and a host-only part is loaded when called.
        host_only={"text_encoder": ("model.vision_tower", "model.multi_modal_projector")},
        # Flux2Pipeline reads vae.bn.running_mean / running_var itself (to normalise the packed latents before
        # decode and after encode), outside any VAE method: they must be on the device whenever it runs.
        resident_tensors={"vae": ("bn.running_mean", "bn.running_var")},
        # guidance_scale is an embedded input of the guidance-distilled DiT: one call per step.
        notes=(
            "The text encoder's forward also computes lm_head logits for every position although the "
            "pipeline reads only hidden_states 10/20/30, so lm_head (0.67B) stays with it. transformers 5 "
            "ties lm_head to embed_tokens for the published config unless tie_word_embeddings=False is set; "
            "the checkpoint stores it separately. Caption upsampling (off by default) runs generate() for up "
            "to 512 tokens: with the encoder's layers streamed, that moves the 24B LLM once per token. Not "
            "served: the Flux2Klein* pipelines (a Qwen3 text encoder, not checked)."
        ),
    )
)
