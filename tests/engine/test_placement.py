"""`apply_placements` is the one path: the standalone entry points are placements, and a streamed member
may keep its rest resident."""

import pytest
import torch
from offload_probes import materialised, only_placeholders

import diffusers_offload as dof
from diffusers_offload.engine.packing import is_placeholder


def test_layerwise_offload_is_one_streamed_member_whose_rest_stays_resident(dit):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, resident_blocks=1)
    [(name, record)] = handle.components.items()
    assert name == type(dit.model).__name__
    assert handle.kind == "layerwise"
    assert record.placement.strategy == "streamed" and record.placement.rest_resident
    [swap_set] = handle.swap_sets
    assert swap_set.members == [record.member]
    assert record.member.group is None  # nothing outside the blocks is packed: it stays on the device
    assert record.member.ring is record.ring is handle.rings[0]
    assert len(record.ring.groups) == len(dit.blocks) - 1 and record.resident_blocks == 1
    # Alone in its swap set, the member is never pushed out: its slots exist from the start.
    assert len(record.ring.slots) == 2
    rest = [t for m in (dit.model.pos_embed, dit.model.norm_out, dit.model.proj_out) for t in m.parameters()]
    assert rest and not any(is_placeholder(t) for t in rest)
    assert record.resident_bytes == handle.resident_bytes > 0
    for i, reference in enumerate(dit.references):
        assert torch.equal(dit.run(i), reference)
    handle.remove()
    dit.assert_restored()


def test_model_offload_is_one_swapped_member_per_module(dit):
    other = torch.nn.Linear(4, 4)
    handle = dof.apply_model_offload([dit.model, other], device="cpu")
    assert {name: r.placement.strategy for name, r in handle.components.items()} == {
        "0": "swapped",
        "1": "swapped",
    }
    assert handle.kind == "model" and not handle.rings
    handle.remove()


def test_a_streamed_member_with_resident_rest_keeps_it_while_others_run(dit):
    encoder = torch.nn.Linear(8, 8)
    with torch.no_grad():
        expected = encoder(torch.ones(1, 8))
    placements = {
        "transformer": dof.Placement("streamed", ("transformer_blocks",), 0, 1, rest_resident=True),
        "encoder": dof.Placement("swapped"),
    }
    handle = dof.apply_placements({"transformer": dit.model, "encoder": encoder}, placements, device="cpu")
    ring = handle.components["transformer"].ring
    assert not ring.slots  # two members take turns: slots are allocated when the DiT is entered
    assert torch.equal(dit.run(0), dit.references[0])
    assert ring.slots
    with torch.no_grad():
        assert torch.equal(encoder(torch.ones(1, 8)), expected)
    # Entering the encoder gave the ring's slots back, but the DiT's rest stayed on the device.
    assert not ring.slots and all(only_placeholders(block) for block in dit.blocks)
    assert materialised(dit.model.proj_out) and materialised(encoder)
    assert torch.equal(dit.run(1), dit.references[1])
    assert only_placeholders(encoder)
    handle.remove()
    dit.assert_restored()


def test_rest_resident_applies_to_streamed_components_only(dit):
    with pytest.raises(ValueError, match="rest_resident applies to the 'streamed' strategy only"):
        dof.apply_placements(
            {"transformer": dit.model}, {"transformer": dof.Placement("swapped", rest_resident=True)}, "cpu"
        )
    assert not hasattr(dit.model, "_diffusers_offload_handle")  # nothing was applied
    dit.assert_restored()
