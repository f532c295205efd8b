"""The rows of the benchmark: each places a freshly built pipeline one way and says how to undo it.

Ours go through the pipeline API a user calls; diffusers' through its own pipeline methods, with the
settings its docs recommend for speed (`use_stream=True` for group offloading).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..pipeline import attach

Undo = Callable[[], None]


@dataclass(frozen=True)
class RowContext:
    device: torch.device
    dit_bytes: int
    reserve: int | str  # kept free for activations within a budget


@dataclass(frozen=True)
class Row:
    name: str
    ours: bool
    offloads: bool  # whether the weights start in host memory (else they are built on the device)
    apply: Callable[[Any, RowContext], Undo]
    help: str
    into_offload: bool = False  # with --checkpoint: loaded by offload loading, straight into the slabs
    in_default: bool = True  # run when --rows is not given (the load rows compare loading, with --checkpoint)


def _none(pipe: Any, ctx: RowContext) -> Undo:
    pipe.to(ctx.device)
    return lambda: None


def _read_every_page(pipe: Any, ctx: RowContext) -> Undo:
    """Touches every page of every weight, so that a lazily mapped `from_pretrained` has read its bytes:
    the cold-start reference that offload loading is compared with."""
    from ..model_registry import pipeline_modules

    page = 4096
    for module in pipeline_modules(pipe).values():
        for tensor in (*module.parameters(), *module.buffers()):
            data = tensor.detach().reshape(-1).view(torch.uint8)
            int(data[::page].sum())
    return _none(pipe, ctx)


def _ours(enable: Callable[[Any, RowContext], Any]) -> Callable[[Any, RowContext], Undo]:
    def apply(pipe: Any, ctx: RowContext) -> Undo:
        pipe = attach(pipe)
        enable(pipe, ctx)
        return pipe.disable_offload

    return apply


def _diffusers(enable: Callable[[Any, RowContext], Any]) -> Callable[[Any, RowContext], Undo]:
    def apply(pipe: Any, ctx: RowContext) -> Undo:
        enable(pipe, ctx)
        return pipe.remove_all_hooks

    return apply


def _group(offload_type: str) -> Callable[[Any, RowContext], Any]:
    def enable(pipe: Any, ctx: RowContext) -> None:
        extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        pipe.enable_group_offload(
            onload_device=ctx.device, offload_type=offload_type, use_stream=True, **extra
        )

    return enable


ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("none", False, False, _none, "everything resident on the device"),
        Row(
            "read-all",
            False,
            True,
            _read_every_page,
            "plain from_pretrained, then every page of the weights read (cold-start reference; no offload)",
            in_default=False,
        ),
        Row("model", True, True, _ours(lambda p, c: p.enable_model_offload(c.device)), "ours: model swap"),
        Row(
            "layerwise-p1",
            True,
            True,
            _ours(lambda p, c: p.enable_layerwise_offload(c.device, prefetch=1)),
            "ours: every DiT block streamed, 1 block ahead",
        ),
        Row(
            "layerwise-p2",
            True,
            True,
            _ours(lambda p, c: p.enable_layerwise_offload(c.device, prefetch=2)),
            "ours: every DiT block streamed, 2 blocks ahead",
        ),
        Row(
            "load-model",
            True,
            True,
            _ours(lambda p, c: p.enable_model_offload(c.device)),
            "ours: model swap, weights read from the checkpoint straight into the slabs (--checkpoint)",
            into_offload=True,
            in_default=False,
        ),
        Row(
            "load-layerwise-p1",
            True,
            True,
            _ours(lambda p, c: p.enable_layerwise_offload(c.device, prefetch=1)),
            "ours: layerwise-p1, weights read from the checkpoint straight into the slabs (--checkpoint)",
            into_offload=True,
            in_default=False,
        ),
        Row(
            "load-layerwise-ram50",
            True,
            True,
            _ours(lambda p, c: p.enable_layerwise_offload(c.device, prefetch=1, ram_budget=c.dit_bytes // 2)),
            "ours: load-layerwise-p1 with a ram_budget of half the DiT's bytes: the blocks that do not fit "
            "stay on disk, read ahead from the checkpoint (--checkpoint)",
            into_offload=True,
            in_default=False,
        ),
        Row(
            "budget-50",
            True,
            True,
            _ours(lambda p, c: p.enable_offload(c.dit_bytes // 2, c.device, reserve=c.reserve)),
            "ours: planner with a device budget of half the DiT's bytes",
        ),
        Row(
            "diffusers-model",
            False,
            True,
            _diffusers(lambda p, c: p.enable_model_cpu_offload(device=c.device)),
            "diffusers: enable_model_cpu_offload()",
        ),
        Row(
            "diffusers-sequential",
            False,
            True,
            _diffusers(lambda p, c: p.enable_sequential_cpu_offload(device=c.device)),
            "diffusers: enable_sequential_cpu_offload()",
        ),
        Row(
            "diffusers-group-block",
            False,
            True,
            _diffusers(_group("block_level")),
            "diffusers: enable_group_offload(block_level, 1 block per group, use_stream=True)",
        ),
        Row(
            "diffusers-group-leaf",
            False,
            True,
            _diffusers(_group("leaf_level")),
            "diffusers: enable_group_offload(leaf_level, use_stream=True)",
        ),
    )
}


def parse_rows(text: str | None) -> list[str]:
    """Row names from "a,b,c" (default: all but the loading rows `read-all` and `load-*`, for
    --checkpoint); `none` is always run first, the others are relative to it."""
    default = [name for name, row in ROWS.items() if row.in_default]
    names = default if not text else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return ["none"] + [name for name in dict.fromkeys(names) if name != "none"]
