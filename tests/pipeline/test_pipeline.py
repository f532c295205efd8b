"""Offloading a whole tiny SD3 pipeline: model swap, layer-wise streaming, placement and errors."""

import pytest
import torch
from offload_probes import materialised, on_every_leaf_forward, only_placeholders

import diffusers_offload as dof
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline

COMPONENTS = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]


def generate(pipe, prompt="a cat on a laptop"):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, **TINY_SD3_CALL, generator=generator, output_type="pt").images


@pytest.fixture(scope="module")
def reference():
    return generate(build_tiny_sd3_pipeline())


@pytest.fixture
def pipe():
    return dof.attach(build_tiny_sd3_pipeline())


def state_of(pipe):
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in COMPONENTS}


def assert_same_state(pipe, before):
    for name, state in before.items():
        after = getattr(pipe, name).state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items()), name


def test_model_offload_is_bitwise_and_exclusive(pipe, reference):
    before = state_of(pipe)
    pipe.enable_model_offload("cpu")
    entered = set()

    def check(running, leaf):
        entered.add(running)
        assert materialised(getattr(pipe, running))
        for other in COMPONENTS:
            if other != running:
                assert only_placeholders(getattr(pipe, other)), (running, other)

    probes = [
        on_every_leaf_forward(getattr(pipe, name), lambda n, m, c=name: check(c, m)) for name in COMPONENTS
    ]
    for probe in probes:
        probe.__enter__()
    try:
        for _ in range(2):
            assert torch.equal(generate(pipe), reference)
    finally:
        for probe in probes:
            probe.__exit__(None, None, None)
    assert entered == set(COMPONENTS)
    pipe.disable_offload()
    assert_same_state(pipe, before)
    assert torch.equal(generate(pipe), reference)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_layerwise_offload_is_bitwise(pipe, reference, prefetch):
    before = state_of(pipe)
    handle = pipe.enable_layerwise_offload("cpu", prefetch=prefetch)
    blocks = pipe.transformer.transformer_blocks

    def while_encoding(name, leaf):
        # Entering an encoder pushed the whole DiT out: its rest and its ring's slots.
        assert only_placeholders(pipe.transformer)
        assert materialised(pipe.text_encoder_3)
        assert only_placeholders(pipe.vae)

    def while_denoising(name, leaf):
        for encoder in COMPONENTS[:3]:
            assert only_placeholders(getattr(pipe, encoder))
        assert sum(materialised(block) for block in blocks) <= prefetch + 1

    with on_every_leaf_forward(pipe.text_encoder_3, while_encoding):
        with on_every_leaf_forward(pipe.transformer, while_denoising):
            for _ in range(2):
                assert torch.equal(generate(pipe), reference)
    assert handle.rings[0].stats.calls == 2 * 2 * len(blocks)  # 2 calls x 2 steps
    pipe.disable_offload()
    assert_same_state(pipe, before)


def test_layerwise_with_resident_blocks(pipe, reference):
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1, resident_blocks=1)
    blocks = pipe.transformer.transformer_blocks
    ring = handle.components["transformer"].ring
    assert len(ring.groups) == len(blocks) - 1
    streamed = {id(t) for group in ring.groups for t in group.tensors}
    assert not any(id(p) in streamed for p in blocks[0].parameters())  # spread: block 0 stays
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()


def test_execution_device_and_pipe_device(pipe):
    pipe.enable_model_offload("cpu")
    assert pipe._execution_device == torch.device("cpu")
    assert pipe.transformer.dtype == torch.float32
    pipe.disable_offload()


def test_enabling_twice_is_refused(pipe):
    pipe.enable_model_offload("cpu")
    with pytest.raises(RuntimeError, match="disable_offload"):
        pipe.enable_layerwise_offload("cpu")
    with pytest.raises(RuntimeError, match="already has offloading"):
        dof.apply_layerwise_offload(pipe.transformer, device="cpu")
    pipe.disable_offload()


def test_disable_leaves_no_hooks_or_markers(pipe):
    pipe.enable_layerwise_offload("cpu", encoders="stream")
    pipe.disable_offload()
    for name in COMPONENTS:
        for module in getattr(pipe, name).modules():
            assert not hasattr(module, "_diffusers_hook")
            assert not hasattr(module, "_diffusers_offload_handle")
            assert not {"forward", "decode", "_apply"} & set(vars(module))


def test_disable_without_enable_and_calls_after_disable(pipe, reference):
    with pytest.raises(RuntimeError, match="not enabled"):
        pipe.disable_offload()
    handle = pipe.enable_layerwise_offload("cpu")
    pipe.disable_offload()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    assert torch.equal(generate(pipe), reference)  # an ordinary pipeline again


def test_to_and_save_are_refused_while_offloaded(pipe, tmp_path):
    pipe.enable_model_offload("cpu")
    with pytest.raises(RuntimeError, match="disable_offload"):
        pipe.to("cpu")
    with pytest.raises(RuntimeError, match="disable_offload"):
        pipe.save_pretrained(tmp_path)
    pipe.disable_offload()


def test_failed_enable_leaves_nothing_applied(pipe, reference):
    before = state_of(pipe)
    with pytest.raises(ValueError, match="prefetch"):
        pipe.enable_layerwise_offload("cpu", prefetch=-1)
    with pytest.raises(ValueError, match="resident_blocks"):
        pipe.enable_layerwise_offload("cpu", resident_blocks=99)
    assert pipe.offload_handle is None
    for name in COMPONENTS:
        module = getattr(pipe, name)
        assert not hasattr(module, "_diffusers_offload_handle")
        assert not hasattr(module, "_diffusers_hook")
    assert_same_state(pipe, before)
    assert torch.equal(generate(pipe), reference)


def test_exception_inside_the_dit_leaves_pipeline_usable(pipe, reference):
    pipe.enable_layerwise_offload("cpu", prefetch=1)
    block = pipe.transformer.transformer_blocks[1]

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    block.attn.forward = explode
    with pytest.raises(RuntimeError, match="boom"):
        generate(pipe)
    del block.attn.forward
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()
    assert torch.equal(generate(pipe), reference)


def test_vae_entered_through_decode_only(pipe):
    pipe.enable_model_offload("cpu")
    latents = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        image = pipe.vae.decode(latents).sample
    assert image.shape == (1, 3, 64, 64)
    assert materialised(pipe.vae) and only_placeholders(pipe.transformer)
    pipe.disable_offload()


def test_from_pretrained_round_trip(tmp_path, reference):
    build_tiny_sd3_pipeline().save_pretrained(tmp_path)
    pipe = dof.OffloadPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, dof.OffloadMixin)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()


def test_offload_pipeline_is_not_instantiated():
    with pytest.raises(TypeError, match="from_pretrained"):
        dof.OffloadPipeline()


def test_tied_t5_embeddings_are_packed_once(pipe):
    t5 = pipe.text_encoder_3
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    unique = {id(t): t for t in [*t5.parameters(), *t5.buffers()]}
    unique_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    handle = pipe.enable_model_offload("cpu")
    group = next(g for g in handle.groups if g.name == "text_encoder_3")
    assert len(group.tensors) == len(unique)
    assert group.data_bytes == unique_bytes
    pipe.disable_offload()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_streamed_encoders_are_bitwise_and_bounded(pipe, reference, prefetch):
    handle = pipe.enable_layerwise_offload("cpu", prefetch=prefetch, encoders="stream")
    streamed = {name: record.ring for name, record in handle.components.items() if record.ring is not None}
    assert set(streamed) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    layers = {
        "text_encoder": pipe.text_encoder.text_model.encoder.layers,
        "text_encoder_3": pipe.text_encoder_3.encoder.block,
    }

    def bounded(name):
        def check(leaf_name, leaf):
            assert sum(materialised(layer) for layer in layers[name]) <= prefetch + 1
            assert only_placeholders(pipe.transformer)

        return check

    with on_every_leaf_forward(pipe.text_encoder, bounded("text_encoder")):
        with on_every_leaf_forward(pipe.text_encoder_3, bounded("text_encoder_3")):
            assert torch.equal(generate(pipe), reference)
    assert all(ring.stats.calls > 0 for ring in streamed.values())
    pipe.disable_offload()
    assert torch.equal(generate(pipe), reference)


def test_default_device_without_accelerator_warns_and_uses_cpu(pipe, reference):
    with pytest.warns(UserWarning, match="saves no memory"):
        handle = pipe.enable_model_offload()
    assert handle.device == torch.device("cpu") and handle.pin_memory is False
    assert torch.equal(generate(pipe), reference)
    pipe.disable_offload()


def test_pin_memory_needs_an_accelerator(pipe):
    with pytest.raises(ValueError, match="pin_memory"):
        pipe.enable_layerwise_offload("cpu", pin_memory=True)
    assert pipe.offload_handle is None


def test_unknown_pipeline_layout_says_how_to_declare_an_adapter():
    class Strange:
        """A pipeline-like object whose only model has no block list."""

        def __init__(self):
            self.model = torch.nn.Linear(4, 4)

    pipe = dof.attach(Strange())
    with pytest.raises(ValueError, match="register_adapter"):
        pipe.enable_layerwise_offload("cpu")
    assert pipe.offload_handle is None


def test_unknown_block_list_names_the_lists_that_exist():
    model = build_tiny_sd3_pipeline().transformer
    with pytest.raises(ValueError, match="transformer_blocks"):
        dof.apply_layerwise_offload(model, ["blocks"], device="cpu")
    assert not hasattr(model, "_diffusers_offload_handle")


def test_moving_or_casting_a_component_while_offloaded_is_refused(pipe, reference):
    pipe.enable_layerwise_offload("cpu")
    for call in (
        lambda: pipe.vae.to(torch.float64),
        lambda: pipe.transformer.half(),
        lambda: pipe.text_encoder.cpu(),
    ):
        with pytest.raises(RuntimeError, match="disable_offload"):
            call()
    assert torch.equal(generate(pipe), reference)  # nothing was converted
    pipe.disable_offload()
    pipe.vae.to(torch.float64)  # an ordinary module again
    assert pipe.vae.dtype == torch.float64


def test_loaded_from_disk_in_bfloat16_is_bitwise_equal(tmp_path):
    # The condition docs/index.md states: a cast at load copies every weight, so packing changes nothing.
    build_tiny_sd3_pipeline().save_pretrained(tmp_path)
    pipe = dof.OffloadPipeline.from_pretrained(str(tmp_path), dtype=torch.bfloat16)

    def run():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", **TINY_SD3_CALL, generator=generator, output_type="pt").images

    reference = run()
    pipe.enable_layerwise_offload("cpu")
    assert torch.equal(run(), reference)
    pipe.disable_offload()
    pipe.enable_model_offload("cpu")
    assert torch.equal(run(), reference)
