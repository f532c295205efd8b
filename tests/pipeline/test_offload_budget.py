"""`enable_offload(vram_budget=...)` on a tiny SD3 pipeline: the plan is carried out and respected."""

import pytest
import torch
from offload_probes import DeferredCopier, on_every_leaf_forward

import diffusers_offload as dof
from diffusers_offload.engine.packing import is_placeholder
from diffusers_offload.model_registry import get_adapter
from diffusers_offload.planning.sizing import measure_components
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline, build_tiny_sd3_transformer


def generate(pipe):
    return pipe("a cat", **TINY_SD3_CALL, generator=torch.Generator().manual_seed(0), output_type="pt").images


def materialised_bytes(pipe) -> int:
    """Bytes of weights that hold real data right now, each tensor once (walks every parameter)."""
    seen, total = set(), 0
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer, pipe.vae):
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen and not is_placeholder(tensor):
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.fixture(scope="module")
def reference():
    return generate(build_tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def sizes():
    pipe = build_tiny_sd3_pipeline()
    adapter = get_adapter(pipe)
    return {s.name: s for s in measure_components(adapter.components(pipe), adapter)}


def budgets(sizes):
    total = sum(s.device_bytes for s in sizes.values())
    largest = max(s.device_bytes for s in sizes.values())
    # One byte short of the largest component: it must stream (with prefetch 0, its 2 blocks fit a
    # ring of one slot plus its other part).
    return {"resident": total + 1024, "swapped": largest + 1024, "streamed": largest - 1}


@pytest.mark.parametrize("tier", ["resident", "swapped", "streamed"])
def test_plan_is_carried_out_and_respected(reference, sizes, tier):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    budget = budgets(sizes)[tier]
    handle = pipe.enable_offload(budget, "cpu", reserve=0, prefetch=0 if tier == "streamed" else 1)
    plan = handle.plan
    strategies = {c.name: c.strategy for c in plan.components}
    if tier == "resident":
        assert set(strategies.values()) == {"resident"}
    elif tier == "swapped":
        assert "swapped" in strategies.values() and "streamed" not in strategies.values()
    else:
        assert "streamed" in strategies.values()
    assert plan.peak_device_bytes <= budget
    peak = 0

    def check(name, leaf):
        nonlocal peak
        peak = max(peak, materialised_bytes(pipe))
        assert materialised_bytes(pipe) <= plan.peak_device_bytes

    probes = [on_every_leaf_forward(getattr(pipe, n), check) for n in sizes]
    for probe in probes:
        probe.__enter__()
    try:
        assert torch.equal(generate(pipe), reference)
    finally:
        for probe in probes:
            probe.__exit__(None, None, None)
    assert peak > 0
    pipe.disable_offload()


@pytest.mark.parametrize("encoders", ["swap", "stream"])
def test_swapped_rings_keep_copies_ordered_with_compute(reference, encoders):
    # Rings whose slots are freed and allocated again at each swap, under the copier that models the
    # copy and compute streams: every copy into a slot is ordered after the last read of it.
    copier = DeferredCopier()
    pipe = dof.attach(build_tiny_sd3_pipeline())
    # prefetch=0: one slot per ring, so each block is copied into the slot its predecessor just read.
    pipe.enable_layerwise_offload("cpu", prefetch=0, encoders=encoders, copier=copier)
    with copier:
        for _ in range(2):
            assert torch.equal(generate(pipe), reference)
    assert copier.violations == [] and copier.reads > 0
    assert len(pipe.offload_handle.rings) == (4 if encoders == "stream" else 1)
    pipe.disable_offload()


def test_impossible_budget_names_the_minimum(sizes):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    with pytest.raises(ValueError, match=r"at least \d+\.\d\d KiB"):  # small sizes in a unit that fits
        pipe.enable_offload(1024, "cpu", reserve=0)
    assert pipe.offload_handle is None


def test_budget_strings_and_cpu_without_budget():
    pipe = dof.attach(build_tiny_sd3_pipeline())
    with pytest.raises(ValueError, match="vram_budget"):
        pipe.enable_offload(device="cpu")
    with pytest.raises(ValueError):
        pipe.enable_offload("eight gigs", "cpu")
    handle = pipe.enable_offload("1GiB", "cpu", reserve="0")
    assert {c.strategy for c in handle.plan.components} == {"resident"}
    pipe.disable_offload()


def test_layerwise_with_budget_keeps_resident_blocks():
    pipe = dof.attach(build_tiny_sd3_pipeline())
    pipe.transformer = build_tiny_sd3_transformer(seed=7, num_layers=6)  # a DiT larger than the T5
    reference = generate(pipe)
    adapter = get_adapter(pipe)
    sizes = {s.name: s for s in measure_components(adapter.components(pipe), adapter)}
    dit = sizes["transformer"]
    assert dit.device_bytes > max(s.device_bytes for n, s in sizes.items() if n != "transformer")
    budget = dit.device_bytes - 1  # the DiT cannot be whole: it streams, keeping what fits resident
    handle = pipe.enable_layerwise_offload("cpu", vram_budget=budget, reserve=0)
    dit_plan = handle.plan.component("transformer")
    assert dit_plan.strategy == "streamed"
    assert len(dit_plan.resident_blocks) >= 1 and len(dit_plan.streamed_blocks) >= 1
    record = handle.components["transformer"]
    assert len(record.ring.groups) == len(dit_plan.streamed_blocks)
    blocks = pipe.transformer.transformer_blocks
    streamed_ids = {id(t) for g in record.ring.groups for t in g.tensors}
    for i in dit_plan.resident_blocks:  # resident blocks are loaded with the DiT's other part, never streamed
        assert not any(id(p) in streamed_ids for p in blocks[i].parameters())
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()
    with pytest.raises(ValueError, match="not both"):
        pipe.enable_layerwise_offload("cpu", vram_budget="1GiB", resident_blocks=1)
    assert pipe.offload_handle is None


@pytest.mark.parametrize("mode", ["model", "layerwise", "stream-encoders"])
def test_report_matches_what_is_materialised(reference, mode):
    pipe = dof.attach(build_tiny_sd3_pipeline())
    if mode == "model":
        pipe.enable_model_offload("cpu")
    else:
        pipe.enable_layerwise_offload("cpu", encoders="stream" if mode == "stream-encoders" else "swap")
    report = pipe.offload_report()
    assert sum(c.device_weight_bytes for c in report.components) == materialised_bytes(pipe) == 0
    checked = 0

    def check(name, leaf):
        nonlocal checked
        checked += 1
        assert sum(c.device_weight_bytes for c in pipe.offload_report().components) == materialised_bytes(
            pipe
        )

    with on_every_leaf_forward(pipe.transformer, check), on_every_leaf_forward(pipe.text_encoder_2, check):
        assert torch.equal(generate(pipe), reference)
    assert checked > 0
    report = pipe.offload_report()
    assert sum(c.device_weight_bytes for c in report.components) == materialised_bytes(pipe)
    assert sum(c.host_bytes for c in report.components) == pipe.offload_handle.host_bytes
    assert all(c.loads > 0 for c in report.components)
    dit = next(c for c in report.components if c.name == "transformer")
    if mode != "model":
        assert dit.strategy == "streamed" and dit.blocks_streamed == 2
        # Each block and the DiT's other part were copied at least once (2 slots hold both tiny blocks).
        assert dit.bytes_moved >= pipe.offload_handle.components["transformer"].member.group.nbytes + sum(
            g.data_bytes for g in pipe.offload_handle.components["transformer"].ring.groups
        )
    text = str(report)
    assert "transformer" in text and "host" in text and text.count("\n") >= 6
    assert report._repr_html_().startswith("<table>")
    pipe.disable_offload()
    with pytest.raises(RuntimeError, match="not enabled"):
        pipe.offload_report()
