"""Writes the generated docs pages: docs/models/*.md (one per supported model, budgets predicted by the
planner) and docs/cli.md (the CLI's own --help texts).

    python scripts/write_docs.py            # rewrite the pages
    python scripts/write_docs.py --check    # exit 1 if a page differs from what the code says now

Every figure comes from the shipped configs built on the `meta` device (no weights, no download), the
same path as `diffusers-offload plan`; tests/docs/test_generated_pages.py fails when a page is stale.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusers_offload.cli import build_parser, default_steps
from diffusers_offload.model_registry import get_adapter
from diffusers_offload.planning import (
    DEFAULT_RESERVE,
    format_bytes,
    measure_components,
    parse_bytes,
    plan_offload,
)
from diffusers_offload.planning.activations import estimate_for_components
from diffusers_offload.planning.meta import build_meta_components, pipeline_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
BUDGETS = ("8GiB", "12GiB", "16GiB", "24GiB", "32GiB", "48GiB", "80GiB")


@dataclass(frozen=True)
class ModelPage:
    slug: str
    title: str
    hub_id: str
    what: str
    video: bool = False


PAGES = (
    ModelPage(
        "sd35-medium", "Stable Diffusion 3.5 Medium", "stabilityai/stable-diffusion-3.5-medium", "MMDiT"
    ),
    ModelPage("sd35-large", "Stable Diffusion 3.5 Large", "stabilityai/stable-diffusion-3.5-large", "MMDiT"),
    ModelPage("qwen-image", "Qwen-Image", "Qwen/Qwen-Image", "MMDiT with a Qwen2.5-VL text encoder"),
    ModelPage("z-image-turbo", "Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", "single-stream DiT"),
    ModelPage("longcat-image", "LongCat-Image", "meituan-longcat/LongCat-Image", "Flux-style DiT"),
    ModelPage("ovis-image", "Ovis-Image", "AIDC-AI/Ovis-Image-7B", "Flux-style DiT with an Ovis encoder"),
    ModelPage("flux1-dev", "FLUX.1 [dev]", "black-forest-labs/FLUX.1-dev", "double/single-stream DiT"),
    ModelPage("flux2-dev", "FLUX.2 [dev]", "black-forest-labs/FLUX.2-dev", "DiT with a Mistral text encoder"),
    ModelPage("wan21-t2v-14b", "Wan 2.1 T2V 14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "video DiT", True),
    ModelPage(
        "wan22-t2v-a14b", "Wan 2.2 T2V A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "two video experts", True
    ),
    ModelPage("wan22-ti2v-5b", "Wan 2.2 TI2V 5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "video DiT", True),
    ModelPage(
        "hunyuanvideo15",
        "HunyuanVideo-1.5 (720p T2V)",
        "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v",
        "video DiT",
        True,
    ),
)


def switch_row(budget: str, plan, sizes) -> str | None:
    """A markdown row: bytes the switch between streamed experts waits for, before and now."""
    if plan.expert_switch is None:
        return None
    by_name = {s.name: s for s in sizes}
    experts = [c for c in plan.components if c.role == "denoiser" and c.streamed_blocks]
    head = max(c.bytes_loaded_per_call for c in experts)
    rest = max(by_name[c.name].other_bytes for c in experts)
    first = max(by_name[c.name].block_bytes[c.streamed_blocks[0]] for c in experts)
    # Compute waits for the non-block part and for its first block, if that one is resident (a streamed
    # first block is prefetched); each later resident block's copy overlaps the blocks before it.
    first_resident = max(by_name[c.name].block_bytes[0] if 0 in c.resident_blocks else 0 for c in experts)
    now = 0 if all(c.rest_ahead for c in experts) else rest + first_resident
    return (
        f"| {budget} | {format_bytes(rest)} | {format_bytes(head - rest)} | {format_bytes(first)} | "
        f"{format_bytes(head + first)} | {format_bytes(now)} |"
    )


def budget_rows(hub_id: str) -> tuple[str, list[str], str, str, str, list[str]]:
    """(pipeline class, markdown table rows, the unit of a step, the reserve, the smallest budget that fits,
    rows of the expert switch) for the budgets in BUDGETS."""
    class_name, components = build_meta_components(hub_id, dtype=torch.bfloat16)
    adapter = get_adapter(class_name, components=components)
    sizes = measure_components(adapter.components(components), adapter)
    # The reserve the CLI plans with: estimated for the pipeline's default size (VAE tiling as `plan`).
    activations = estimate_for_components(
        adapter,
        components,
        pipeline_class=class_name,
        pipeline_config=pipeline_config(hub_id),
        vae_tiling=True,
    )
    steps = default_steps(class_name)
    rows, switches = [], []
    for budget in BUDGETS:
        try:
            plan = plan_offload(
                sizes,
                budget,
                calls_per_step=adapter.calls.per_step({}),
                steps=steps,
                step_unit=adapter.step_unit,
                activations=activations,
            )
        except ValueError as error:
            needs = str(error).split("it needs at least ", 1)[1].split(" (", 1)[0]
            rows.append(f"| {budget} | does not fit (needs at least {needs}) | - | - | - |")
            continue
        per_image = format_bytes(plan.bytes_moved_per_image) if plan.steps else "-"
        switch = switch_row(budget, plan, sizes)
        if switch is not None:
            switches.append(switch)
        mode = plan.title
        rows.append(
            f"| {budget} | {mode} | {format_bytes(plan.peak_device_bytes)} | "
            f"{format_bytes(plan.bytes_moved_per_step)} | {per_image} |"
        )
        if mode.startswith("all resident"):
            break
    unit = adapter.step_unit + (f"; {steps} steps per image/video (the pipeline's default)" if steps else "")
    if activations is None:
        reserve = f"the default {format_bytes(parse_bytes(DEFAULT_RESERVE))} reserve for activations"
    else:
        size = f"{activations.width}x{activations.height}"
        size += f", {activations.frames} frames" if activations.frames else ""
        reserve = (
            f"a reserve of {format_bytes(activations.reserve_bytes)} for the activations of the "
            f"pipeline's default {size}"
        )
    fits = [budget for budget, row in zip(BUDGETS, rows) if "does not fit" not in row]
    return class_name, rows, unit, reserve, fits[0] if fits else BUDGETS[-1], switches


def snippet(page: ModelPage) -> str:
    load = f'pipe = dof.OffloadPipeline.from_pretrained("{page.hub_id}", dtype=torch.bfloat16)'
    if len(load) > 110:  # wrapped as `ruff format` wraps it (it formats the docs' Python blocks too)
        load = f'pipe = dof.OffloadPipeline.from_pretrained(\n    "{page.hub_id}", dtype=torch.bfloat16\n)'
    output = (
        "video = pipe(prompt=prompt).frames[0]" if page.video else "image = pipe(prompt=prompt).images[0]"
    )
    return (
        "```python\n"
        "import torch\n\n"
        "import diffusers_offload as dof\n\n"
        f"{load}\n"
        'pipe.enable_offload("12GiB")  # or enable_layerwise_offload() / enable_model_offload()\n'
        'prompt = "a cat on a laptop"\n'
        f"{output}\n"
        "print(pipe.offload_report())\n"
        "```\n"
    )


def render(page: ModelPage) -> str:
    class_name, rows, unit, reserve, fits, switches = budget_rows(page.hub_id)
    switch = []
    if switches:
        switch = [
            "## Expert switch",
            "",
            "A call switches once from `transformer` (high noise) to `transformer_2` (low noise). From the "
            "second call on, during the high-noise expert's last blocks, the low-noise expert's first "
            "streamed block is prefetched into a ring slot the high-noise expert no longer needs (no extra "
            "device memory); where the plan leaves room for it beside the running expert, the non-block "
            "part and resident blocks are copied then too. Otherwise the switch waits for the non-block "
            "part (and block 0, where it is resident): the resident blocks are copied behind it, and each "
            "waits for its own copy at its first forward, while the blocks before it compute. Bytes the "
            "switch waits for, for the "
            "layer-wise rows above (the first call also waits for the first streamed block):",
            "",
            "| budget | non-block part | resident blocks (arrive while it runs) | first streamed block | "
            "waited for before | waited for now |",
            "|---|---|---|---|---|---|",
            *switches,
            "",
        ]
    return "\n".join(
        [
            f"# {page.title}",
            "",
            f"Hub id `{page.hub_id}`, diffusers `{class_name}` ({page.what}), adapter "
            f"`{get_adapter(class_name).name}`.",
            "",
            "## Model-card snippet",
            "",
            snippet(page),
            "## Recommended budgets",
            "",
            f"Predicted by the planner from the published configs (bfloat16 weights, {reserve}, "
            f"prefetch 1, the pipeline's default call); traffic per {unit}. "
            f"Reproduce with `diffusers-offload plan {page.hub_id} --budget {fits}`.",
            "",
            f"| budget | placement | predicted peak | moved per {unit.split(';')[0]} | per image/video |",
            "|---|---|---|---|---|",
            *rows,
            "",
            *switch,
            "## Measured speed",
            "",
            "Not measured on a GPU yet: no accelerator has run this model with diffusers-offload. CPU "
            "figures for the engine are in [Benchmarks](../benchmarks.md).",
            "",
        ]
    )


def models_index() -> str:
    lines = [
        "# Supported models",
        "",
        "Each page gives the hub id, a model-card snippet, the budgets the planner recommends and what has",
        "been measured. Any other diffusers pipeline gets the generic adapter (see",
        "[Adding a model](../adding-a-model.md)); [NextStep-1](nextstep.md) is not a diffusers pipeline and",
        "is attached by hand.",
        "",
        "| model | hub id |",
        "|---|---|",
        *(f"| [{p.title}]({p.slug}.md) | `{p.hub_id}` |" for p in PAGES),
        "| [NextStep-1](nextstep.md) | `stepfun-ai/NextStep-1.1` (code: github.com/stepfun-ai/NextStep-1) |",
        "",
    ]
    return "\n".join(lines)


def cli_page() -> str:
    """The --help of the command and of each verb, as the installed command prints them."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page must not depend on it
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # argparse keeps subparsers only here
    parts = [
        "# Command line",
        "",
        "`diffusers-offload VERB ...` (also `python -m diffusers_offload VERB ...`). Every error is one line",
        "on stderr naming the flag to change, with exit status 2; bad flags are refused before any model is",
        "built or loaded. Sizes take a unit: `12GiB`, `7.5GB`, `512MiB` or `75%` of the device.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, verb in verbs.items():
        parts += ["", f"## {name}", "", "```text", verb.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def pages() -> dict[Path, str]:
    out = {DOCS / "models" / f"{page.slug}.md": render(page) for page in PAGES}
    out[DOCS / "models" / "index.md"] = models_index()
    out[DOCS / "cli.md"] = cli_page()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in pages().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(DOCS.parent)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale pages (run python scripts/write_docs.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
