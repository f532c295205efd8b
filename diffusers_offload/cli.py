"""The `diffusers-offload` command line: `demo`, `plan`, `generate` and `bench`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

OFFLOAD_CHOICES = ("none", "model", "layerwise", "auto")
DTYPES = ("bfloat16", "float16", "float32")
# Named here so that `--help` needs no torch import; tests check they match the bench package.
BENCH_MODELS = (
    "sd35-medium",
    "qwen-image",
    "z-image",
    "flux1-dev",
    "wan21-t2v-14b",
    "tiny-sd3",
    "tiny-qwen-image",
    "tiny-z-image",
    "tiny-flux",
    "tiny-wan",
)
BENCH_ROWS = (
    "none",
    "read-all",
    "model",
    "layerwise-p1",
    "layerwise-p2",
    "load-model",
    "load-layerwise-p1",
    "budget-50",
    "diffusers-model",
    "diffusers-sequential",
    "diffusers-group-block",
    "diffusers-group-leaf",
)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.out, device=args.device) else 1


def _default_steps(pipeline_class: str) -> int | None:
    """The ``num_inference_steps`` default of a diffusers pipeline's ``__call__`` (None if it has none)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    parameter = inspect.signature(cls.__call__).parameters.get("num_inference_steps") if cls else None
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def _plan(args: argparse.Namespace) -> int:
    import torch

    from .model_registry import get_adapter

    from .planning import format_bytes, measure_components, parse_bytes, plan_offload
    from .planning.meta import build_meta_components

    parse_bytes(args.budget)  # a bad budget string fails before any model is built
    class_name, components = build_meta_components(args.model, dtype=getattr(torch, args.dtype))
    adapter = get_adapter(class_name, components=components)
    sizes = measure_components(adapter.components(components), adapter)
    print(f"{args.model}: {class_name} (adapter {adapter.name!r}), weights in {args.dtype}")
    for size in sizes:
        params = sum(p.numel() for p in components[size.name].parameters())
        blocks = f", {len(size.block_bytes)} blocks" if size.block_bytes else ""
        total = format_bytes(size.total_bytes)
        print(f"  {size.name:<16} {size.role:<9} {params / 1e9:7.3f} B params  {total:>11}{blocks}")
    call = {}
    if args.guidance_scale is not None and adapter.calls.guidance_argument is not None:
        call[adapter.calls.guidance_argument] = args.guidance_scale
    if args.negative_prompt:
        call.update(dict.fromkeys(adapter.calls.needs_one_of, "a negative prompt"))
    plan = plan_offload(
        sizes,
        args.budget,
        reserve=args.reserve,
        prefetch=args.prefetch,
        strategy=args.strategy,
        calls_per_step=adapter.calls.per_step(call),
        steps=args.steps if args.steps is not None else _default_steps(class_name),
    )
    print()
    print(plan)
    if adapter.notes and args.verbose:
        print(f"\nnotes: {adapter.notes}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import OffloadPipeline

    if args.offload == "auto" and args.budget is None and args.device == "cpu":
        raise ValueError("--offload auto on the CPU needs --budget (e.g. --budget 8GiB)")
    if args.budget is not None and args.offload not in ("auto", "layerwise"):
        raise ValueError("--budget applies to --offload auto or layerwise")
    source = Path(args.model)
    looks_like_hub_id = (
        args.model.count("/") == 1 and not source.is_absolute() and not args.model.startswith(".")
    )
    if not source.is_dir() and not looks_like_hub_id:
        raise FileNotFoundError(f"{args.model} is neither a local folder nor a hub id (owner/name)")
    dtype = getattr(torch, args.dtype)
    if args.offload == "none":
        pipe = OffloadPipeline.from_pretrained(args.model, dtype=dtype)
        if args.device is not None:
            pipe.to(args.device)
    else:
        # Offload loading: each weight read from its file straight into the offload layout.
        pipe = OffloadPipeline.from_pretrained(
            args.model,
            offload=args.offload,
            vram_budget=args.budget,
            device=args.device,
            prefetch=args.prefetch,
            reserve=args.reserve,
            dtype=dtype,
        )
    call = {"generator": torch.Generator().manual_seed(args.seed), "output_type": "pil"}
    for name, argument in (("steps", "num_inference_steps"), ("height", "height"), ("width", "width")):
        if getattr(args, name) is not None:
            call[argument] = getattr(args, name)
    if args.frames is not None:
        call["num_frames"] = args.frames
    # By keyword: some pipelines (Flux2Pipeline) take an image as their first positional argument.
    output = pipe(prompt=args.prompt, **call)
    frames = getattr(output, "frames", None)
    if frames is not None:  # video pipelines (Wan, HunyuanVideo-1.5): an animated image, one frame each
        if Path(args.out).suffix.lower() not in (".png", ".gif", ".webp"):
            raise ValueError(f"{args.out}: a video is saved as an animated .png, .gif or .webp")
        first, *rest = frames[0]
        first.save(args.out, save_all=True, append_images=rest, duration=62, loop=0)
    else:
        output.images[0].save(args.out)
    if pipe.offload_handle is not None:
        print(pipe.offload_report())
    print(f"saved {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_results, run_bench, write_json
    from .engine.devices import resolve_device

    if args.steps < 0 or args.warmup < 0:
        raise ValueError("--steps and --warmup must be >= 0")
    device = str(resolve_device(args.device))
    config = BenchConfig(
        model=args.model,
        device=device,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        height=args.height,
        width=args.width,
        dit_only=args.dit_only,
        checkpoint=args.checkpoint,
    )
    save = (lambda done: write_json(args.json, config, done)) if args.json else None
    results = run_bench(
        config, args.rows, isolate=not args.in_process, row_timeout=args.row_timeout, after_row=save
    )
    print(format_results(config, results))
    if args.json:
        print(f"rows written to {args.json}")
    return 0 if results[0].error is None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-offload", description="Run large diffusion pipelines on small accelerators."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser(
        "demo",
        help="run a tiny pipeline built locally (no download) with each offload strategy",
        description="Builds a tiny random-weight SD3 pipeline, runs it without offload, with model swap and "
        "with layer-wise offload, checks the images are bitwise equal and saves one.",
    )
    demo.add_argument("--out", default="demo.png", help="where to save the image (default: demo.png)")
    demo.add_argument("--device", default=None, help="execution device (default: the accelerator, else cpu)")
    demo.set_defaults(run=_demo)

    plan = verbs.add_parser(
        "plan",
        help="print the placement a memory budget gets, from configs only (no weights)",
        description="Builds the pipeline's models on the meta device from their config.json files and "
        "prints what stays resident, what is swapped and what is streamed within the budget. "
        "MODEL is a local folder (diffusers layout) or one of the shipped ids, e.g. "
        "stabilityai/stable-diffusion-3.5-medium, "
        "Qwen/Qwen-Image, Tongyi-MAI/Z-Image-Turbo, meituan-longcat/LongCat-Image, AIDC-AI/Ovis-Image-7B, "
        "stepfun-ai/NextStep-1.1, black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.2-dev, "
        "Wan-AI/Wan2.1-T2V-14B-Diffusers, Wan-AI/Wan2.2-T2V-A14B-Diffusers, Wan-AI/Wan2.2-TI2V-5B-Diffusers, "
        "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v.",
    )
    plan.add_argument("model", metavar="MODEL_OR_DIR")
    plan.add_argument(
        "--budget", required=True, help='device memory for weights and activations, e.g. "12GiB"'
    )
    plan.add_argument("--reserve", default="1GiB", help="kept free for activations (default: 1GiB)")
    plan.add_argument("--prefetch", type=int, default=1, help="blocks copied ahead (default: 1)")
    plan.add_argument("--strategy", choices=("auto", "model", "layerwise"), default="auto")
    plan.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps, for the bytes moved per image or video (default: the pipeline's default)",
    )
    plan.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="the pipeline's CFG scale argument (guidance_scale, or true_cfg_scale for FLUX.1/Qwen-Image); "
        "above 1 it adds a second denoiser call per step where the pipeline runs CFG as a separate call "
        "(default: the pipeline's default)",
    )
    plan.add_argument(
        "--negative-prompt",
        action="store_true",
        help="plan for a call with a negative prompt (FLUX.1 and Qwen-Image run true CFG only with one)",
    )
    plan.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default: bfloat16)")
    plan.add_argument("-v", "--verbose", action="store_true", help="also print the adapter's notes")
    plan.set_defaults(run=_plan)

    generate = verbs.add_parser(
        "generate",
        help="generate an image with a pipeline you have locally",
        description="Loads the pipeline (a local folder, or a hub id when the hub is reachable), enables the "
        "chosen offloading, generates one image with the pipeline's progress bar and prints the offload "
        "report.",
    )
    generate.add_argument("model", metavar="MODEL_OR_DIR")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--offload", choices=OFFLOAD_CHOICES, default="auto")
    generate.add_argument(
        "--budget", default=None, help='device memory budget, e.g. "12GiB" (auto/layerwise)'
    )
    generate.add_argument("--reserve", default="1GiB", help="kept free for activations (default: 1GiB)")
    generate.add_argument("--prefetch", type=int, default=1)
    generate.add_argument("--device", default=None, help="execution device (default: the accelerator)")
    generate.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--frames", type=int, default=None, help="video frames (default: the pipeline's)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", default="image.png")
    generate.set_defaults(run=_generate)

    bench = verbs.add_parser(
        "bench",
        help="time our offloading beside diffusers' on one model, with the floors measured in the run",
        description="Builds the model with random weights (real-size from the shipped configs, or a tiny "
        "one), places it as each row says, runs warm-up and timed denoising steps of its transformer, and "
        "prints one table: seconds per step, ratio to `none`, the floor max(compute, H2D bytes / pinned "
        "bandwidth), peak device memory, host RSS, H2D bytes per step, the share of copy time hidden behind "
        "compute, time to enable. Each row runs in its own process; a row that fails shows its error.",
    )
    bench.add_argument("--model", required=True, help=f"model to build: {', '.join(BENCH_MODELS)}")
    bench.add_argument("--device", default=None, help="execution device (default: the accelerator, else cpu)")
    bench.add_argument("--steps", type=int, default=5, help="timed denoising steps per row (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    bench.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows (default: all; none always runs): {', '.join(BENCH_ROWS)}",
    )
    bench.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    bench.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    bench.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    bench.add_argument("--dit-only", action="store_true", help="build the transformer alone (no encoders)")
    bench.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="save the transformer there once and load it with from_pretrained in every row (times the load)",
    )
    bench.add_argument(
        "--json", default=None, metavar="FILE", help="also write the rows as JSON (after every row)"
    )
    bench.add_argument(
        "--in-process", action="store_true", help="run the rows in this process (faster start)"
    )
    bench.add_argument("--row-timeout", type=float, default=600.0, help="seconds before a row is stopped")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = " ".join(lines) or type(error).__name__
        print(f"diffusers-offload {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
