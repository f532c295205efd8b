"""Weights changed while offloaded (LoRA, load_state_dict, fused projections) act on the host copy."""

import peft
import pytest
import torch
from offload_probes import only_placeholders
from peft.utils import get_peft_model_state_dict

import diffusers_offload as dof
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline

LORA_STEPS = ("load_lora_weights", "fuse_lora", "unfuse_lora", "unload_lora_weights")


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat on a laptop", **TINY_SD3_CALL, generator=generator, output_type="pt").images


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA file for the transformer and the first text encoder (non-zero B, so it changes the image)."""
    pipe = build_tiny_sd3_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.transformer.add_adapter(
            peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        )
        # peft itself: transformers' own add_adapter asks for a newer peft than PyPI has.
        peft.inject_adapter_in_model(
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            pipe.text_encoder,
        )
    path = tmp_path_factory.mktemp("lora")
    type(pipe).save_lora_weights(
        path,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    )
    return path


def run_step(pipe, step, lora_dir):
    getattr(pipe, step)(lora_dir) if step == "load_lora_weights" else getattr(pipe, step)()


@pytest.fixture(scope="module")
def lora_reference(lora_dir):
    """The image after each LoRA step without offload, and the final weights."""
    pipe = build_tiny_sd3_pipeline()
    images = []
    for step in LORA_STEPS:
        run_step(pipe, step, lora_dir)
        images.append(generate(pipe))
    return images, {"transformer": state_of(pipe.transformer), "text_encoder": state_of(pipe.text_encoder)}


@pytest.mark.parametrize("enable_after", [0, 1, 2, 3])
@pytest.mark.parametrize("strategy", ["layerwise", "model", "layerwise_streamed_encoders", "all_resident"])
def test_lora_steps_while_offloaded_equal_the_same_steps_without(
    lora_dir, lora_reference, enable_after, strategy
):
    # enable_after=0: LoRA loaded while offloaded; 1: loaded before; 2: fused before, unfused offloaded.
    images, final_state = lora_reference
    pipe = dof.attach(build_tiny_sd3_pipeline())
    for index, step in enumerate(LORA_STEPS):
        if index == enable_after:
            if strategy == "layerwise_streamed_encoders":  # the text encoder's LoRA streams per layer
                pipe.enable_layerwise_offload("cpu", encoders="stream")
            elif strategy == "all_resident":  # the planner keeps everything on the device
                plan = pipe.enable_offload("1GiB", "cpu", reserve=0).plan
                assert {c.strategy for c in plan.components} == {"resident"}
            else:
                getattr(pipe, f"enable_{strategy}_offload")("cpu")
        run_step(pipe, step, lora_dir)
        assert torch.equal(generate(pipe), images[index]), step
    pipe.disable_offload()
    # Base weights end exactly as the same steps leave them without offload (no LoRA applied twice).
    for name, state in final_state.items():
        after = getattr(pipe, name).state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items()), name


def test_lora_loaded_while_offloaded_streams_with_its_block(lora_dir):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    handle = pipe.enable_layerwise_offload("cpu")
    ring = handle.components["transformer"].ring
    pipe.load_lora_weights(lora_dir)
    generate(pipe)
    for block, group in zip(pipe.transformer.transformer_blocks, ring.groups, strict=True):
        lora = [p for name, p in block.named_parameters() if "lora_" in name]
        assert lora and all(any(p is t for t in group.tensors) for p in lora)
    assert only_placeholders(pipe.transformer) and only_placeholders(pipe.text_encoder)
    # Only the groups that gained LoRA layers were re-packed, not the whole model.
    assert sorted(handle.repacked) == sorted([group.name for group in ring.groups] + ["text_encoder"])
    pipe.fuse_lora()  # changes values only: nothing to re-pack
    assert len(handle.repacked) == len(ring.groups) + 1


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_load_state_dict_and_in_place_edits_while_offloaded(strategy):
    reference = build_tiny_sd3_pipeline()
    new_state = {k: v * 1.01 for k, v in reference.transformer.state_dict().items()}
    reference.transformer.load_state_dict(new_state)
    with torch.no_grad():
        reference.transformer.transformer_blocks[0].attn.to_q.weight.mul_(2)
    expected = generate(reference)

    pipe = dof.attach(build_tiny_sd3_pipeline())
    handle = getattr(pipe, f"enable_{strategy}_offload")("cpu")
    generate(pipe)
    pipe.transformer.load_state_dict(new_state)
    with handle.edit_weights(), torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn.to_q.weight.mul_(2)
    assert only_placeholders(pipe.transformer)
    assert torch.equal(generate(pipe), expected)
    assert handle.repacked == []
    pipe.disable_offload()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in reference.transformer.state_dict().items())


def test_fuse_qkv_projections_while_offloaded():
    reference = build_tiny_sd3_pipeline()
    reference.transformer.fuse_qkv_projections()
    expected = generate(reference)
    pipe = dof.attach(build_tiny_sd3_pipeline())
    pipe.enable_layerwise_offload("cpu")
    pipe.transformer.fuse_qkv_projections()
    assert torch.equal(generate(pipe), expected)
    pipe.transformer.unfuse_qkv_projections()
    pipe.disable_offload()
    assert torch.equal(generate(pipe), generate(build_tiny_sd3_pipeline()))


def test_two_adapters_set_and_deleted_while_offloaded(lora_dir):
    def steps(pipe, offload):
        images = []
        pipe.load_lora_weights(lora_dir, adapter_name="a")
        if offload:
            pipe.enable_layerwise_offload("cpu")
        pipe.load_lora_weights(lora_dir, adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
        images.append(generate(pipe))
        pipe.delete_adapters("a")
        images.append(generate(pipe))
        pipe.disable_lora()
        images.append(generate(pipe))
        return images

    expected = steps(build_tiny_sd3_pipeline(), offload=False)
    pipe = dof.attach(build_tiny_sd3_pipeline())
    got = steps(pipe, offload=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len({tuple(image.flatten()[:8].tolist()) for image in expected}) == 3  # each step changed it
    assert only_placeholders(pipe.transformer)
    assert not any("lora_A.a" in name for name, _ in pipe.transformer.named_parameters())
