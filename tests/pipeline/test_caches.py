"""Layer-wise offload stacks with diffusers' cache hooks and cache-dit, enabled and removed in any order."""

import cache_dit
import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import diffusers_offload as dof
from diffusers_offload.tiny.qwen_image import (
    TINY_QWEN_IMAGE_CALL,
    build_tiny_qwen_image_pipeline,
    build_tiny_qwen_image_transformer,
)

STEPS = 4
NUM_BLOCKS = 6
CALL = {**TINY_QWEN_IMAGE_CALL, "num_inference_steps": STEPS}

# Settings that make each cache skip work on a random tiny model (thresholds far above the default). Each
# factory takes the pipeline (PAB reads its current timestep).
CACHES = {
    "first_block": lambda pipe: FirstBlockCacheConfig(threshold=0.9),
    "mag": lambda pipe: MagCacheConfig(
        threshold=1.0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, retention_ratio=0.2
    ),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, max_order=1
    ),
    "taylorseer_lite": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=True
    ),
    "pyramid_attention_broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "faster": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 800),  # the first step (t=1000) fills the cache
        current_timestep_callback=lambda: pipe.current_timestep,
        attention_weight_callback=lambda _module: 0.5,
        is_guidance_distilled=True,
    ),
}
# Caches that skip whole blocks (the others skip attention layers inside computed blocks).
BLOCK_SKIPPING = ("first_block", "mag", "taylorseer_lite")
# PAB broadcasts attention between calls of one shape: true CFG's two prompts have two token lengths
# (it fails without offload too), so it runs without CFG.
# FasterCache (guidance-distilled mode) likewise.
NO_CFG = dict(true_cfg_scale=1.0, negative_prompt=None)
CALL_OVERRIDES = {"pyramid_attention_broadcast": NO_CFG, "faster": NO_CFG}


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


def generate(pipe, cache=None):
    # One thread, as in every test (module-scoped fixtures run before the per-test setting): the
    # comparisons are bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call = {**CALL, **CALL_OVERRIDES.get(cache, {})}
        return pipe("a cat", **call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_images():
    """Images without cache and offload, per call settings."""
    pipe = build_pipe()
    return {name: generate(pipe, name) for name in CACHES}


@pytest.fixture(scope="module", params=sorted(CACHES))
def cached(request):
    """(cache name, image and number of computed blocks with that cache, without offload)."""
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    pipe.transformer.enable_cache(CACHES[request.param](pipe))
    image = generate(pipe, request.param)
    if request.param in BLOCK_SKIPPING:
        assert len(computed) < STEPS * 2 * NUM_BLOCKS
    return request.param, image, len(computed)


@pytest.mark.parametrize("offload_first", [False, True], ids=["cache_then_offload", "offload_then_cache"])
@pytest.mark.parametrize(
    "remove_offload_first", [False, True], ids=["disable_cache_first", "disable_offload_first"]
)
def test_cache_and_offload_in_any_order(cached, base_images, offload_first, remove_offload_first):
    name, cached_image, computed_without_offload = cached
    base_image = base_images[name]
    assert not torch.equal(cached_image, base_image)  # the cache is active on this model and call
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    if offload_first:
        handle = pipe.enable_layerwise_offload("cpu")
        pipe.transformer.enable_cache(CACHES[name](pipe))
    else:
        pipe.transformer.enable_cache(CACHES[name](pipe))
        handle = pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe, name), cached_image)
    assert len(computed) == computed_without_offload
    assert_streams_only_computed_blocks(handle, computed)

    if remove_offload_first:
        pipe.disable_offload()
        assert torch.equal(generate(pipe, name), cached_image)  # the cache is still on
        pipe.transformer.disable_cache()
    else:
        pipe.transformer.disable_cache()
        assert torch.equal(generate(pipe, name), base_image)  # offload still on, cache off
        pipe.disable_offload()
    assert torch.equal(generate(pipe, name), base_image)
    for module in (pipe.transformer, *pipe.transformer.transformer_blocks):
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks
    # And again, the other way round.
    pipe.transformer.enable_cache(CACHES[name](pipe))
    pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe, name), cached_image)
    pipe.transformer.disable_cache()
    assert torch.equal(generate(pipe, name), base_image)


def assert_streams_only_computed_blocks(handle, computed):
    # Blocks the cache skips are not streamed, in either order: no more loads than blocks computed, but
    # for the one block the ring copies ahead (prefetch=1) of the last block computed.
    ring = handle.components["transformer"].ring
    assert ring.loads <= len(computed) + 1
    # The ring learnt that the cached blocks do not run: the computed ones were prefetched, not loaded on
    # demand (once the first calls showed the order).
    assert ring.on_demand_loads <= 2


def enable_cache_dit(pipe):
    # DBCache computing the first 2 blocks of each call and caching the rest once warm.
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=2, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=0.9
    )
    cache_dit.enable_cache(pipe, cache_config=config)


@pytest.fixture(scope="module")
def cache_dit_reference():
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    enable_cache_dit(pipe)
    image = generate(pipe)
    assert len(computed) < STEPS * 2 * NUM_BLOCKS
    return image, len(computed)


@pytest.mark.parametrize("offload_first", [False, True], ids=["cache_then_offload", "offload_then_cache"])
@pytest.mark.parametrize(
    "remove_offload_first", [False, True], ids=["disable_cache_first", "disable_offload_first"]
)
def test_cache_dit_and_offload_in_any_order(
    cache_dit_reference, base_images, offload_first, remove_offload_first
):
    # cache-dit replaces the transformer's forward itself: our entry hook is a torch forward pre-hook,
    # which it neither bypasses nor captures.
    cached_image, computed_without_offload = cache_dit_reference
    base_image = base_images["first_block"]  # the default call
    pipe = build_pipe()
    computed = count_computed_blocks(pipe)
    if offload_first:
        handle = pipe.enable_layerwise_offload("cpu")
        enable_cache_dit(pipe)
    else:
        enable_cache_dit(pipe)
        handle = pipe.enable_layerwise_offload("cpu")
    assert torch.equal(generate(pipe), cached_image)
    assert len(computed) == computed_without_offload
    assert_streams_only_computed_blocks(handle, computed)
    if remove_offload_first:
        pipe.disable_offload()
        assert torch.equal(generate(pipe), cached_image)
        cache_dit.disable_cache(pipe)
    else:
        cache_dit.disable_cache(pipe)
        assert torch.equal(generate(pipe), base_image)
        pipe.disable_offload()
    assert torch.equal(generate(pipe), base_image)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
