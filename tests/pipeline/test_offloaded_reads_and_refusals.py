"""While offloaded: weights read as their real values, and what cannot work is refused with the fix."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

import diffusers_offload as dof
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat on a laptop", **TINY_SD3_CALL, generator=generator, output_type="pt").images


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_state_dict_num_parameters_and_save_pretrained_read_the_real_weights(strategy, tmp_path):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    count = pipe.transformer.num_parameters()
    encoder_state = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    getattr(pipe, f"enable_{strategy}_offload")("cpu")
    generate(pipe)
    state = pipe.transformer.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert pipe.transformer.num_parameters() == count
    encoder_after = pipe.text_encoder.state_dict()
    assert all(torch.equal(encoder_after[k], v) for k, v in encoder_state.items())
    pipe.transformer.save_pretrained(tmp_path)
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in before.items())
    assert torch.equal(generate(pipe), generate(pipe))  # still offloaded and working


def test_moving_or_casting_a_submodule_is_refused():
    pipe = dof.attach(build_tiny_sd3_pipeline())
    reference = generate(pipe)
    pipe.enable_layerwise_offload("cpu")
    block = pipe.transformer.transformer_blocks[1]
    with pytest.raises(
        RuntimeError, match=r"transformer\.transformer_blocks\.1 is offloaded.*disable_offload"
    ):
        block.to(torch.float64)
    with pytest.raises(RuntimeError, match="is offloaded"):
        pipe.text_encoder.text_model.half()
    assert torch.equal(generate(pipe), reference)


@pytest.mark.parametrize(
    "call",
    [
        lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
        lambda pipe: pipe.enable_sequential_cpu_offload(device="cpu"),
        lambda pipe: pipe.enable_group_offload(
            onload_device="cpu", offload_type="block_level", num_blocks_per_group=1
        ),
        lambda pipe: pipe.transformer.enable_group_offload(onload_device="cpu", num_blocks_per_group=1),
        lambda pipe: pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float16),
    ],
    ids=[
        "model_cpu_offload",
        "sequential_cpu_offload",
        "pipe_group_offload",
        "group_offload",
        "layerwise_casting",
    ],
)
def test_other_offloading_after_ours_is_refused_and_changes_nothing(call):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    reference = generate(pipe)
    pipe.enable_layerwise_offload("cpu")
    with pytest.raises(RuntimeError, match="disable_offload"):
        call(pipe)
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()
    assert torch.equal(generate(pipe), reference)


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_backward_through_offloaded_weights_says_inference_only(dit, strategy):
    if strategy == "layerwise":
        handle = dof.apply_layerwise_offload(dit.model, device="cpu")
    else:
        handle = dof.apply_model_offload([dit.model], device="cpu")
    assert any(p.requires_grad for p in dit.model.parameters())
    loss = dit.model(**dit.inputs[0]).sample.sum()
    with pytest.raises(RuntimeError, match="inference only.*torch.no_grad"):
        loss.backward()
    assert torch.equal(dit.run(0), dit.references[0])
    handle.remove()


def test_meta_device_is_refused_naming_a_real_one(dit):
    with pytest.raises(ValueError, match="device='meta' holds no data.*'cuda' or 'cpu'"):
        dof.apply_layerwise_offload(dit.model, device="meta")
    dit.assert_restored()
