"""The CUDA path: copy stream, events, page-locked slabs, the peak-memory bound, no host syncs.

Skipped where no CUDA device exists (CI has none); `benchmarks/gpu_check.sh` runs them on a GPU.
"""

import time

import pytest
import torch

import diffusers_offload as dof
from diffusers_offload.bench.models import MODELS, build_pipeline
from diffusers_offload.model_registry import get_adapter
from diffusers_offload.planning.sizing import measure_components
from diffusers_offload.report import build_report
from diffusers_offload.tiny.qwen_image import TINY_QWEN_IMAGE_CALL
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL
from diffusers_offload.tiny.z_image import TINY_Z_IMAGE_CALL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda:0"
PIPELINES = {  # bench's tiny pipelines: their DiTs have enough blocks for a ring to really stream
    "sd3": (MODELS["tiny-sd3"].tiny_builder, TINY_SD3_CALL),
    "qwen_image": (MODELS["tiny-qwen-image"].tiny_builder, TINY_QWEN_IMAGE_CALL),
    "z_image": (MODELS["tiny-z-image"].tiny_builder, TINY_Z_IMAGE_CALL),
}
STRATEGIES = {
    "model": lambda pipe: pipe.enable_model_offload(CUDA),
    "layerwise-p0": lambda pipe: pipe.enable_layerwise_offload(CUDA, prefetch=0),
    "layerwise-p1": lambda pipe: pipe.enable_layerwise_offload(CUDA, prefetch=1),
    "layerwise-p2": lambda pipe: pipe.enable_layerwise_offload(CUDA, prefetch=2),
    "layerwise-resident-2": lambda pipe: pipe.enable_layerwise_offload(CUDA, resident_blocks=2),
    "stream-encoders": lambda pipe: pipe.enable_layerwise_offload(CUDA, encoders="stream"),
}


def generate(pipe, call):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat on a laptop", **call, generator=generator, output_type="pt").images.cpu()


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, (build, call) in PIPELINES.items():
        out[name] = generate(build().to(CUDA), call)
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_bitwise_equal_to_no_offload_on_the_gpu(references, pipeline, strategy):
    build, call = PIPELINES[pipeline]
    pipe = dof.attach(build())
    STRATEGIES[strategy](pipe)
    for _ in range(2):  # the second call starts from the ring's wrapped-around state
        assert torch.equal(generate(pipe, call), references[pipeline])
    pipe.disable_offload()
    assert torch.equal(generate(pipe.to(CUDA), call), references[pipeline])


def _dit_inputs(pipe, spec):
    return spec.make_inputs(
        pipe.transformer, spec.height, spec.width, spec, torch.device(CUDA), torch.float32
    )


def test_peak_allocated_is_within_5_percent_of_the_plan():
    spec = MODELS["tiny-sd3"]
    pipe, _ = build_pipeline(spec, torch.device(CUDA), torch.float32, dit_only=True)
    (inputs,) = _dit_inputs(pipe, spec)
    # Activations of one DiT call, measured with everything resident, are what the reserve is for.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # weights and inputs
    with torch.inference_mode():
        pipe.transformer(**inputs)
    activations = torch.cuda.max_memory_allocated() - base
    pipe = dof.attach(pipe.to("cpu"))
    adapter = get_adapter(pipe)
    (sizes,) = measure_components(adapter.components(pipe), adapter)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the inputs
    pipe.enable_offload(sizes.device_bytes // 2 + activations, CUDA, reserve=activations)
    plan = pipe.offload_handle.plan
    assert plan.component("transformer").strategy == "streamed"
    with torch.inference_mode():
        for _ in range(3):
            pipe.transformer(**inputs)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before  # weights placed at enable, ring, activations
    predicted = plan.peak_device_bytes
    assert measured <= 1.05 * predicted, (measured, predicted)
    assert measured >= 0.95 * (predicted - plan.reserve_bytes), (measured, predicted)  # the plan is not slack
    pipe.disable_offload()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_no_host_synchronisation_in_steady_state(prefetch):
    spec = MODELS["tiny-sd3"]
    pipe, _ = build_pipeline(spec, torch.device(CUDA), torch.float32, dit_only=True)
    calls = _dit_inputs(pipe, spec)

    def steady_steps():
        with torch.inference_mode():
            for kwargs in calls:  # first step: slots allocated, first loads on demand
                pipe.transformer(**kwargs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(2):
                    for kwargs in calls:
                        pipe.transformer(**kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    steady_steps()  # the DiT alone syncs nothing (else the check below would prove nothing of ours)
    pipe = dof.attach(pipe.to("cpu"))
    pipe.enable_layerwise_offload(CUDA, prefetch=prefetch)
    steady_steps()
    (dit,) = pipe.offload_report().components
    assert dit.blocks_streamed > prefetch + 1 and dit.on_demand_loads == 1
    pipe.disable_offload()


def _big_dit(blocks: int = 4, width: int = 4096) -> torch.nn.Module:
    """Blocks of 64 MiB (fp32), so that a copy takes long enough to be seen from the host."""

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(
                torch.nn.Linear(width, width) for _ in range(blocks)
            )

        def forward(self, x):
            for block in self.transformer_blocks:
                x = block(x)
            return x

    return Stack()


def test_host_slabs_are_page_locked_and_unregistered_on_removal():
    model = _big_dit()
    handle = dof.apply_layerwise_offload(model, device=CUDA, prefetch=1)
    slabs = [group.slab.data for group in handle.groups]  # held past removal, to look at them after
    assert all(slab.is_pinned() for slab in slabs)
    # Page-locked memory copies asynchronously: the host gets control back before the copy is done.
    target = torch.empty_like(slabs[0], device=CUDA)
    done = torch.cuda.Event(enable_timing=True)
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    issued = time.perf_counter()
    start.record()
    target.copy_(slabs[0], non_blocking=True)
    done.record()
    host_ms = (time.perf_counter() - issued) * 1000
    done.synchronize()
    assert host_ms < 0.5 * start.elapsed_time(done), (host_ms, start.elapsed_time(done))
    handle.remove()
    assert not any(slab.is_pinned() for slab in slabs)


def test_timeline_on_the_gpu_shows_copies_hidden_behind_compute():
    model = _big_dit(blocks=6)
    x = torch.randn(4096, 4096, device=CUDA)  # enough compute per block to hide a 64 MiB copy
    with torch.inference_mode():
        reference = model.to(CUDA)(x)
    model.to("cpu")
    handle = dof.apply_layerwise_offload(model, device=CUDA, prefetch=1, timing=True)
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(x), reference)
    (timeline,) = build_report(handle).timelines
    assert timeline.clock == "device events"
    assert timeline.per_pass.copy_ms > 0 and timeline.per_pass.compute_ms > 0
    assert timeline.per_pass.hidden_fraction > 0.5
    handle.remove()


def test_cache_hook_with_layerwise_offload_on_the_gpu():
    from diffusers import FirstBlockCacheConfig

    build, call = PIPELINES["qwen_image"]  # SD3's DiT has no cache mixin
    cached = build().to(CUDA)
    cached.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    reference = generate(cached, {**call, "num_inference_steps": 4})
    pipe = dof.attach(build())
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    pipe.enable_layerwise_offload(CUDA)
    assert torch.equal(generate(pipe, {**call, "num_inference_steps": 4}), reference)
    pipe.disable_offload()


def test_regional_compile_with_layerwise_offload_on_the_gpu():
    build, call = PIPELINES["qwen_image"]  # SD3's DiT declares no repeated blocks to compile
    compiled = build().to(CUDA)
    compiled.transformer.compile_repeated_blocks(fullgraph=False)
    reference = generate(compiled, call)
    pipe = dof.attach(build())
    pipe.enable_layerwise_offload(CUDA)
    pipe.transformer.compile_repeated_blocks(fullgraph=False)
    assert torch.allclose(generate(pipe, call), reference, atol=1e-5)
    pipe.disable_offload()
