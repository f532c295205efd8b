"""Every supported model, every strategy: bitwise equal to no offload, placement checked while it runs."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from nextstep_standin import TINY_NEXTSTEP_CALL, build_tiny_nextstep_pipeline
from offload_probes import on_every_leaf_forward

import diffusers_offload as dof
from diffusers_offload.engine.packing import is_placeholder
from diffusers_offload.model_registry import get_adapter, pipeline_modules
from diffusers_offload.tiny.flux import TINY_FLUX_CALL, build_tiny_flux_pipeline
from diffusers_offload.tiny.flux2 import TINY_FLUX2_CALL, build_tiny_flux2_pipeline
from diffusers_offload.tiny.hunyuan_video15 import (
    TINY_HUNYUAN_VIDEO15_CALL,
    TINY_HUNYUAN_VIDEO15_PROMPT,
    build_tiny_hunyuan_video15_pipeline,
    shorten_text_lengths,
)
from diffusers_offload.tiny.longcat_image import TINY_LONGCAT_IMAGE_CALL, build_tiny_longcat_image_pipeline
from diffusers_offload.tiny.ovis_image import TINY_OVIS_IMAGE_CALL, build_tiny_ovis_image_pipeline
from diffusers_offload.tiny.qwen_image import TINY_QWEN_IMAGE_CALL, build_tiny_qwen_image_pipeline
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline
from diffusers_offload.tiny.wan import TINY_WAN_CALL, build_tiny_wan_pipeline
from diffusers_offload.tiny.z_image import TINY_Z_IMAGE_CALL, build_tiny_z_image_pipeline


@dataclass
class Model:
    build: Callable[[], Any]
    call: dict
    diffusers: bool = True
    prompt: str = "a cat on a laptop"
    video: bool = False
    reloaded: Callable[[Any], Any] = lambda pipe: pipe  # what a reloaded pipeline needs set again

    def generate(self, pipe):
        if not self.diffusers:
            return pipe.generate_image(self.prompt, **self.call, seed=0)
        generator = torch.Generator().manual_seed(0)
        # By keyword: Flux2Pipeline's first positional argument is `image`.
        out = pipe(prompt=self.prompt, **self.call, generator=generator, output_type="pt")
        return out.frames if self.video else out.images


MODELS = {
    "sd3": Model(build_tiny_sd3_pipeline, TINY_SD3_CALL),
    "qwen-image": Model(build_tiny_qwen_image_pipeline, TINY_QWEN_IMAGE_CALL),
    "z-image": Model(build_tiny_z_image_pipeline, TINY_Z_IMAGE_CALL),
    "longcat-image": Model(build_tiny_longcat_image_pipeline, TINY_LONGCAT_IMAGE_CALL),
    "ovis-image": Model(build_tiny_ovis_image_pipeline, TINY_OVIS_IMAGE_CALL),
    "nextstep": Model(build_tiny_nextstep_pipeline, TINY_NEXTSTEP_CALL, diffusers=False),
    "flux": Model(build_tiny_flux_pipeline, TINY_FLUX_CALL),
    "flux2": Model(build_tiny_flux2_pipeline, TINY_FLUX2_CALL),
    "wan": Model(build_tiny_wan_pipeline, TINY_WAN_CALL, video=True),
    # Wan 2.2 A14B: the boundary falls inside the 4 steps, so both experts run in every call.
    "wan-2.2": Model(functools.partial(build_tiny_wan_pipeline, two_experts=True), TINY_WAN_CALL, video=True),
    "hunyuanvideo15": Model(
        build_tiny_hunyuan_video15_pipeline,
        TINY_HUNYUAN_VIDEO15_CALL,
        prompt=TINY_HUNYUAN_VIDEO15_PROMPT,  # quoted text: the glyph encoder runs too
        video=True,
        reloaded=shorten_text_lengths,
    ),
}
STRATEGIES = {
    "model": dict(kind="model"),
    "layerwise-prefetch-1": dict(kind="layerwise", prefetch=1),
    "layerwise-prefetch-2": dict(kind="layerwise", prefetch=2),
    "layerwise-encoders-streamed": dict(kind="layerwise", prefetch=1, encoders="stream"),
}
_REFERENCES: dict[str, torch.Tensor] = {}


def reference(name: str) -> torch.Tensor:
    if name not in _REFERENCES:
        _REFERENCES[name] = MODELS[name].generate(MODELS[name].build())
    return _REFERENCES[name]


def enable(pipe, strategy: dict):
    options = {k: v for k, v in strategy.items() if k != "kind"}
    if strategy["kind"] == "model":
        return pipe.enable_model_offload("cpu", **options)
    return pipe.enable_layerwise_offload("cpu", **options)


def state(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in pipeline_modules(pipe).items()
    }


def placement_checker(pipe, handle, name: str, prefetch: int, counts: dict[str, int]):
    """At a leaf forward inside component `name`: it is the only component holding offloaded weights,
    and each of its streamed block lists holds at most prefetch + 1 materialised blocks."""
    grouped = {
        component: {id(t) for group in record.groups for t in group.tensors}
        for component, record in handle.components.items()
    }
    modules = pipeline_modules(pipe)

    def holds_weights(component: str) -> bool:
        return any(
            id(t) in grouped[component] and not is_placeholder(t)
            for t in [*modules[component].parameters(), *modules[component].buffers()]
        )

    def check(leaf_name, leaf):
        counts[name] = counts.get(name, 0) + 1
        others = [c for c in modules if c != name and holds_weights(c)]
        assert not others, f"{others} hold weights while {name} runs"
        record = handle.components[name]
        if record.ring is not None:
            blocks_by_group = {id(group): group for group in record.ring.groups}
            loaded = [g for g in blocks_by_group.values() if not any(is_placeholder(t) for t in g.tensors)]
            assert len(loaded) <= prefetch + 1

    return check


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model", list(MODELS))
def test_bitwise_with_placement_checked(model, strategy):
    spec, options = MODELS[model], STRATEGIES[strategy]
    pipe = dof.attach(spec.build())
    before = state(pipe)
    handle = enable(pipe, options)
    assert get_adapter(pipe).name.startswith(model.split("-")[0])
    prefetch = options.get("prefetch", 0)
    counts: dict[str, int] = {}
    probes = [
        on_every_leaf_forward(module, placement_checker(pipe, handle, name, prefetch, counts))
        for name, module in pipeline_modules(pipe).items()
    ]
    for probe in probes:
        probe.__enter__()
    try:
        for _ in range(2):  # the second call starts from the state the first one left
            assert torch.equal(spec.generate(pipe), reference(model))
    finally:
        for probe in probes:
            probe.__exit__(None, None, None)
    adapter = get_adapter(pipe)
    assert counts.get(adapter.denoiser, 0) > 0 and counts.get("vae", 0) > 0
    assert all(counts.get(name, 0) > 0 for name in adapter.experts if name in pipeline_modules(pipe))
    assert not spec.diffusers or any(counts.get(name, 0) > 0 for name in adapter.encoders)
    streamed = [record for record in handle.components.values() if record.ring is not None]
    if options["kind"] == "layerwise":
        assert any(record.ring.stats.calls > 0 for record in streamed)
        # Every denoiser streams, Wan 2.2's low-noise expert too (never swapped in whole).
        for name in adapter.denoisers:
            if name in handle.components:
                assert handle.components[name].ring.stats.calls > 0, name
    if options.get("encoders") == "stream" and spec.diffusers:
        assert len(streamed) >= 2  # the DiT and at least one text encoder
    pipe.disable_offload()
    after = state(pipe)
    for name, tensors in before.items():
        assert all(torch.equal(after[name][k], v) for k, v in tensors.items()), name
    assert torch.equal(spec.generate(pipe), reference(model))


@pytest.mark.parametrize("model", [name for name, spec in MODELS.items() if spec.diffusers])
def test_saved_and_reloaded_with_offload_pipeline(model, tmp_path):
    MODELS[model].build().save_pretrained(tmp_path)
    pipe = MODELS[model].reloaded(dof.OffloadPipeline.from_pretrained(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_layerwise_offload("cpu", prefetch=1)
    # Packing copies every weight into 64-byte aligned slabs, so even weights that from_pretrained left at
    # odd offsets of a memory-mapped file compute bitwise like the freshly built pipeline.
    assert torch.equal(MODELS[model].generate(pipe), reference(model))
    pipe.disable_offload()
    pipe.enable_model_offload("cpu")
    assert torch.equal(MODELS[model].generate(pipe), reference(model))
    pipe.disable_offload()


def test_nextstep_lm_head_stays_on_host_and_loads_if_called():
    pipe = dof.attach(build_tiny_nextstep_pipeline())
    handle = pipe.enable_layerwise_offload("cpu", prefetch=1)
    head = pipe.model.lm_head
    MODELS["nextstep"].generate(pipe)
    assert all(is_placeholder(p) for p in head.parameters())  # image generation never calls it
    assert not is_placeholder(pipe.model.gen_pos_embed)  # read by the pipeline directly: resident
    hidden = torch.randn(1, 3, head.in_features)
    with torch.no_grad():
        logits = head(hidden)
    assert logits.shape[-1] == head.out_features
    assert not any(is_placeholder(p) for p in head.parameters())
    report = {c.name: c for c in pipe.offload_report().components}
    assert report["model"].blocks_streamed == len(pipe.model.layers)
    pipe.disable_offload()
    assert handle.removed
