"""`diffusers-offload demo`: a tiny SD3 pipeline built locally, run without offload and with each strategy."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .pipeline import attach
from .planning import format_bytes
from .planning.tables import format_table
from .tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline

STRATEGIES = ("none", "model", "layerwise")


def run_demo(
    out: str | Path = "demo.png", device: str | None = None, prompt: str = "a cat on a laptop"
) -> bool:
    """Runs the tiny pipeline with each strategy, prints a table, saves the image; True if all match."""
    pipe = attach(build_tiny_sd3_pipeline())
    if device is None and not torch.accelerator.is_available():
        device = "cpu"  # the demo runs anywhere; say so instead of warning that nothing is saved
        print("no accelerator found: running on the CPU (same code paths, synchronous copies)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    try:
        return _run(pipe, out, device, prompt)
    finally:
        torch.set_num_threads(threads)


def _run(pipe, out: str | Path, device: str | None, prompt: str) -> bool:
    pipe(prompt, **TINY_SD3_CALL)  # warm-up, so the first timed strategy is not penalised
    rows = []
    reference = None
    for strategy in STRATEGIES:
        handle = None
        if strategy == "none" and device is not None:
            pipe.to(device)
        elif strategy == "model":
            handle = pipe.enable_model_offload(device)
        elif strategy == "layerwise":
            handle = pipe.enable_layerwise_offload(device, prefetch=1)
        start = time.perf_counter()
        images = pipe(
            prompt, **TINY_SD3_CALL, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
        seconds = time.perf_counter() - start
        if reference is None:
            reference = images
        host = format_bytes(handle.host_bytes) if handle else "-"
        rows.append((strategy, f"{seconds * 1000:.0f} ms", host, str(torch.equal(images, reference))))
        if handle is not None:
            pipe.disable_offload()
    print(format_table(("strategy", "time", "host copy", "bitwise = none"), rows))
    image = pipe.image_processor.postprocess(reference, output_type="pil")[0]
    image.save(out)
    print(f"saved {out}")
    return all(row[-1] == "True" for row in rows)
