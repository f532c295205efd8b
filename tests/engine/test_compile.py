"""Regional torch.compile with layer-wise offload: blocks compiled alone, the ring outside the graph."""

import pytest
import torch
from torch._dynamo.utils import counters

import diffusers_offload as dof
from diffusers_offload.tiny.qwen_image import build_tiny_qwen_image_transformer

NUM_BLOCKS = 3


def build():
    return build_tiny_qwen_image_transformer(seed=4, num_layers=NUM_BLOCKS)


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    return [
        dict(
            hidden_states=torch.randn(1, 16, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 5, 32, generator=gen),
            encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool),
            timestep=torch.tensor([0.5 - 0.1 * i]),
            img_shapes=[(1, 4, 4)],
            return_dict=False,
        )
        for i in range(3)
    ]


def run_all(model, inputs):
    with torch.no_grad():
        return [model(**x)[0] for x in inputs]


@pytest.fixture(scope="module")
def compiled_reference():
    """Outputs of the regionally compiled model without offload (inductor on the CPU)."""
    torch._dynamo.reset()
    model = build()
    model.compile_repeated_blocks(fullgraph=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (set per test, after module-scoped fixtures): bitwise
    try:
        return run_all(model, make_inputs())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("compile_first", [True, False], ids=["compile_then_offload", "offload_then_compile"])
def test_compile_repeated_blocks_with_layerwise_offload(compiled_reference, compile_first):
    inputs = make_inputs()
    model = build()
    if compile_first:
        model.compile_repeated_blocks(fullgraph=True)
        handle = dof.apply_layerwise_offload(model, device="cpu", prefetch=1)
    else:
        handle = dof.apply_layerwise_offload(model, device="cpu", prefetch=1)
        model.compile_repeated_blocks(fullgraph=True)
    counters.clear()
    outputs = run_all(model, inputs)
    # Equal to the compiled model without offload, and nothing recompiled over the 3 calls: the ring's
    # counters and slot choice are not in the graph, and re-pointed weights are ordinary inputs.
    assert all(torch.equal(a, b) for a, b in zip(outputs, compiled_reference, strict=True))
    assert not counters["recompiles"], dict(counters["recompiles"])
    ring = handle.rings[0]
    assert ring.calls == 3 * NUM_BLOCKS and ring.loads > NUM_BLOCKS  # streamed eagerly, block by block
    handle.remove()
    assert not any(
        isinstance(b._compiled_call_impl, dof.engine.hooks.LoadAroundCompiled)
        for b in model.transformer_blocks
    )
    assert all(torch.equal(a, b) for a, b in zip(run_all(model, inputs), compiled_reference, strict=True))


def test_compiling_the_whole_model_is_refused_naming_regional_compile():
    torch._dynamo.reset()
    model = build()
    handle = dof.apply_layerwise_offload(model, device="cpu")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="compile_repeated_blocks"):
        run_all(compiled, make_inputs()[:1])
    handle.remove()
