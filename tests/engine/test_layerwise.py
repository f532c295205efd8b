"""Layer-wise offload of a tiny diffusers transformer on the CPU execution device."""

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from offload_probes import DeferredCopier, materialised, on_every_leaf_forward, storage_within

import diffusers_offload as dof
from diffusers_offload.engine import placement
from diffusers_offload.engine.hooks import StreamedBlockHook
from diffusers_offload.engine.packing import is_placeholder


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("resident_blocks", [0, 2, [0, 4]])
def test_bitwise_equal_over_consecutive_calls(dit, prefetch, resident_blocks):
    handle = dof.apply_layerwise_offload(
        dit.model, ["transformer_blocks"], device="cpu", prefetch=prefetch, resident_blocks=resident_blocks
    )
    for _ in range(2):  # each call wraps around from the last block to the first
        for i, reference in enumerate(dit.references):
            assert torch.equal(dit.run(i), reference)
    ring = handle.rings[0]
    assert ring.stats.calls == 6 * len(ring.groups)
    if prefetch > 0:
        # Only the very first block of the first call is loaded on demand: the rest was prefetched,
        # including block 0 of each later call (the wrap-around).
        assert ring.stats.on_demand_loads == 1
    slabs = [group.slab.data for group in handle.groups]  # held, so their addresses stay valid
    handle.remove()
    dit.assert_restored()
    for tensor in [*dit.model.parameters(), *dit.model.buffers()]:  # own storage, not views of a slab
        assert storage_within(tensor, slabs) is None
    for module in dit.model.modules():  # no hook, registry or marker left behind
        assert not hasattr(module, "_diffusers_hook") and not {"forward", "_apply"} & set(vars(module))
        assert not hasattr(module, "_diffusers_offload_handle")


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_at_most_prefetch_plus_one_blocks_materialised(dit, prefetch):
    handle = dof.apply_layerwise_offload(dit.model, ["transformer_blocks"], device="cpu", prefetch=prefetch)
    ring = handle.rings[0]
    blocks = list(dit.blocks)
    block_names = [f"transformer_blocks.{i}." for i in range(len(blocks))]
    seen_in_blocks = 0

    def check(name, leaf):
        nonlocal seen_in_blocks
        loaded = [i for i, block in enumerate(blocks) if materialised(block)]
        assert len(loaded) <= prefetch + 1
        for i in loaded:  # every materialised tensor of a streamed block lives in a ring slot
            for tensor in [*blocks[i].parameters(), *blocks[i].buffers()]:
                assert storage_within(tensor, ring.slots) is not None
        running = [i for i, prefix in enumerate(block_names) if name.startswith(prefix)]
        if running:
            seen_in_blocks += 1
            assert running[0] in loaded
            # Prefetch, observed from the weights: the next `prefetch` blocks (wrapping around to the
            # first blocks of the next call) already hold their data while this one computes.
            for step in range(1, prefetch + 1):
                assert (running[0] + step) % len(blocks) in loaded
        else:  # outside the blocks: resident parts are ordinary tensors, never placeholders
            assert all(not is_placeholder(t) for t in leaf.parameters())

    with on_every_leaf_forward(dit.model, check):
        for i in range(3):
            assert torch.equal(dit.run(i), dit.references[i])
    assert seen_in_blocks > 0
    handle.remove()


def test_offloaded_block_fails_loudly(dit):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=0)
    block = dit.blocks[2]
    assert all(is_placeholder(p) for p in block.parameters())
    # Compute the block while bypassing our hook: empty placeholders cannot be multiplied.
    with pytest.raises(RuntimeError):
        block.norm1.linear(torch.randn(2, 32))
    handle.remove()


def test_parameter_identity_is_kept(dit):
    before = {name: id(p) for name, p in dit.model.named_parameters()}
    handle = dof.apply_layerwise_offload(dit.model, device="cpu")
    dit.run()
    assert {name: id(p) for name, p in dit.model.named_parameters()} == before
    handle.remove()
    assert {name: id(p) for name, p in dit.model.named_parameters()} == before


class SkipBlock(ModelHook):
    """Stands in for a cache hook that skips a block and passes its inputs through."""

    def new_forward(self, module, hidden_states, encoder_hidden_states, **kwargs):
        return encoder_hidden_states, hidden_states


@pytest.mark.parametrize("prefetch", [1, 2])
def test_skipped_blocks_and_repeated_calls_stay_correct(dit, prefetch):
    skipped = [1, 2]

    def skip(enabled):
        for i in skipped:
            registry = HookRegistry.check_if_exists_or_initialize(dit.blocks[i])
            if enabled:
                registry.register_hook(SkipBlock(), "skip")
            else:
                registry.remove_hook("skip", recurse=False)

    skip(True)
    references = [dit.run(i) for i in range(3)]
    skip(False)
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=prefetch)
    skip(True)  # registered after ours, so it wraps our hook like a cache hook would
    for i in [0, 0, 1, 2, 2]:  # repeated calls, like a CFG pipeline calling the DiT twice per step
        assert torch.equal(dit.run(i), references[i])
    skip(False)
    for i in range(3):
        assert torch.equal(dit.run(i), dit.references[i])
    assert handle.rings[0].stats.on_demand_loads > 1
    handle.remove()
    dit.assert_restored()


def test_blocks_called_in_arbitrary_order(dit):
    x = torch.randn(2, 16, 32)
    context = torch.randn(2, 7, 32)
    temb = torch.randn(2, 32)
    order = [3, 0, 4, 4, 1, 2, 0, 3]
    with torch.no_grad():
        expected = [dit.blocks[i](x, context, temb) for i in order]
        handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1)
        for i, want in zip(order, expected, strict=True):
            got = dit.blocks[i](x, context, temb)
            assert all(a is b or torch.equal(a, b) for a, b in zip(got, want, strict=True))
    handle.remove()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_the_ring_learns_which_blocks_a_cache_skips_and_prefetches_those_that_run(dit, prefetch):
    skipped = (1, 2)
    for i in skipped:  # registered after ours, as a cache hook is: our hook never runs for these
        HookRegistry.check_if_exists_or_initialize(dit.blocks[i]).register_hook(SkipBlock(), "skip")
    references = [dit.run(i) for i in range(3)]
    copier = DeferredCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=prefetch, copier=copier)
    ring = handle.rings[0]
    with copier:
        assert torch.equal(dit.run(0), references[0])
        first_pass = ring.stats
        for i in [1, 2, 0]:
            assert torch.equal(dit.run(i), references[i])
    # Only the first pass, which taught the ring the order 0 -> 3 -> 4 -> 0, loaded block 3 on demand.
    assert first_pass.on_demand_loads == 2 and ring.stats.on_demand_loads == 2
    # After it, every load is of a block that runs: 3 per pass, or none once they all fit the slots.
    assert ring.stats.loads - first_pass.loads == (3 * 3 if prefetch + 1 < 3 else 0)
    assert copier.violations == []
    handle.remove()


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_deferred_copies_prove_waits_and_slot_ordering(dit, prefetch):
    copier = DeferredCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=prefetch, copier=copier)
    with copier:
        for _ in range(2):
            for i, reference in enumerate(dit.references):
                assert torch.equal(dit.run(i), reference)
    assert copier.violations == []
    assert copier.deferred_runs > 0 and copier.reads > 0  # the timeline saw the copies and the reads
    handle.remove()


class _NoWaitCopier(DeferredCopier):
    def wait(self, event):  # a broken engine that forgets to wait
        pass


def test_deferred_copier_catches_a_missing_wait(dit):
    copier = _NoWaitCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, copier=copier)
    with copier:
        assert not torch.equal(dit.run(0), dit.references[0])
    assert any("before waiting for its copy" in v for v in copier.violations)
    handle.remove()


def test_deferred_copier_catches_unordered_slot_reuse(dit):
    copier = DeferredCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, copier=copier)
    ring = handle.rings[0]
    ring.release = lambda position: None  # a broken ring that never records the end of a block's use
    with copier:
        dit.run(0)
    assert any("not ordered after the last op" in v for v in copier.violations)
    del ring.release
    handle.remove()


class _EarlyReleaseHook(StreamedBlockHook):
    def new_forward(self, module, *args, **kwargs):  # a broken hook: the slot is released, then read
        self.ring.acquire(self.position)
        self.ring.release(self.position)
        return self.fn_ref.original_forward(*args, **kwargs)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_deferred_copier_catches_a_release_before_the_blocks_compute(dit, prefetch, monkeypatch):
    # The "released" event is recorded before the block's compute is queued: on a GPU the next copy into
    # the slot could overwrite weights still being read. The output on the CPU is still right, so only
    # the timeline of the virtual compute stream can tell.
    monkeypatch.setattr(placement, "StreamedBlockHook", _EarlyReleaseHook)
    copier = DeferredCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=prefetch, copier=copier)
    with copier:
        for i in range(2):
            assert torch.equal(dit.run(i), dit.references[i])
    assert any("not ordered after the last op" in v for v in copier.violations)
    handle.remove()


def test_deferred_copier_needs_the_compute_timeline(dit):
    copier = DeferredCopier()
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, copier=copier)
    with pytest.raises(AssertionError, match="with copier"):
        dit.run(0)  # outside `with copier:` the reads would go unseen
    handle.remove()


def test_stream_copier_matches_the_copier_protocol():
    # The CPU tests drive the ring through SyncCopier and DeferredCopier; the accelerator copier must
    # accept the very same calls.
    import inspect

    from diffusers_offload.engine.transfer import Copier, StreamCopier, SyncCopier

    for name in ("new_event", "copy", "copy_timed", "copy_now", "wait", "record", "stamp", "elapsed_ms"):
        expected = list(inspect.signature(getattr(Copier, name)).parameters.values())
        for copier in (StreamCopier, SyncCopier, DeferredCopier):
            got = list(inspect.signature(getattr(copier, name)).parameters.values())
            assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in expected], (copier, name)
        assert StreamCopier.uses_events and DeferredCopier.uses_events and not SyncCopier.uses_events


def test_removal_frees_the_host_slabs(dit):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1)
    dit.run(0)
    slabs = [group.slab for group in handle.groups]
    handle.remove()
    assert all(slab.nbytes == 0 or slab.data.numel() == 0 for slab in slabs)
    ring = handle.rings[0]
    assert not ring.slots and not ring._src  # nothing the handle keeps still references a slab


def test_exception_inside_a_block_leaves_model_usable(dit):
    copier = DeferredCopier()  # records whether the failed block's slot use was closed before reuse
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, copier=copier)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    dit.blocks[2].ff.forward = explode
    with copier:
        with pytest.raises(RuntimeError, match="boom"):
            dit.run(0)
        del dit.blocks[2].ff.forward
        for i in range(3):
            assert torch.equal(dit.run(i), dit.references[i])
    assert copier.violations == []
    handle.remove()
    dit.assert_restored()


def test_host_memory_is_one_exact_copy(dit):
    streamed_bytes = sum(
        t.numel() * t.element_size() for block in dit.blocks for t in [*block.parameters(), *block.buffers()]
    )
    handle = dof.apply_layerwise_offload(dit.model, device="cpu")
    assert streamed_bytes <= handle.host_bytes <= 1.05 * streamed_bytes
    assert handle.offloaded_bytes == streamed_bytes
    handle.remove()


def test_shared_parameter_between_blocks_stays_resident(dit):
    shared = dit.blocks[1].norm1.linear.weight
    dit.blocks[3].norm1.linear.weight = shared
    with torch.no_grad():
        reference = dit.model(**dit.inputs[0]).sample
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1)
    assert not is_placeholder(shared)
    assert all(shared is not t for group in handle.groups for t in group.tensors)
    assert torch.equal(dit.run(0), reference)
    handle.remove()
