"""Runs the benchmark rows side by side and prints one table (`diffusers-offload bench`).

Each row runs in a process of its own by default: host memory and device peaks then belong to that row
alone, and a row that crashes (or is killed for memory) is reported while the others still run.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.blocks import resolve_blocks
from ..engine.devices import is_accelerator, resolve_device
from ..model_registry import get_adapter
from ..planning import DEFAULT_RESERVE, format_bytes, measure_components
from ..planning.tables import format_table
from ..report import build_report
from .measure import (
    H2DCounter,
    block_compute_times,
    flatten_tensors,
    h2d_bandwidth,
    host_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    synchronize,
    timed,
)
from .models import build_pipeline, get_model, text_encoder_inputs
from .rows import ROWS, RowContext, parse_rows

ROW_MARK = "BENCH_ROW "  # a child process prints its result on one line after this mark


@dataclass(frozen=True)
class BenchConfig:
    model: str
    device: str
    steps: int = 5
    warmup: int = 1
    dtype: str = "bfloat16"
    height: int | None = None
    width: int | None = None
    dit_only: bool = False
    checkpoint: str | None = None


@dataclass
class RowResult:
    row: str
    error: str | None = None
    step_s: float | None = None  # median seconds per denoising step
    steps_s: list[float] = field(default_factory=list)
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    host_rss: int | None = None  # RSS above the process's baseline (after imports) once the steps ran
    host_rss_peak: int | None = None  # the same at its highest from enabling on (kernel counter or samples)
    model_bytes: int | None = None
    h2d_bytes_per_step: int | None = None
    hidden_fraction: float | None = None  # of the copy time, from the timeline (ours only)
    enable_s: float | None = None
    load_s: float | None = None
    output_digest: str | None = None
    # Floors, measured in the `none` row.
    bandwidth: float | None = None  # bytes/s, pinned host to device
    block_compute_ms: float | None = None  # mean compute of one DiT block, everything resident
    block_calls_per_step: int | None = None  # DiT block forwards in one step (blocks x calls)
    # Relative to `none`, filled in by the parent.
    ratio: float | None = None
    added_per_block_us: float | None = None  # (step - none's step) / block calls: the engine's overhead
    floor_s: float | None = None
    matches_none: bool | None = None


def _digest(output: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for tensor in flatten_tensors(output):
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _peak(device: torch.device) -> tuple[int | None, int | None]:
    if not is_accelerator(device):
        return None, None
    return torch.accelerator.max_memory_allocated(device), torch.accelerator.max_memory_reserved(device)


def _engine_bytes_moved(pipe: Any) -> int | None:
    handle = getattr(pipe, "offload_handle", None)
    if handle is None:
        return None
    return sum(component.bytes_moved for component in build_report(handle).components)


def run_row(config: BenchConfig, name: str) -> RowResult:
    """Builds the model, applies row `name`, runs warm-up and timed steps, measures; never raises."""
    result = RowResult(name)
    try:
        _measure_row(config, name, result)
    except Exception as error:  # a failing row is a result: the table shows why
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        result.error = f"{type(error).__name__}: {' '.join(lines)}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _measure_row(config: BenchConfig, name: str, result: RowResult) -> None:
    spec = get_model(config.model)
    row = ROWS[name]
    device = resolve_device(config.device)
    dtype = getattr(torch, config.dtype)
    height, width = config.height or spec.height, config.width or spec.width
    if is_accelerator(device):
        torch.empty(1, device=device)  # the context belongs to the baseline, not to the row
    baseline = host_rss_bytes()
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    if row.into_offload and checkpoint is None:
        raise ValueError(f"row {name!r} loads from a saved checkpoint: pass --checkpoint DIR")
    # Built on the execution device (random initialisation is fast there), then placed where the row
    # starts from: host memory for the offloading rows, as after a user's from_pretrained.
    pipe, result.load_s = build_pipeline(
        spec,
        device,
        dtype,
        dit_only=config.dit_only,
        checkpoint=checkpoint,
        into_offload=row.into_offload,
    )
    pipe.to("cpu" if row.offloads else device)
    adapter = get_adapter(pipe)
    dit = getattr(pipe, adapter.denoiser)
    # The planner's sizes: every tensor once, quantized ones by the bytes they hold.
    sizes = {size.name: size.total_bytes for size in measure_components(adapter.components(pipe), adapter)}
    result.model_bytes = sum(sizes.values())
    inputs = spec.make_inputs(dit, height, width, spec, device, dtype)
    result.block_calls_per_step = len(resolve_blocks(dit, adapter.block_lists)) * len(inputs)
    encoder_inputs = text_encoder_inputs(pipe, device)
    gc.collect()
    if is_accelerator(device):
        torch.accelerator.reset_peak_memory_stats(device)
    kernel_peak = reset_peak_rss()
    rss_peak = host_rss_bytes()

    started = time.perf_counter()
    # Tiny activations are a few KiB: the default 1 GiB reserve would not fit half of a tiny DiT.
    reserve = 0 if spec.source == "tiny" else DEFAULT_RESERVE
    undo = row.apply(pipe, RowContext(device, sizes[adapter.denoiser], reserve))
    synchronize(device)
    result.enable_s = time.perf_counter() - started
    rss_peak = max(rss_peak, host_rss_bytes())
    outputs: list[Any] = []

    def step() -> None:
        outputs.clear()
        for kwargs in inputs:
            outputs.append(dit(**kwargs))

    try:
        with torch.inference_mode():
            for encoder, kwargs in encoder_inputs.items():  # once per image, as in the pipeline
                getattr(pipe, encoder)(**kwargs)
            for _ in range(config.warmup):
                step()
            result.steps_s = [timed(device, step) for _ in range(config.steps)]
            if result.steps_s:
                result.step_s = statistics.median(result.steps_s)
                result.output_digest = _digest(outputs)
            _measure_traffic(pipe, device, step, result, config)
            rss_now = host_rss_bytes()
            if kernel_peak:
                rss_peak = max(rss_peak, peak_rss_bytes() or 0)
            result.host_rss = rss_now - baseline
            result.host_rss_peak = max(rss_peak, rss_now) - baseline
            # Read before the floors: their 1 GiB bandwidth buffer is not the row's memory.
            result.peak_allocated, result.peak_reserved = _peak(device)
            if name == "none" and config.steps > 0:
                _measure_floors(dit, adapter, device, step, result)
    finally:
        undo()


def _measure_traffic(
    pipe: Any, device: torch.device, step: Any, result: RowResult, config: BenchConfig
) -> None:
    """H2D bytes of one more step, and (ours) the hidden share of the copies from two timed steps."""
    if config.steps == 0:
        return
    if is_accelerator(device):
        with H2DCounter() as counter:
            step()
            synchronize(device)
        result.h2d_bytes_per_step = counter.bytes
    else:
        before = _engine_bytes_moved(pipe)
        step()
        after = _engine_bytes_moved(pipe)
        if before is not None:
            result.h2d_bytes_per_step = after - before
    handle = getattr(pipe, "offload_handle", None)
    if handle is not None and handle.rings:
        for ring in handle.rings:
            ring.start_timing()
        # Two steps: the first block's copy of the first one was issued (prefetched) before timing began.
        step()
        step()
        timelines = build_report(handle).timelines
        copied = sum(t.per_pass.copy_ms * t.per_pass.passes for t in timelines)
        hidden = sum(t.per_pass.hidden_ms * t.per_pass.passes for t in timelines)
        result.hidden_fraction = hidden / copied if copied > 0 else None


def _measure_floors(
    dit: torch.nn.Module, adapter: Any, device: torch.device, step: Any, result: RowResult
) -> None:
    blocks = resolve_blocks(dit, adapter.block_lists)
    with block_compute_times(blocks, device) as times:
        step()
        synchronize(device)
    result.block_compute_ms = statistics.mean(times) if times else None
    result.bandwidth = h2d_bandwidth(device, (1 << 30) if is_accelerator(device) else (64 << 20))


# ----------------------------------------------------------------------------------------------- runs
def _run_isolated(config: BenchConfig, name: str, timeout: float) -> RowResult:
    command = [sys.executable, "-m", "diffusers_offload.bench.harness", json.dumps(asdict(config)), name]
    # The child imports the very package this process runs (a checkout, or the installed one).
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return RowResult(name, error=f"timed out after {timeout:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(ROW_MARK):
            return RowResult(**json.loads(line[len(ROW_MARK) :]))
    tail = " ".join(line.strip() for line in done.stderr.strip().splitlines()[-3:])
    return RowResult(name, error=f"process exited with {done.returncode}: {tail[-300:]}")


def run_bench(
    config: BenchConfig,
    rows: str | None = None,
    *,
    isolate: bool = True,
    row_timeout: float = 600.0,
    after_row: Callable[[list[RowResult]], None] | None = None,
) -> list[RowResult]:
    """Runs each row (in its own process unless `isolate=False`) and relates it to `none`.

    `after_row(results so far)` is called after every row, e.g. to save what is done in case the run is
    stopped before its end.
    """
    names = parse_rows(rows)
    get_model(config.model)  # a bad model name fails before any row runs
    results: list[RowResult] = []
    for index, name in enumerate(names, 1):
        result = _run_isolated(config, name, row_timeout) if isolate else run_row(config, name)
        results.append(result)
        _relate(results)
        status = (result.error or "")[:160] or (
            f"{result.step_s:.4f} s/step" if result.step_s is not None else "done"
        )
        print(f"[{index}/{len(names)}] {name}: {status}", file=sys.stderr, flush=True)
        if after_row is not None:
            after_row(results)
    return results


def _relate(results: list[RowResult]) -> None:
    none = results[0]
    for result in results:
        if result.step_s is None or none.step_s is None:
            continue
        result.ratio = result.step_s / none.step_s
        if result.block_calls_per_step:
            result.added_per_block_us = (result.step_s - none.step_s) / result.block_calls_per_step * 1e6
        transfer = (result.h2d_bytes_per_step or 0) / none.bandwidth if none.bandwidth else 0.0
        result.floor_s = max(none.step_s, transfer)
        if result.output_digest and none.output_digest:
            result.matches_none = result.output_digest == none.output_digest


# ---------------------------------------------------------------------------------------------- table
_HEADERS = (
    "row",
    "s/step",
    "x none",
    "+us/block",
    "floor s",
    "x floor",
    "peak alloc",
    "peak reserved",
    "host RSS",
    "RSS/model",
    "peak/model",
    "H2D/step",
    "hidden",
    "enable s",
    "load s",
    "= none",
)


def _cell(value: Any, form: str) -> str:
    if value is None:
        return "-"
    if form == "bytes":
        return format_bytes(value)
    if form == "bool":
        return "yes" if value else "NO"
    return format(value, form)


def _ratio(value: float | None, of: float | None) -> float | None:
    return value / of if value is not None and of else None


def format_results(config: BenchConfig, results: list[RowResult]) -> str:
    """The table, with a header naming the run and the floors measured in it."""
    rows, failures = [], []
    for r in results:
        if r.error:
            failures.append(f"  {r.row}: {r.error}")
            rows.append((r.row, "failed", *[""] * (len(_HEADERS) - 2)))
            continue

        rows.append(
            (
                r.row,
                _cell(r.step_s, ".4f"),
                _cell(r.ratio, ".2f"),
                _cell(r.added_per_block_us, ".1f"),
                _cell(r.floor_s, ".4f"),
                _cell(_ratio(r.step_s, r.floor_s), ".2f"),
                _cell(r.peak_allocated, "bytes"),
                _cell(r.peak_reserved, "bytes"),
                _cell(r.host_rss, "bytes"),
                _cell(_ratio(r.host_rss, r.model_bytes), ".2f"),
                _cell(_ratio(r.host_rss_peak, r.model_bytes), ".2f"),
                _cell(r.h2d_bytes_per_step, "bytes"),
                _cell(r.hidden_fraction, ".0%"),
                _cell(r.enable_s, ".2f"),
                _cell(r.load_s, ".2f"),
                _cell(r.matches_none, "bool"),
            )
        )
    table = format_table(_HEADERS, rows, right=(False, *[True] * (len(_HEADERS) - 2), False))
    text = f"{describe_run(config, results)}\n{table}"
    return text + ("\nfailed rows:\n" + "\n".join(failures) if failures else "")


def _device_name(device: torch.device) -> str:
    """The card's name on CUDA (what benchmarks.md records), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def describe_run(config: BenchConfig, results: list[RowResult]) -> str:
    spec = get_model(config.model)
    device = resolve_device(config.device)
    card = _device_name(device)
    none = results[0]
    floors = []
    if none.bandwidth:
        floors.append(
            f"H2D {none.bandwidth / 1e9:.1f} GB/s" + (" (pinned)" if is_accelerator(device) else " (memcpy)")
        )
    if none.block_compute_ms is not None:
        floors.append(f"compute {none.block_compute_ms:.3f} ms/block")
    model_bytes = next((r.model_bytes for r in results if r.model_bytes), None)
    size = f"{config.height or spec.height}x{config.width or spec.width}"
    calls = f"{spec.calls_per_step} call(s) of batch {spec.batch} per step"
    steps = f"median of {config.steps} steps after {config.warmup} warm-up"
    model = format_bytes(model_bytes) if model_bytes else "-"
    floors_text = f"; floors: {', '.join(floors)}" if floors else ""
    return f"{config.model} on {card}, {config.dtype}, {size}, {calls}, {steps}; model {model}{floors_text}"


def write_json(path: str | os.PathLike, config: BenchConfig, results: list[RowResult]) -> None:
    device = resolve_device(config.device)
    meta = {
        "config": asdict(config),
        "device": _device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "summary": describe_run(config, results),
    }
    Path(path).write_text(json.dumps({"run": meta, "rows": [asdict(r) for r in results]}, indent=1))


def _child(argv: list[str]) -> int:
    config, name = BenchConfig(**json.loads(argv[0])), argv[1]
    result = run_row(config, name)
    print(ROW_MARK + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
