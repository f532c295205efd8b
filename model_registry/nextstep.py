"""NextStep-1 / 1.1 (stepfun-ai): autoregressive 14B LLM with a 157M flow-matching image head.

Not a diffusers pipeline. Checked against upstream code: github.com/stepfun-ai/NextStep-1
(``nextstep/models/modeling_nextstep.py`` + ``pipeline_nextstep.py``) and the NextStep-1.1 remote code
(``models/nextstep_model.py``) as ported in vllm-project/vllm-omni ``nextstep_1_1/``. The pipeline object
holds ``model`` (the LLM itself, no inner ``.model``: ``embed_tokens``, ``layers``, ``norm``, ``lm_head``,
``image_in_projector``, ``image_out_projector``, ``image_head.net.res_blocks``, buffer ``gen_pos_embed``)
and ``vae``. The repo's separate ``inference/`` variant (``NextStep(Qwen2Model)``, entered through
``forward``) has no ``forward_model`` and is not served by this adapter.
"""

from .adapter import ModelAdapter
from .registry import register_adapter

NEXTSTEP = register_adapter(
    ModelAdapter(
        name="nextstep",
        pipeline_classes=("NextStepPipeline",),
        denoiser="model",
        # The decoder layers sit directly on the model (upstream NextStep subclasses Qwen2Model / mirrors it).
        # image_head.net.res_blocks is deliberately not a block list: sample() runs it num_sampling_steps
        # times per token, so streaming it would be far worse than keeping its 0.31 GB (bf16) resident.
        block_lists=("layers",),
        encoders={},  # the LLM reads the prompt itself
        vae="vae",
        # prefill: prepare_inputs_embeds() then forward_model(); per image token forward_model() again.
        # model.forward (the lm_head path) is never called. Both methods exist in NextStep-1's GitHub code
        # and NextStep-1.1's remote code.
        entry_methods={"model": ("forward_model", "prepare_inputs_embeds"), "vae": ("encode", "decode")},
        host_only={"model": ("lm_head",)},  # text logits are never computed when generating images
        # NextStep-1's pipeline indexes model.gen_pos_embed directly, outside any method of the model.
        resident_tensors={"model": ("gen_pos_embed",)},
        prefer_resident_blocks=True,
        step_unit="image token",
        notes=(
            "Autoregressive: every image token runs forward_model through all 48 decoder layers with a KV "
            "cache, so layer-wise streaming moves the whole LLM (about 26 GB in bf16) once per token "
            "(1024 tokens for 512x512). Keep the layers resident; stream only if nothing else fits. "
            "Per token the pipeline also calls image_out_projector, image_head.sample and image_in_projector "
            "directly (submodules, outside any method of the model) and, in 1.1, gen_pos_embed_with_ar(); "
            "the model is already entered by the prefill and nothing else runs until vae.decode, so hooking "
            "forward_model/prepare_inputs_embeds suffices for model swap."
        ),
    )
)
