"""Every ```python block of README.md and docs/ runs as printed.

The hub is not reachable from the tests, so `from_pretrained` of a hub id returns the locally built tiny
pipeline of the same diffusers class, and the pipeline's call takes the tiny sizes and step counts (a
snippet's own prompt and other arguments are kept). The blocks of one page run in order in one
namespace, as a reader would paste them.
"""

from __future__ import annotations

import functools
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from nextstep_standin import TINY_NEXTSTEP_CALL, build_tiny_nextstep_pipeline

import diffusers_offload as dof
from diffusers_offload.pipeline import OffloadPipeline
from diffusers_offload.tiny.flux import TINY_FLUX_CALL, build_tiny_flux_pipeline
from diffusers_offload.tiny.flux2 import TINY_FLUX2_CALL, build_tiny_flux2_pipeline
from diffusers_offload.tiny.hunyuan_video15 import (
    TINY_HUNYUAN_VIDEO15_CALL,
    build_tiny_hunyuan_video15_pipeline,
)
from diffusers_offload.tiny.longcat_image import TINY_LONGCAT_IMAGE_CALL, build_tiny_longcat_image_pipeline
from diffusers_offload.tiny.ovis_image import TINY_OVIS_IMAGE_CALL, build_tiny_ovis_image_pipeline
from diffusers_offload.tiny.qwen_image import TINY_QWEN_IMAGE_CALL, build_tiny_qwen_image_pipeline
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline
from diffusers_offload.tiny.wan import TINY_WAN_CALL, build_tiny_wan_pipeline
from diffusers_offload.tiny.z_image import TINY_Z_IMAGE_CALL, build_tiny_z_image_pipeline

ROOT = Path(__file__).parents[2]
# Pages whose blocks a dedicated test runs (with assertions on each block's result).
RUN_ELSEWHERE = {"docs/adding-a-model.md": "tests/docs/test_adding_a_model.py"}
# Pages whose blocks are fragments about a pipeline the reader already has: what runs before them.
PREAMBLES = {
    "docs/troubleshooting.md": (
        "import torch\n"
        "import diffusers_offload as dof\n"
        "from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline\n"
        "pipe = dof.attach(build_tiny_sd3_pipeline())\n"
        "pipe.enable_layerwise_offload('cpu')\n"
    ),
}
# Call arguments the tiny pipelines need small (a snippet's sizes are real-model sizes).
SIZE_ARGUMENTS = ("num_inference_steps", "height", "width", "num_frames", "max_sequence_length")

TINY: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "stabilityai/stable-diffusion-3.5-medium": (build_tiny_sd3_pipeline, TINY_SD3_CALL),
    "stabilityai/stable-diffusion-3.5-large": (build_tiny_sd3_pipeline, TINY_SD3_CALL),
    "Qwen/Qwen-Image": (build_tiny_qwen_image_pipeline, TINY_QWEN_IMAGE_CALL),
    "Tongyi-MAI/Z-Image-Turbo": (build_tiny_z_image_pipeline, TINY_Z_IMAGE_CALL),
    "meituan-longcat/LongCat-Image": (build_tiny_longcat_image_pipeline, TINY_LONGCAT_IMAGE_CALL),
    "AIDC-AI/Ovis-Image-7B": (build_tiny_ovis_image_pipeline, TINY_OVIS_IMAGE_CALL),
    "black-forest-labs/FLUX.1-dev": (build_tiny_flux_pipeline, TINY_FLUX_CALL),
    "black-forest-labs/FLUX.2-dev": (build_tiny_flux2_pipeline, TINY_FLUX2_CALL),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": (build_tiny_wan_pipeline, TINY_WAN_CALL),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": (
        functools.partial(build_tiny_wan_pipeline, two_experts=True),
        TINY_WAN_CALL,
    ),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (
        functools.partial(build_tiny_wan_pipeline, ti2v_5b=True),
        TINY_WAN_CALL,
    ),
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v": (
        build_tiny_hunyuan_video15_pipeline,
        TINY_HUNYUAN_VIDEO15_CALL,
    ),
}


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if python_blocks(p) and str(p.relative_to(ROOT)) not in RUN_ELSEWHERE]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def tiny_loader(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """A `from_pretrained` that builds the tiny pipeline of a hub id; its class's call gets tiny sizes."""

    def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in TINY:
            raise AssertionError(f"a snippet loads {name!r}, which has no tiny stand-in in {__file__}")
        build, tiny_call = TINY[name]
        pipe = build(dtype=kwargs.get("dtype", kwargs.get("torch_dtype", torch.float32)))
        cls = type(pipe)
        if not getattr(cls.__call__, "shrunk", False):
            small = {k: v for k, v in tiny_call.items() if k in SIZE_ARGUMENTS}
            original = cls.__call__

            @functools.wraps(original)
            def call(self, *call_args, **call_kwargs):
                return original(self, *call_args, **{**call_kwargs, **small})

            call.shrunk = True
            monkeypatch.setattr(cls, "__call__", call)
        return dof.attach(pipe) if kwargs.pop("_attach", True) else pipe

    return from_pretrained


def fake_nextstep_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """`from nextstep.models.pipeline_nextstep import NextStepPipeline` gives the tiny stand-in."""

    def pipeline(model_name_or_path: str, vae_name_or_path: str) -> Any:
        pipe = build_tiny_nextstep_pipeline()
        generate = pipe.generate_image
        small = {k: TINY_NEXTSTEP_CALL[k] for k in ("hw", "num_sampling_steps")}
        pipe.generate_image = lambda *a, **k: generate(*a, **{**k, **small})
        return pipe

    module = types.ModuleType("nextstep.models.pipeline_nextstep")
    module.NextStepPipeline = pipeline
    for name in ("nextstep", "nextstep.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "nextstep.models.pipeline_nextstep", module)


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_printed(page, monkeypatch, capsys):
    loader = tiny_loader(monkeypatch)
    monkeypatch.setattr(OffloadPipeline, "from_pretrained", staticmethod(loader))
    monkeypatch.setattr(
        diffusers.DiffusionPipeline, "from_pretrained", staticmethod(functools.partial(loader, _attach=False))
    )
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)  # the same run on any machine
    fake_nextstep_code(monkeypatch)
    scope: dict[str, Any] = {"__name__": "__snippet__"}
    exec(PREAMBLES.get(str(page.relative_to(ROOT)), ""), scope)
    for index, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.name}[{index}]", "exec"), scope)
    # Every page's snippets end with an offloaded pipeline that has run.
    assert isinstance(scope.get("pipe"), dof.OffloadMixin)
    assert scope["pipe"].offload_handle is not None or "disable_offload" in "".join(python_blocks(page))


def test_every_page_with_python_is_run_here_or_by_its_own_test():
    for page, test in RUN_ELSEWHERE.items():
        assert python_blocks(ROOT / page) and (ROOT / test).is_file()
    every = {
        str(p.relative_to(ROOT))
        for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
        if python_blocks(p)
    }
    assert every == {str(p.relative_to(ROOT)) for p in pages()} | set(RUN_ELSEWHERE)
    assert "docs/models/nextstep.md" in every and "README.md" in every


def test_every_hub_id_in_the_docs_has_a_tiny_stand_in():
    text = "\n".join(b for p in pages() for b in python_blocks(p))
    loaded = set(re.findall(r'from_pretrained\(\s*"([^"]+)"', text))
    assert loaded and loaded <= set(TINY)
