"""Weight edits on a module offloaded with apply_layerwise_offload: streamed blocks and a resident rest."""

import peft
import torch
from offload_probes import only_placeholders

import diffusers_offload as dof
from diffusers_offload.tiny.sd3 import build_tiny_sd3_transformer

CONFIG = dict(r=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)


def add_lora(model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model.add_adapter(peft.LoraConfig(**CONFIG))


def test_lora_added_and_fused_on_a_standalone_offloaded_module(dit):
    reference = build_tiny_sd3_transformer(seed=3, num_layers=5)
    add_lora(reference)
    with torch.no_grad():
        with_lora = reference(**dit.inputs[0]).sample
        reference.fuse_lora()
        fused = reference(**dit.inputs[0]).sample

    handle = dof.apply_layerwise_offload(dit.model, device="cpu")
    add_lora(dit.model)
    assert torch.equal(dit.run(0), with_lora)
    # LoRA layers inside blocks joined their block's group; the one on proj_out (outside the blocks)
    # went to the device with the resident rest.
    assert sorted(handle.repacked) == sorted(group.name for group in handle.rings[0].groups)
    assert all(
        only_placeholders(block) for i, block in enumerate(dit.blocks) if i not in handle.rings[0].slot_owner
    )
    assert not only_placeholders(dit.model.proj_out)
    dit.model.fuse_lora()
    assert torch.equal(dit.run(0), fused)
    handle.remove()
    assert torch.equal(dit.run(0), fused)
