"""docs/adding-a-model.md, run as a new user would: its code blocks on a tiny random-weight Flux."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffusers_offload.model_registry import get_adapter, lookup_adapter, register_adapter, unregister_adapter
from diffusers_offload.tiny._tokenizers import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer
from diffusers_offload.tiny.z_image import build_tiny_flux_vae

DOC = Path(__file__).parents[2] / "docs" / "adding-a-model.md"


def build_tiny_flux_pipeline() -> FluxPipeline:
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
            )
        ).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=build_tiny_flux_vae(seed=1).eval(),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def flux_adapter_clean():
    shipped = lookup_adapter("FluxPipeline")
    assert shipped is not None and shipped.name == "flux"  # the walkthrough re-declares a shipped model
    yield
    unregister_adapter("flux")
    register_adapter(shipped)  # the shipped declaration back, for the tests that follow


def test_the_walkthrough_runs_as_written(flux_adapter_clean, capsys):
    find, record_order, declare, check = doc_blocks()
    scope = {"pipe": build_tiny_flux_pipeline()}
    exec(find, scope)
    assert scope["adapter"].block_lists == ("transformer_blocks", "single_transformer_blocks")
    exec(record_order, scope)
    assert scope["order"] == [f"transformer_blocks.{i}" for i in range(2)] + [
        f"single_transformer_blocks.{i}" for i in range(2)
    ]
    exec(declare, scope)
    assert get_adapter(scope["pipe"]) is scope["FLUX"]
    exec(check, scope)  # asserts bitwise equality itself, for model swap and layer-wise offload
    printed = capsys.readouterr().out
    assert printed.count("host copy") == 2


def test_declared_flux_streams_its_encoders_too(flux_adapter_clean):
    scope = {"pipe": build_tiny_flux_pipeline()}
    exec(doc_blocks()[2], scope)
    import diffusers_offload as dof

    pipe = dof.attach(scope["pipe"])
    call = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
    reference = pipe("a cat", generator=torch.Generator().manual_seed(0), **call).images
    handle = pipe.enable_layerwise_offload("cpu", encoders="stream", prefetch=1)
    assert {name for name, r in handle.components.items() if r.ring is not None} == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
    }
    assert torch.equal(pipe("a cat", generator=torch.Generator().manual_seed(0), **call).images, reference)
    pipe.disable_offload()
