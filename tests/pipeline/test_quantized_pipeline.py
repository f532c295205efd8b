"""A quantized pipeline under the planner and layer-wise offload: sized by its quantized bytes, bitwise."""

import pytest
import torch
from quantizers import quantize_quanto, quantize_torchao

import diffusers_offload as dof
from diffusers_offload.engine.packing import storage_leaves
from diffusers_offload.model_registry import get_adapter
from diffusers_offload.planning import measure_components
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat on a laptop", **TINY_SD3_CALL, generator=generator, output_type="pt").images


@pytest.mark.parametrize("quantize", [quantize_torchao, quantize_quanto], ids=["torchao", "quanto"])
@pytest.mark.parametrize("strategy", ["budget", "layerwise"])
def test_quantized_pipeline_offloads_bitwise_and_is_sized_by_its_bytes(quantize, strategy):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    quantize(pipe.transformer)
    reference = generate(pipe)
    transformer = pipe.transformer
    stored = sum(
        leaf.numel() * leaf.element_size()
        for t in (*transformer.parameters(), *transformer.buffers())
        for leaf in storage_leaves(t)
    )
    (sizes,) = [
        s
        for s in measure_components(get_adapter(pipe).components(pipe), get_adapter(pipe))
        if s.name == "transformer"
    ]
    assert sizes.total_bytes == stored < sum(p.numel() * 4 for p in transformer.parameters())
    if strategy == "budget":
        handle = pipe.enable_offload(vram_budget="900KiB", device="cpu", reserve=0)
        assert handle.plan is not None
    else:
        handle = pipe.enable_layerwise_offload("cpu")
    assert handle.components["transformer"].groups
    assert sum(g.data_bytes for g in handle.components["transformer"].groups) == stored
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()
    assert torch.equal(generate(pipe), reference)
