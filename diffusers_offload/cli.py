"""The `diffusers-offload` command line: `demo`, `plan`, `generate` and `bench`.

Only the standard library is imported at module level (`--help` and `--version` stay fast); each verb
imports torch, diffusers and the rest of the package when it runs. Every error is one line on stderr
naming the flag to change, with exit status 2, and bad flags are refused before any model is built.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    import torch

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
    "load-layerwise-ram50",
    "budget-50",
    "diffusers-model",
    "diffusers-sequential",
    "diffusers-group-block",
    "diffusers-group-leaf",
)


# Flags that take a byte size: a value such as "-5GiB" must reach our own check, not argparse's
# "expected one argument" (argparse reads a leading "-" as the start of another option).
SIZE_FLAGS = ("--budget", "--reserve")
# Python argument names in library messages -> the flag that sets them here.
_FLAG_FOR_ARGUMENT = {
    "vram_budget": "--budget",
    "reserve": "--reserve",
    "height": "--height",
    "width": "--width",
    "frames": "--frames",
    "batch": "--batch",
    "prefetch": "--prefetch",
    "strategy": "--strategy",
    "device": "--device",
}

# The planner's fixes in prose, as the flags that make them.
_FLAG_PHRASES = {
    "raise the budget": "raise --budget",
    "a smaller reserve": "a smaller --reserve",
    "lower prefetch": "lower --prefetch",
    "raise ram_budget": "raise --ram-budget",
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``diffusers-offload plan: error: ... (see --help)``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _non_negative_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid integer value: 'x'" (see __name__ below)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


_non_negative_int.__name__ = "integer"  # argparse names the type in "invalid integer value: 'x'"
_positive_int.__name__ = "integer"


def _check_size(flag: str, value: str | None) -> None:
    """Refuse a size without a unit ("12" would be 12 bytes) and anything parse_bytes refuses."""
    if value is None:
        return
    from .planning.budget import parse_bytes

    text = value.strip()
    if re.fullmatch(r"[+-]?[\d.]+(?:[eE][+-]?\d+)?", text):
        raise ValueError(f"{flag} {value}: give a unit, e.g. {flag} {text}GiB (or {text}GB, {text}MiB)")
    try:
        parse_bytes(text, total=100 if text.endswith("%") else None)
    except ValueError as error:
        reason = str(error).split(": ", 1)[-1]
        if reason.startswith(("expected", "unknown unit")):  # phrased for Python callers
            reason = (
                "not a size; write e.g. 12GiB, 7.5GB, 512MiB or 75% (GiB/MiB: powers of 1024; GB/MB: of 1000)"
            )
        raise ValueError(f"{flag} {value}: {reason}") from None


def _check_device(flag: str, device: str | None) -> torch.device:
    """The torch.device for ``device`` (None: the accelerator if there is one, else the CPU, said once).

    Refuses a device this torch build cannot use (``--device cuda`` on a CPU-only build) in one line.
    """
    import torch

    from .engine.devices import resolve_device

    if device is None:
        if torch.accelerator.is_available():
            return resolve_device(None)
        print("no accelerator found: running on the CPU")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{flag} {device}: not a device torch knows (e.g. cpu, cuda, cuda:1, xpu, mps)"
        ) from None
    if resolved.type in ("cpu", "meta"):
        if resolved.type == "meta":
            raise ValueError(f"{flag} meta: the meta device holds no data; use {flag} cpu or an accelerator")
        return resolved
    backend = getattr(torch, resolved.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        build = torch.__version__
        raise ValueError(
            f"{flag} {device}: this torch build ({build}) sees no {resolved.type} device; use {flag} cpu, "
            f"or install a torch build for {resolved.type}"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"{flag} {device}: only {_count(count, resolved.type + ' device')} visible")
    return resolve_device(resolved)


def _check_model_source(model: str) -> None:
    """A path that is not a folder is reported as a missing folder, not as an unknown model id."""
    source = Path(model)
    looks_like_path = (
        source.is_absolute()
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/"
        and os.sep in model
    )
    if source.exists() and not source.is_dir():
        raise ValueError(
            f"{model} is a file; MODEL_OR_DIR is a pipeline folder (with model_index.json) or a hub id"
        )
    if looks_like_path and not source.exists():
        raise ValueError(
            f"no folder {model} (MODEL_OR_DIR is a local pipeline folder or a hub id owner/name)"
        )


def _demo(args: argparse.Namespace) -> int:
    device = _check_device("--device", args.device)
    from .demo import run_demo

    return 0 if run_demo(args.out, device=str(device)) else 1


def default_steps(pipeline_class: str) -> int | None:
    """The ``num_inference_steps`` default of a diffusers pipeline's ``__call__`` (None if it has none)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    parameter = inspect.signature(cls.__call__).parameters.get("num_inference_steps") if cls else None
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def _plan(args: argparse.Namespace) -> int:
    _check_size("--budget", args.budget)  # bad flags fail before any model is built
    _check_size("--reserve", args.reserve)
    _check_size("--ram-budget", args.ram_budget)
    _check_model_source(args.model)
    import torch

    from .model_registry import get_adapter
    from .planning import format_bytes, measure_components, plan_offload
    from .planning.activations import estimate_for_components
    from .planning.meta import build_meta_components, pipeline_config

    class_name, components = build_meta_components(args.model, dtype=getattr(torch, args.dtype))
    adapter = get_adapter(class_name, components=components)
    activations = estimate_for_components(
        adapter,
        components,
        pipeline_class=class_name,
        pipeline_config=pipeline_config(args.model),
        height=args.height,
        width=args.width,
        frames=args.frames,
        batch=args.batch,
        # As the model cards run them: HunyuanVideo-1.5's, whose VAE decodes every frame at once, tiles it.
        vae_tiling=True,
        guidance_scale=args.guidance_scale,
    )
    sizes = measure_components(adapter.components(components), adapter)
    print(f"{args.model}: {class_name} (adapter {adapter.name!r}), weights in {args.dtype}")
    for size in sizes:
        params = sum(p.numel() for p in components[size.name].parameters())
        blocks = f", {_count(len(size.block_bytes), 'block')}" if size.block_bytes else ""
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
        steps=args.steps if args.steps is not None else default_steps(class_name),
        step_unit=adapter.step_unit,
        activations=activations,
    )
    print()
    print(plan)
    if args.ram_budget is not None:
        print()
        print(_host_plan(plan, sizes, args.ram_budget, adapter.step_unit))
    if adapter.notes and args.verbose:
        print(f"\nnotes: {adapter.notes}")
    return 0


def _host_plan(plan: Any, sizes: Any, ram_budget: str, step_unit: str) -> str:
    """The host and disk tiers of `plan` within `ram_budget` (for an accelerator: resident weights
    hold no host copy), with the disk reads of one image or video."""
    from .host_budget import host_memory_bytes
    from .planning import format_bytes
    from .planning.tiers import PlacedComponent, plan_host

    placed = [
        PlacedComponent(
            c.name,
            c.strategy,
            c.streamed_blocks,
            c.prefetch + 1 if c.streamed_blocks else 0,
        )
        for c in plan.components
    ]
    host = plan_host(
        sizes,
        placed,
        ram_budget,
        host_total=host_memory_bytes(),
        calls_per_step=plan.calls_per_step,
        step_unit=step_unit,
    )
    text = str(host)
    if plan.steps is not None and host.disk_bytes:
        per_image = plan.steps * host.disk_bytes_per_step + host.disk_bytes_per_call
        text += f"\n{format_bytes(per_image)} read from disk per image/video at {plan.steps} steps"
    return text


def _generate(args: argparse.Namespace) -> int:
    # Every flag is checked before the pipeline is loaded (loading can take minutes).
    _check_size("--budget", args.budget)
    _check_size("--reserve", args.reserve)
    _check_size("--ram-budget", args.ram_budget)
    _check_model_source(args.model)
    if args.ram_budget is not None and args.offload == "none":
        raise ValueError("--ram-budget applies to --offload auto, layerwise or model, not --offload none")
    if args.budget is not None and args.offload not in ("auto", "layerwise"):
        raise ValueError(f"--budget applies to --offload auto or layerwise, not --offload {args.offload}")
    source = Path(args.model)
    if not source.is_dir() and args.model.count("/") != 1:
        raise ValueError(f"{args.model} is neither a local folder nor a hub id (owner/name)")
    if args.frames is not None and Path(args.out).suffix.lower() not in (".png", ".gif", ".webp"):
        raise ValueError(f"--out {args.out}: a video is saved as an animated .png, .gif or .webp")
    device = _check_device("--device", args.device)
    offload = args.offload
    if offload == "auto" and args.budget is None and device.type == "cpu":
        if args.ram_budget is not None:
            # Within a host budget the DiT's blocks stream, those that do not fit read from disk.
            offload = "layerwise"
        else:
            # On the CPU the weights already live in host memory: offloading would only add copies.
            print("running on the CPU: no offload (the weights already live in host memory)")
            offload = "none"
    import torch

    from .pipeline import OffloadPipeline

    dtype = getattr(torch, args.dtype)
    if offload == "none":
        pipe = OffloadPipeline.from_pretrained(args.model, dtype=dtype)
        pipe.to(device)
    else:
        # Offload loading: each weight read from its file straight into the offload layout. A plan keeps
        # free what this call's size needs (the reserve is estimated from it unless --reserve is given).
        planned = {}
        if offload == "auto" or args.budget is not None:
            planned = dict(reserve=args.reserve, height=args.height, width=args.width, frames=args.frames)
        elif args.reserve is not None:
            raise ValueError("--reserve applies to a plan: --offload auto, or layerwise with --budget")
        pipe = OffloadPipeline.from_pretrained(
            args.model,
            offload=offload,
            vram_budget=args.budget,
            device=device,
            prefetch=args.prefetch,
            ram_budget=args.ram_budget,
            dtype=dtype,
            **planned,
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
            raise ValueError(f"--out {args.out}: a video is saved as an animated .png, .gif or .webp")
        first, *rest = frames[0]
        first.save(args.out, save_all=True, append_images=rest, duration=62, loop=0)
    else:
        output.images[0].save(args.out)
    if pipe.offload_handle is not None:
        print(pipe.offload_report())
    print(f"saved {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    device = str(_check_device("--device", args.device))
    from .bench import BenchConfig, format_results, run_bench, write_json

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
    parser = _ArgumentParser(
        prog="diffusers-offload", description="Run large diffusion pipelines on small accelerators."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show the full Python traceback (for bug reports)",
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
    plan.add_argument(
        "--reserve",
        default=None,
        help="kept free for activations (default: estimated from --height/--width/--frames/--batch; "
        "1GiB for a model without an activation estimate)",
    )
    plan.add_argument(
        "--ram-budget",
        default=None,
        help='host memory for weights, e.g. "16GiB" or "60%%": streamed blocks that do not fit stay on disk '
        "(prints what lives where and the bytes read from disk per step)",
    )
    plan.add_argument(
        "--prefetch", type=_non_negative_int, default=1, help="blocks copied ahead (default: 1)"
    )
    plan.add_argument(
        "--height", type=_positive_int, default=None, help="image/video height (default: the pipeline's)"
    )
    plan.add_argument(
        "--width", type=_positive_int, default=None, help="image/video width (default: the pipeline's)"
    )
    plan.add_argument(
        "--frames",
        type=_positive_int,
        default=None,
        help="video frames, video pipelines only (default: the pipeline's)",
    )
    plan.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="images or videos per call (default: 1)",
    )
    plan.add_argument("--strategy", choices=("auto", "model", "layerwise"), default="auto")
    plan.add_argument(
        "--steps",
        type=_positive_int,
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
    generate.add_argument(
        "--reserve",
        default=None,
        help="kept free for activations (default: estimated from the image or video size)",
    )
    generate.add_argument(
        "--ram-budget",
        default=None,
        help='host memory for weights, e.g. "16GiB" or "60%%": streamed blocks that do not fit are read '
        "from the checkpoint files while the pipeline runs",
    )
    generate.add_argument(
        "--prefetch", type=_non_negative_int, default=1, help="blocks copied ahead (default: 1)"
    )
    generate.add_argument(
        "--device",
        default=None,
        help="execution device (default: the accelerator, else the CPU without offload)",
    )
    generate.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    generate.add_argument(
        "--steps", type=_positive_int, default=None, help="denoising steps (default: the pipeline's)"
    )
    generate.add_argument("--height", type=_positive_int, default=None)
    generate.add_argument("--width", type=_positive_int, default=None)
    generate.add_argument(
        "--frames", type=_positive_int, default=None, help="video frames (default: the pipeline's)"
    )
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
    bench.add_argument(
        "--steps", type=_non_negative_int, default=5, help="timed denoising steps per row (default: 5)"
    )
    bench.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed steps first (default: 1)")
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


def _join_size_values(argv: list[str]) -> list[str]:
    """``--budget -5GiB`` -> ``--budget=-5GiB``, so the size check (not argparse) answers it."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] in SIZE_FLAGS and index + 1 < len(argv) and argv[index + 1].startswith("-"):
            if not argv[index + 1].startswith("--"):
                joined.append(f"{argv[index]}={argv[index + 1]}")
                index += 2
                continue
        joined.append(argv[index])
        index += 1
    return joined


def _one_line(error: BaseException) -> str:
    """The error's message on one line, with Python argument names replaced by the flags that set them."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines) or type(error).__name__
    for argument, flag in _FLAG_FOR_ARGUMENT.items():
        message = re.sub(rf"(?<![\w-]){argument}=(['\"]?)([\w.%-]+)\1", rf"{flag} \2", message)
    for phrase, flagged in _FLAG_PHRASES.items():
        message = message.replace(phrase, flagged)
    # A bare identifier only where it cannot be an English word ("reserve" and "device" are).
    return re.sub(r"(?<![\w.-])vram_budget(?![\w(])", "--budget", message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_size_values(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and bad flags (already printed): the same status
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"diffusers-offload {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            raise
        kind = "" if isinstance(error, (ValueError, RuntimeError, OSError)) else f"{type(error).__name__}: "
        print(f"diffusers-offload {args.verb}: error: {kind}{_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
