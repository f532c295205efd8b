"""Layer-wise offload stacks with diffusers' cache hooks, enabled and removed in any order."""

import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

import diffusers_offload as dof
from diffusers_offload.tiny.qwen_image import (
    TINY_QWEN_IMAGE_CALL,
    build_tiny_qwen_image_pipeline,
    build_tiny_qwen_image_transformer,
)

STEPS = 4
NUM_BLOCKS = 6
CALL = {**TINY_QWEN_IMAGE_CALL, "num_inference_steps": STEPS}

# Settings that make each cache skip blocks on a random tiny model (thresholds far above the default).
CACHES = {
    "first_block": lambda: FirstBlockCacheConfig(threshold=0.9),
    "mag": lambda: MagCacheConfig(
        threshold=1.0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, retention_ratio=0.2
    ),
    "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1),
    "taylorseer_lite": lambda: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=True
    ),
}


def build_pipe():
    """The tiny Qwen-Image pipeline with a 6-block DiT: enough blocks for skipping to show in loads."""
    pipe = build_tiny_qwen_image_pipeline()
    transformer = build_tiny_qwen_image_transformer(seed=4, num_layers=NUM_BLOCKS)
    pipe = QwenImagePipeline(**{**pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return dof.attach(pipe)


def count_computed_blocks(pipe):
    """A list that grows by one each time a block really computes (its modulation layer runs)."""
    computed = []
    for block in pipe.transformer.transformer_blocks:
        block.img_mod.register_forward_pre_hook(lambda _module, _args: computed.append(1))
    return computed


def generate(pipe):
    # One thread, as in every test (module-scoped fixtures run before the per-test setting): the
    # comparisons are bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipe("a cat", **CALL, generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_image():
    return generate(build_pipe())


@pytest.fixture(scope="module", params=sorted(CACHES))
def cached(request):
    """(cache name, image and number of computed blocks with that cache, without offload)."""
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    pipe.transformer.enable_cache(CACHES[request.param]())
    image = generate(pipe)
    if request.param != "taylorseer":  # the others skip whole blocks (TaylorSeer: attention layers)
        assert len(computed) < STEPS * 2 * NUM_BLOCKS
    return request.param, image, len(computed)


@pytest.mark.parametrize("offload_first", [False, True], ids=["cache_then_offload", "offload_then_cache"])
@pytest.mark.parametrize(
    "remove_offload_first", [False, True], ids=["disable_cache_first", "disable_offload_first"]
)
def test_cache_and_offload_in_any_order(cached, base_image, offload_first, remove_offload_first):
    name, cached_image, computed_without_offload = cached
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    if offload_first:
        handle = pipe.enable_layerwise_offload("cpu")
        pipe.transformer.enable_cache(CACHES[name]())
    else:
        pipe.transformer.enable_cache(CACHES[name]())
        handle = pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe), cached_image)
    # Blocks the cache skips are not streamed, in either order: no more loads than blocks computed, but
    # for the one block the ring copies ahead (prefetch=1) of the last block computed.
    assert len(computed) == computed_without_offload
    assert handle.components["transformer"].ring.loads <= len(computed) + 1

    if remove_offload_first:
        pipe.disable_offload()
        assert torch.equal(generate(pipe), cached_image)  # the cache is still on
        pipe.transformer.disable_cache()
    else:
        pipe.transformer.disable_cache()
        assert torch.equal(generate(pipe), base_image)  # offload still on, cache off
        pipe.disable_offload()
    assert torch.equal(generate(pipe), base_image)
    for module in (pipe.transformer, *pipe.transformer.transformer_blocks):
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks
    # And again, the other way round.
    pipe.transformer.enable_cache(CACHES[name]())
    pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe), cached_image)
    pipe.transformer.disable_cache()
    assert torch.equal(generate(pipe), base_image)
