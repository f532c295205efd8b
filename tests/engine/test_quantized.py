"""Quantized weights stream as their bytes: torchao, optimum-quanto and GGUF, bitwise as without offload."""

import pytest
import torch
from quantizers import QUANTIZERS

import diffusers_offload as dof
from diffusers_offload.engine.packing import is_placeholder, storage_leaves
from diffusers_offload.tiny.sd3 import build_tiny_sd3_transformer


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 16, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 7, 96, generator=gen),
        pooled_projections=torch.randn(2, 80, generator=gen),
        timestep=torch.tensor([500.0, 500.0]),
    )


def quantized_weights(model):
    return [p for p in model.transformer_blocks.parameters() if type(p) is not torch.nn.Parameter]


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_quantized_blocks_stream_as_bytes(quantizer, inputs, tmp_path):
    model = build_tiny_sd3_transformer(seed=3, num_layers=4)
    plain_bytes = sum(p.numel() * p.element_size() for p in model.transformer_blocks.parameters())
    QUANTIZERS[quantizer](model, tmp_path)
    weights = quantized_weights(model)
    assert weights, "the quantizer left no quantized weight in the blocks"
    reference = run(model, inputs)
    blocks = model.transformer_blocks
    leaves = [leaf for t in (*blocks.parameters(), *blocks.buffers()) for leaf in storage_leaves(t)]
    leaf_bytes = sum(t.numel() * t.element_size() for t in leaves)

    handle = dof.apply_layerwise_offload(model, device="cpu", prefetch=1)
    ring = handle.rings[0]
    # Packed as their inner bytes, one copy per block: fewer bytes than the float weights were.
    streamed = sum(group.data_bytes for group in ring.groups)
    assert streamed == leaf_bytes < plain_bytes
    for _ in range(2):
        assert torch.equal(run(model, inputs), reference)
    loaded = {owner for owner in ring.slot_owner if owner >= 0}
    offloaded = [leaf for i, group in enumerate(ring.groups) if i not in loaded for leaf in group.leaves]
    assert ring.loads > len(ring.groups) and offloaded and all(is_placeholder(t) for t in offloaded)
    # The quantized parameters keep their identity and type: only their inner tensors are re-pointed.
    assert all(a is b for a, b in zip(quantized_weights(model), weights, strict=True))

    handle.remove()
    assert not any(is_placeholder(leaf) for leaf in leaves)
    assert torch.equal(run(model, inputs), reference)


def test_bitsandbytes_int8_is_refused_naming_what_works():
    import bitsandbytes as bnb

    model = build_tiny_sd3_transformer(seed=3, num_layers=2)
    attn = model.transformer_blocks[0].attn
    layer = bnb.nn.Linear8bitLt(attn.to_q.in_features, attn.to_q.out_features, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(
        attn.to_q.weight.detach().clone(), requires_grad=False, has_fp16_weights=False
    )
    attn.to_q = layer.to("cpu")
    with pytest.raises(ValueError, match="Int8Params.*4-bit Params4bit streams.*torchao or optimum-quanto"):
        dof.apply_layerwise_offload(model, device="cpu")
    assert not any(is_placeholder(p) for p in model.parameters())


def test_opaque_subclasses_are_refused_naming_what_works():
    class Opaque(torch.nn.Parameter):
        """A Parameter subclass carrying a tensor outside its data (like bitsandbytes' quant state)."""

    model = build_tiny_sd3_transformer(seed=3, num_layers=2)
    weight = model.transformer_blocks[0].attn.to_q.weight
    opaque = Opaque(weight.detach().clone(), requires_grad=False)
    opaque.absmax = torch.ones(3)
    model.transformer_blocks[0].attn.to_q.weight = opaque
    with pytest.raises(ValueError, match="torchao.*optimum-quanto.*GGUFParameter"):
        dof.apply_layerwise_offload(model, device="cpu")
    assert not any(is_placeholder(p) for p in model.parameters())


def test_quantization_state_shared_by_two_blocks_is_refused():
    model = build_tiny_sd3_transformer(seed=3, num_layers=3)
    QUANTIZERS["bnb_nf4"](model, None)
    first, second = (block.attn.to_q.weight for block in model.transformer_blocks[:2])
    second.quant_state = first.quant_state  # one absmax tensor re-pointed by two blocks' groups
    with pytest.raises(ValueError, match="shared with another block"):
        dof.apply_layerwise_offload(model, device="cpu")
    assert not any(is_placeholder(leaf) for p in model.parameters() for leaf in storage_leaves(p))
