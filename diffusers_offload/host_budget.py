"""`ram_budget`: the placements' streamed blocks that stay on disk so that host memory fits the budget.

Composes the policy (`planning.tiers.plan_host`) with the placements of an `enable_*_offload` call: each
streamed component's `Placement` gets the `disk_blocks` the host plan leaves in the checkpoint files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .engine import Placement
from .engine.blocks import resident_indices
from .model_registry import ModelAdapter
from .planning import measure_components
from .planning.tiers import DEFAULT_READ_AHEAD, HostPlan, PlacedComponent, plan_host


def host_memory_bytes() -> int:
    """This machine's physical memory (what a "60%" ram_budget is taken of)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        import psutil

        return psutil.virtual_memory().total


def placed_components(
    placements: dict[str, Placement], block_counts: dict[str, int]
) -> list[PlacedComponent]:
    """The host planner's view of `placements` (block indices as in the adapter's block lists)."""
    placed = []
    for name, placement in placements.items():
        if placement.strategy != "streamed":
            placed.append(PlacedComponent(name, placement.strategy))
            continue
        count = block_counts[name]
        keep = resident_indices(placement.resident_blocks, count)
        streamed = tuple(i for i in range(count) if i not in keep)
        placed.append(PlacedComponent(name, "streamed", streamed, min(placement.prefetch + 1, len(streamed))))
    return placed


def apply_ram_budget(
    pipe: Any,
    adapter: ModelAdapter,
    placements: dict[str, Placement],
    ram_budget: int | str,
    device: torch.device,
    *,
    read_ahead: int = DEFAULT_READ_AHEAD,
) -> tuple[dict[str, Placement], HostPlan]:
    """`placements` with the disk blocks that bring host memory within `ram_budget`, and the host plan."""
    sizes = measure_components(adapter.components(pipe), adapter)
    sizes = [s for s in sizes if s.name in placements]
    counts = {s.name: len(s.block_bytes) for s in sizes}
    # Encoders streamed instead of swapped go `prefetch` blocks ahead, as the denoiser does.
    prefetch = max((p.prefetch for p in placements.values() if p.strategy == "streamed"), default=1)
    host_plan = plan_host(
        sizes,
        placed_components(placements, counts),
        ram_budget,
        host_total=host_memory_bytes(),
        device_is_host=device.type == "cpu",
        read_ahead=read_ahead,
        prefetch=prefetch,
        calls_per_step=adapter.calls.per_step(pipe=pipe),
        step_unit=adapter.step_unit,
    )
    updated = {}
    for name, placement in placements.items():
        disk = host_plan.disk_blocks(name)
        if name in host_plan.streamed_instead:
            # Swapped in the device plan, but its host copy does not fit: it streams, blocks from disk.
            placement = dataclasses.replace(
                placement,
                strategy="streamed",
                block_lists=tuple(adapter.block_paths(name)),
                resident_blocks=0,
                prefetch=prefetch,
            )
        updated[name] = (
            dataclasses.replace(placement, disk_blocks=disk, read_ahead=read_ahead) if disk else placement
        )
    return updated, host_plan
