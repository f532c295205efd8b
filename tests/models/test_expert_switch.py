"""Wan 2.2's expert switch: the low-noise expert's head is prefetched during the high-noise expert's last
blocks (from the second pipeline call on, once the swap set has seen which expert follows which), copies
are ordered against compute, a turn that runs longer than learned cancels the hand-over, and the plan's
flag decides whether the next expert's non-block part is copied ahead."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from offload_probes import DeferredCopier, on_every_leaf_forward, only_placeholders

import diffusers_offload as dof
from diffusers_offload.engine.ring import EMPTY
from diffusers_offload.model_registry import get_adapter, pipeline_modules
from diffusers_offload.pipeline import placements_from_plan
from diffusers_offload.planning import plan_offload
from diffusers_offload.planning.planner import ComponentPlan
from diffusers_offload.tiny.wan import TINY_WAN_CALL, build_tiny_wan_pipeline

wan22 = functools.partial(build_tiny_wan_pipeline, two_experts=True)


def _generate(pipe, steps: int = TINY_WAN_CALL["num_inference_steps"]) -> torch.Tensor:
    call = {**TINY_WAN_CALL, "num_inference_steps": steps}
    return pipe("a cat", **call, generator=torch.Generator().manual_seed(0), output_type="pt").frames


@functools.cache
def _reference(steps: int) -> torch.Tensor:
    return _generate(wan22(), steps)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_the_next_experts_head_is_copied_before_its_first_forward_and_waited_for(prefetch):
    pipe = dof.attach(wan22())
    copier = DeferredCopier()
    handle = pipe.enable_layerwise_offload("cpu", prefetch=prefetch, copier=copier)
    high, low = handle.components["transformer"], handle.components["transformer_2"]
    seen = []

    def before_entry(_module, _args):  # runs before the offload's own entry hook
        if not seen or seen[-1][0] != len(runs):
            ring = low.ring
            # Issued, not yet carried out: the copier runs a copy when compute waits for it.
            pending = {slot for slot, _dst, _src in copier.pending.values()}
            slot = ring.staged_slot
            block = slot != EMPTY and high.ring.slots[slot].untyped_storage().data_ptr() in pending
            buffer = low.member.device_buffer
            rest = buffer is not None and buffer.untyped_storage().data_ptr() in pending
            seen.append((len(runs), rest, block))

    runs, previous_loads = [], 0
    hook = pipe.transformer_2.register_forward_pre_hook(before_entry, prepend=True)
    try:
        for call in range(3):
            ring_loads, low_on_demand = high.ring.loads, low.ring.on_demand_loads
            runs.append(call)
            with copier:
                assert torch.equal(_generate(pipe), _reference(4))
            runs_on_demand = low.ring.on_demand_loads - low_on_demand
            # The first call learns the switch and loads at the entry; later calls prefetch the head.
            assert runs_on_demand == (1 if call == 0 else 0)
            if call == 1 and prefetch == 1:  # (a deeper ring holds all three tiny blocks)
                # The high-noise expert no longer prefetches its own first block for a call that never comes.
                assert high.ring.loads - ring_loads == previous_loads - 1
            previous_loads = high.ring.loads - ring_loads
    finally:
        hook.remove()
    # At the low-noise expert's first forward of each call: its non-block part copied ahead, and its first
    # block in flight into a slot of the high-noise expert's ring.
    assert [entry[1:] for entry in seen] == [(False, False), (True, True), (True, True)]
    assert low.member.loads_ahead == 2 and low.member.loads == 3
    # Every copy into a slot waited for the last read of it, and every read for the copy into it.
    assert copier.violations == [] and copier.reads > 0
    pipe.disable_offload()


def test_the_head_is_on_the_device_only_during_the_last_call_before_the_switch():
    pipe = dof.attach(wan22())
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1)
    low = handle.components["transformer_2"].member
    calls, ahead = [0], []

    def count(_module, _args):
        calls[0] += 1

    def check(_name, _leaf):
        assert only_placeholders(pipe.transformer_2)  # its weights point at nothing before its entry
        if low.device_buffer is not None:
            ahead.append(calls[0])

    hook = pipe.transformer.register_forward_pre_hook(count)
    try:
        with on_every_leaf_forward(pipe.transformer, check):
            for _ in range(2):
                calls[0] = 0
                assert torch.equal(_generate(pipe), _reference(4))
    finally:
        hook.remove()
    # Two steps with CFG on the high-noise expert: four calls, of which only the last holds the head.
    assert ahead and set(ahead) == {4}
    pipe.disable_offload()


@pytest.mark.parametrize("kind", ["model", "layerwise"])
def test_calls_whose_switch_moves_stay_bitwise_and_cancel_a_hand_over_that_comes_too_early(kind):
    pipe = dof.attach(wan22())
    copier = DeferredCopier()
    if kind == "model":
        handle = pipe.enable_model_offload("cpu", copier=copier)
    else:
        handle = pipe.enable_layerwise_offload("cpu", prefetch=1, copier=copier)
    # 4 steps: two on the high-noise expert; 3 steps (999, 857, 600): one; so the second call's switch
    # comes earlier than learned, and the third call's later (its hand-over is cancelled).
    for steps in (4, 3, 4, 4):
        with copier:
            assert torch.equal(_generate(pipe, steps), _reference(steps))
    assert copier.violations == []
    low = handle.components["transformer_2"]
    if kind == "layerwise":
        # Ahead in the third call (then cancelled: loaded again at the entry) and in the fourth.
        assert low.member.loads_ahead == 2 and low.member.loads == 5
    else:
        assert low.member.loads_ahead == 0 and low.member.loads == 4
    pipe.disable_offload()


def test_the_plan_decides_whether_the_next_experts_rest_is_copied_ahead():
    pipe = dof.attach(wan22())
    adapter = get_adapter(pipe)
    modules = pipeline_modules(pipe)
    sizes = {s.name: s for s in dof.planning.measure_components(adapter.components(pipe), adapter)}
    high = sizes["transformer"]
    ring = high.other_bytes + 2 * max(high.block_bytes)
    experts = [sizes["transformer"], sizes["transformer_2"]]
    plan = plan_offload(experts, ring, reserve=0, strategy="layerwise")  # every expert block streamed
    assert not any(p.rest_ahead for p in plan.components)  # the tiny DiT's rest is larger than a block
    # The encoder and the VAE swapped beside them (a plan of the experts alone, as the tiny ones are small).
    others = [
        ComponentPlan(n, adapter.role(n), "swapped", (), (), 0, 0, 0)
        for n in modules
        if n not in ("transformer", "transformer_2")
    ]
    plan = dataclasses.replace(plan, components=(*plan.components, *others))
    placements = placements_from_plan(adapter, modules, plan)
    assert placements["transformer"].hand_over and not placements["transformer"].rest_ahead
    assert not placements["vae"].hand_over
    handle = dof.engine.apply_placements(modules, placements, "cpu")
    pipe._offload_handle, pipe._offload_adapter = handle, adapter
    for _ in range(2):
        assert torch.equal(_generate(pipe), _reference(4))
    low = handle.components["transformer_2"]
    # Its first block was prefetched into a slot of the high-noise expert; its rest loaded at its entry.
    assert low.member.loads_ahead == 0 and low.ring.on_demand_loads == 1
    pipe.disable_offload()


def test_a_next_expert_whose_first_block_is_on_disk_loads_it_through_its_reader(tmp_path, monkeypatch):
    # Its head has no host slab to copy ahead: the hand-over copies nothing into the lent slot, and the
    # block comes from the disk reader at its first forward, bitwise as without offload.
    import diffusers_offload.pipeline as surface

    apply_ram_budget = surface.apply_ram_budget

    def every_block_on_disk(*args, **kwargs):
        placements, host_plan = apply_ram_budget(*args, **kwargs)
        low = placements["transformer_2"]
        count = len(pipeline_modules(wan22())["transformer_2"].blocks)
        return {
            **placements,
            "transformer_2": dataclasses.replace(low, disk_blocks=tuple(range(count))),
        }, host_plan

    monkeypatch.setattr(surface, "apply_ram_budget", every_block_on_disk)
    wan22().save_pretrained(tmp_path)
    pipe = dof.OffloadPipeline.from_pretrained(
        tmp_path, offload="layerwise", ram_budget=5_900_000, device="cpu", dtype=torch.float32
    )
    low = pipe.offload_handle.components["transformer_2"]
    assert low.member.hand_over and low.ring.groups[0].on_disk
    for _ in range(3):
        assert torch.equal(_generate(pipe), _reference(TINY_WAN_CALL["num_inference_steps"]))


def test_the_next_experts_resident_blocks_arrive_behind_its_non_block_part_not_with_it():
    # Where the plan has no room for the next expert's non-block part beside the running one (rest_ahead
    # off), its entry copies that part and waits for it, while its resident blocks' copies are still in
    # flight: each block waits for its own copy at its first forward.
    pipe = dof.attach(wan22())
    copier = DeferredCopier()
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1, resident_blocks=1, copier=copier)
    low = handle.components["transformer_2"]
    for name in ("transformer", "transformer_2"):
        handle.components[name].member.rest_ahead = False
    arriving = low.member.arriving
    assert arriving is not None and len(arriving.ranges) == 1
    in_flight = []

    def after_entry(_module, _args):
        buffer = low.member.device_buffer.untyped_storage().data_ptr()
        pending = [
            dst for _slot, dst, _src in copier.pending.values() if dst.untyped_storage().data_ptr() == buffer
        ]
        in_flight.append((len(arriving.events), sum(dst.numel() for dst in pending)))

    hook = pipe.transformer_2.register_forward_pre_hook(after_entry)
    try:
        for _ in range(3):
            with copier:
                assert torch.equal(_generate(pipe), _reference(4))
            assert arriving.events == []  # every copy was waited for by the end of the call
    finally:
        hook.remove()
    start, end = arriving.ranges[0]
    # At each entry (the low-noise expert's first call of each pipeline call): its one resident block,
    # and only its bytes, still in flight; at its later calls nothing.
    assert in_flight[0] == (1, end - start) and in_flight.count((1, end - start)) == 3
    assert set(in_flight) == {(1, end - start), (0, 0)}
    assert copier.violations == []
    pipe.disable_offload()
    for module in pipe.transformer_2.blocks.modules():  # the resident blocks' hooks went with the rest
        assert not hasattr(module, "_diffusers_hook")


def test_an_edit_that_repacks_the_next_experts_slab_falls_back_to_copying_it_whole():
    from peft import LoraConfig

    def add_lora(pipe):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            config = LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False)
            pipe.transformer_2.add_adapter(config)

    reference = wan22()
    add_lora(reference)
    expected = _generate(reference)
    pipe = dof.attach(wan22())
    copier = DeferredCopier()
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1, resident_blocks=1, copier=copier)
    for name in ("transformer", "transformer_2"):
        handle.components[name].member.rest_ahead = False
    low = handle.components["transformer_2"]
    layout = low.member.group.layout
    add_lora(pipe)  # adds tensors to every block: the slab is repacked
    assert low.member.group.layout != layout
    assert not torch.equal(expected, _reference(4))
    in_flight = []
    hook = pipe.transformer_2.register_forward_pre_hook(
        lambda _module, _args: in_flight.append(len(low.member.arriving.events))
    )
    try:
        for _ in range(2):
            with copier:
                assert torch.equal(_generate(pipe), expected)
    finally:
        hook.remove()
    # The whole repacked slab was copied at each entry (the byte ranges taken at enable are stale).
    assert in_flight and set(in_flight) == {0}
    assert copier.violations == []
    pipe.disable_offload()
