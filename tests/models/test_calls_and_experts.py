"""Denoiser calls per step as declared vs as the pipelines make them, planned vs measured traffic, Wan 2.2's
two experts taking turns, and FLUX.2's VAE statistics that the pipeline reads directly."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from offload_probes import on_every_leaf_forward, only_placeholders

import diffusers_offload as dof
from diffusers_offload.engine.packing import is_placeholder
from diffusers_offload.model_registry import get_adapter, pipeline_modules
from diffusers_offload.planning import measure_components, plan_offload
from diffusers_offload.tiny.flux import TINY_FLUX_CALL, build_tiny_flux_pipeline
from diffusers_offload.tiny.flux2 import TINY_FLUX2_CALL, build_tiny_flux2_pipeline
from diffusers_offload.tiny.hunyuan_video15 import (
    TINY_HUNYUAN_VIDEO15_CALL,
    TINY_HUNYUAN_VIDEO15_PROMPT,
    build_tiny_hunyuan_video15_i2v_pipeline,
    build_tiny_hunyuan_video15_pipeline,
)
from diffusers_offload.tiny.ovis_image import TINY_OVIS_IMAGE_CALL, build_tiny_ovis_image_pipeline
from diffusers_offload.tiny.qwen_image import TINY_QWEN_IMAGE_CALL, build_tiny_qwen_image_pipeline
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline
from diffusers_offload.tiny.wan import TINY_WAN_CALL, build_tiny_wan_pipeline
from diffusers_offload.tiny.z_image import TINY_Z_IMAGE_CALL, build_tiny_z_image_pipeline

wan22 = functools.partial(build_tiny_wan_pipeline, two_experts=True)
ti2v = functools.partial(build_tiny_wan_pipeline, ti2v_5b=True)
TI2V_CALL = {**TINY_WAN_CALL, "height": 64, "width": 64}  # 16x VAE and 2x2 patches: 64 px is 2 x 2 tokens
NO_NEGATIVE = {k: v for k, v in TINY_QWEN_IMAGE_CALL.items() if k != "negative_prompt"}

# (id, builder, call, prompt, denoiser calls per step the pipeline really makes)
CASES = [
    ("sd3-batched-cfg", build_tiny_sd3_pipeline, TINY_SD3_CALL, 1),
    ("z-image-batched-cfg", build_tiny_z_image_pipeline, TINY_Z_IMAGE_CALL, 1),
    ("qwen-image-true-cfg", build_tiny_qwen_image_pipeline, TINY_QWEN_IMAGE_CALL, 2),
    ("qwen-image-no-negative-prompt", build_tiny_qwen_image_pipeline, NO_NEGATIVE, 1),
    ("ovis-image-cfg", build_tiny_ovis_image_pipeline, TINY_OVIS_IMAGE_CALL, 2),
    ("flux-embedded-guidance", build_tiny_flux_pipeline, TINY_FLUX_CALL, 1),
    (
        "flux-true-cfg",
        build_tiny_flux_pipeline,
        {**TINY_FLUX_CALL, "true_cfg_scale": 2.0, "negative_prompt": "blurry"},
        2,
    ),
    ("flux2", build_tiny_flux2_pipeline, TINY_FLUX2_CALL, 1),
    ("wan-cfg", build_tiny_wan_pipeline, TINY_WAN_CALL, 2),
    ("wan-no-cfg", build_tiny_wan_pipeline, {**TINY_WAN_CALL, "guidance_scale": 1.0}, 1),
    ("wan-2.2-cfg", wan22, TINY_WAN_CALL, 2),
    ("wan-2.2-ti2v-5b-cfg", ti2v, TI2V_CALL, 2),
    ("hunyuanvideo15-guider", build_tiny_hunyuan_video15_pipeline, TINY_HUNYUAN_VIDEO15_CALL, 2),
]


def _generate(pipe, call: dict) -> torch.Tensor:
    prompt = TINY_HUNYUAN_VIDEO15_PROMPT if type(pipe).__name__.startswith("HunyuanVideo") else "a cat"
    out = pipe(prompt=prompt, **call, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.frames if hasattr(out, "frames") else out.images


def _denoiser_forwards(pipe, call: dict) -> int:
    adapter = get_adapter(pipe)
    count = [0]
    handles = [
        getattr(pipe, name).register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for name in adapter.denoisers
        if getattr(pipe, name, None) is not None
    ]
    try:
        _generate(pipe, call)
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


@pytest.mark.parametrize(("builder", "call", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_declared_calls_per_step_are_what_the_pipeline_does(builder, call, expected):
    pipe = builder()
    steps = call["num_inference_steps"]
    assert _denoiser_forwards(pipe, call) == expected * steps
    assert get_adapter(pipe).calls.per_step(call, pipe) == expected


def test_a_disabled_guider_makes_one_call():
    pipe = build_tiny_hunyuan_video15_pipeline()
    pipe.guider.disable()
    assert get_adapter(pipe).calls.per_step({}, pipe) == 1
    assert (
        _denoiser_forwards(pipe, TINY_HUNYUAN_VIDEO15_CALL)
        == TINY_HUNYUAN_VIDEO15_CALL["num_inference_steps"]
    )


def _denoiser_bytes_moved(pipe) -> int:
    denoisers = get_adapter(pipe).denoisers
    return sum(c.bytes_moved for c in pipe.offload_report().components if c.name in denoisers)


PLANNED = [
    "flux-embedded-guidance",
    "flux-true-cfg",
    "wan-cfg",
    "wan-no-cfg",
    "wan-2.2-cfg",
    "hunyuanvideo15-guider",
]


@pytest.mark.parametrize("case", PLANNED)
def test_planned_bytes_per_step_and_image_match_the_report(case):
    _, builder, call, calls = next(c for c in CASES if c[0] == case)
    pipe = dof.attach(builder())
    adapter = get_adapter(pipe)
    steps = call["num_inference_steps"]
    # The denoisers' plan at a budget that holds only a ring of two of their largest blocks.
    sizes = [s for s in measure_components(adapter.components(pipe), adapter) if s.role == "denoiser"]
    budget = max(s.other_bytes + 2 * max(s.block_bytes) for s in sizes)
    plan = plan_offload(
        sizes, budget, reserve=0, calls_per_step=adapter.calls.per_step(call, pipe), steps=steps
    )
    assert all(not p.resident_blocks and p.prefetch == 1 for p in plan.components)
    assert plan.calls_per_step == calls and plan.bytes_moved_per_step > 0
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1)  # the same placement: every block streamed
    _generate(pipe, call)  # Wan 2.2: from now on its experts hand over at the switch (learned in this call)

    moved = []
    for n in (steps, steps + 1):
        before = _denoiser_bytes_moved(pipe)
        _generate(pipe, {**call, "num_inference_steps": n})
        moved.append(_denoiser_bytes_moved(pipe) - before)
    # One more step moves exactly what the plan says a step moves (CFG's second call included).
    assert moved[1] - moved[0] == plan.bytes_moved_per_step
    # A whole call: its steps and the one-time loads, plus the last prefetch of each denoiser's ring (its
    # first block, copied for a next step that never comes), which the plan leaves out. Wan 2.2's first
    # expert prefetches the second expert's first block instead, which that expert then uses.
    handing_over = {"transformer"} if len(sizes) > 1 else set()
    tails = sum(handle.components[s.name].ring.groups[0].nbytes for s in sizes if s.name not in handing_over)
    assert moved[0] == plan.bytes_moved_per_image + tails
    pipe.disable_offload()


@pytest.mark.parametrize("kind", ["model", "layerwise"])
def test_wan22_experts_take_turns_and_the_idle_one_holds_only_placeholders(kind):
    pipe = dof.attach(wan22())
    reference = _generate(build_tiny_wan_pipeline(two_experts=True), TINY_WAN_CALL)
    if kind == "model":
        handle = pipe.enable_model_offload("cpu")
    else:
        handle = pipe.enable_layerwise_offload("cpu", prefetch=1)
    runs = {"transformer": 0, "transformer_2": 0}

    def checker(running: str, idle: str):
        def check(_name, _leaf):
            runs[running] += 1
            assert only_placeholders(getattr(pipe, idle)), f"{idle} holds weights while {running} runs"

        return check

    with (
        on_every_leaf_forward(pipe.transformer, checker("transformer", "transformer_2")),
        on_every_leaf_forward(pipe.transformer_2, checker("transformer_2", "transformer")),
    ):
        assert torch.equal(_generate(pipe, TINY_WAN_CALL), reference)
    assert runs["transformer"] > 0 and runs["transformer_2"] > 0
    records = handle.components
    for name in ("transformer", "transformer_2"):
        assert records[name].placement.strategy == ("swapped" if kind == "model" else "streamed")
        assert records[name].member.loads == 1  # each expert entered once per call: one switch, no ping-pong
    pipe.disable_offload()


def test_flux2_needs_its_vae_batchnorm_statistics_resident():
    reference = _generate(build_tiny_flux2_pipeline(), TINY_FLUX2_CALL)
    pipe = dof.attach(build_tiny_flux2_pipeline())
    adapter = get_adapter(pipe)
    pipe.enable_model_offload("cpu")
    assert not is_placeholder(pipe.vae.bn.running_mean) and not is_placeholder(pipe.vae.bn.running_var)
    assert torch.equal(_generate(pipe, TINY_FLUX2_CALL), reference)
    pipe.disable_offload()
    # Without the declaration the statistics are offloaded with the VAE, and the pipeline, which reads them
    # before any VAE method is entered, fails.
    pipe.enable_model_offload("cpu", adapter=dataclasses.replace(adapter, resident_tensors={}))
    assert is_placeholder(pipe.vae.bn.running_mean)
    with pytest.raises(RuntimeError):
        _generate(pipe, TINY_FLUX2_CALL)
    pipe.disable_offload()


def test_flux2_vision_tower_stays_on_the_host_for_text_prompts():
    pipe = dof.attach(build_tiny_flux2_pipeline())
    pipe.enable_layerwise_offload("cpu", prefetch=1)
    _generate(pipe, TINY_FLUX2_CALL)
    text_encoder = pipe.text_encoder
    assert only_placeholders(text_encoder.model.vision_tower)
    assert only_placeholders(text_encoder.model.multi_modal_projector)
    modules = pipeline_modules(pipe)
    assert set(modules) == {"transformer", "text_encoder", "vae"}
    pipe.disable_offload()


@pytest.mark.parametrize("kind", ["model", "layerwise"])
def test_wan22_ti2v_5b_runs_offloaded_bitwise(kind):
    reference = _generate(ti2v(), TI2V_CALL)
    pipe = dof.attach(ti2v())
    assert pipe.config.expand_timesteps and get_adapter(pipe).name == "wan"
    if kind == "model":
        pipe.enable_model_offload("cpu")
    else:
        pipe.enable_layerwise_offload("cpu", prefetch=1, encoders="stream")
    for _ in range(2):
        assert torch.equal(_generate(pipe, TI2V_CALL), reference)
    pipe.disable_offload()


@pytest.mark.parametrize("kind", ["model", "layerwise"])
def test_hunyuanvideo15_image_to_video_runs_offloaded_bitwise(kind):
    import numpy as np
    import PIL.Image

    y, x = np.mgrid[0:32, 0:32]
    image = PIL.Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8))

    def generate(pipe) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        call = dict(num_inference_steps=2, num_frames=5, generator=generator, output_type="pt")
        return pipe(image=image, prompt=TINY_HUNYUAN_VIDEO15_PROMPT, **call).frames

    reference = generate(build_tiny_hunyuan_video15_i2v_pipeline())
    pipe = dof.attach(build_tiny_hunyuan_video15_i2v_pipeline())
    assert get_adapter(pipe).name == "hunyuanvideo15"
    if kind == "model":
        handle = pipe.enable_model_offload("cpu")
    else:
        handle = pipe.enable_layerwise_offload("cpu", prefetch=1, encoders="stream")
    assert torch.equal(generate(pipe), reference)
    image_encoder = handle.components["image_encoder"]
    if kind == "layerwise":  # the SigLIP tower streams through its declared encoder.layers
        assert image_encoder.ring.stats.calls == len(pipe.image_encoder.encoder.layers)
    else:
        assert image_encoder.member.loads == 1
    pipe.disable_offload()


REPORTED = [
    ("flux-one-call", build_tiny_flux_pipeline, TINY_FLUX_CALL, 1),
    ("wan-cfg-two-calls", build_tiny_wan_pipeline, TINY_WAN_CALL, 2),
    ("wan-no-cfg", build_tiny_wan_pipeline, {**TINY_WAN_CALL, "guidance_scale": 1.0}, 1),
    ("wan-2.2-two-experts", wan22, {**TINY_WAN_CALL, "num_inference_steps": 6}, 2),
]


@pytest.mark.parametrize(
    ("builder", "call", "calls"), [c[1:] for c in REPORTED], ids=[c[0] for c in REPORTED]
)
def test_the_report_measures_bytes_per_step_and_image_the_plan_predicts(builder, call, calls):
    pipe = dof.attach(builder())
    adapter = get_adapter(pipe)
    sizes = [s for s in measure_components(adapter.components(pipe), adapter) if s.role == "denoiser"]
    budget = max(s.other_bytes + 2 * max(s.block_bytes) for s in sizes)
    # Planned for the pipeline's defaults (CFG on for Wan); the report scales it to the call's calls.
    plan = plan_offload(sizes, budget, reserve=0, calls_per_step=adapter.calls.per_step({}, pipe))
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1)  # the plan's placement: every block streamed
    handle.plan = plan
    before = sum(c.bytes_moved for c in pipe.offload_report().components)
    _generate(pipe, call)
    report = pipe.offload_report()
    traffic = report.last_call
    steps = call["num_inference_steps"]
    assert (traffic.steps, traffic.calls_per_step, traffic.images) == (steps, calls, 1)
    per_call = plan.bytes_moved_per_step // plan.calls_per_step
    assert traffic.bytes_per_step == calls * per_call == traffic.planned_per_step > 0
    assert traffic.bytes_moved == sum(c.bytes_moved for c in report.components) - before
    # One image: its steps, the one-time loads (encoders and VAE too, which this plan leaves out) and the
    # ring's last prefetch, loaded for a step that never comes.
    assert traffic.bytes_per_image == traffic.bytes_moved > traffic.steps * traffic.bytes_per_step
    assert traffic.planned_per_image == steps * traffic.planned_per_step + plan.bytes_loaded_per_image
    assert traffic.summary() in str(report) and "moved per denoising step (plan" in traffic.summary()
    pipe.disable_offload()


def test_the_report_counts_steps_with_the_adapter_offloading_was_enabled_with():
    pipe = dof.attach(build_tiny_wan_pipeline())
    one_call = dataclasses.replace(get_adapter(pipe), calls=dof.model_registry.DenoiserCalls())
    pipe.enable_layerwise_offload("cpu", prefetch=1, adapter=one_call)
    _generate(pipe, TINY_WAN_CALL)  # CFG: two calls a step, which this adapter declares as one
    traffic = pipe.offload_report().last_call
    assert (traffic.calls_per_step, traffic.steps) == (1, 2 * TINY_WAN_CALL["num_inference_steps"])
    pipe.disable_offload()
