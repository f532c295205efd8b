"""`OffloadReport`: what an offload handle placed where, and what it has moved so far."""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from .engine import OffloadHandle
from .engine.devices import is_accelerator
from .planning import format_bytes
from .planning.tables import format_table


@dataclass(frozen=True)
class ComponentReport:
    name: str
    strategy: str
    host_bytes: int  # exact-size host slabs held for this component
    device_weight_bytes: int  # weights materialised on the device right now
    device_reserved_bytes: int  # device memory held for weights right now (ring slots in full)
    blocks_streamed: int
    blocks_resident: int
    loads: int  # host-to-device transfers so far (blocks or whole components)
    bytes_moved: int  # host-to-device bytes so far
    on_demand_loads: int  # streamed blocks that were not prefetched in time


_HEADERS = ("component", "strategy", "host", "on device", "device held", "blocks str/res", "loads", "moved")


@dataclass(frozen=True)
class OffloadReport:
    """Per-component placement and traffic; `str()` is a table, notebooks render it as HTML."""

    kind: str
    device: str
    components: tuple[ComponentReport, ...]
    plan: object | None  # the planning.Plan used, if a budget was given
    peak_device_bytes: int | None  # the device's own peak allocation counter, where it has one

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for c in self.components:
            blocks = f"{c.blocks_streamed}/{c.blocks_resident}" if c.strategy == "streamed" else "-"
            rows.append(
                (
                    c.name,
                    c.strategy,
                    format_bytes(c.host_bytes),
                    format_bytes(c.device_weight_bytes),
                    format_bytes(c.device_reserved_bytes),
                    blocks,
                    str(c.loads),
                    format_bytes(c.bytes_moved),
                )
            )
        return rows

    def _summary(self) -> str:
        peak = format_bytes(self.peak_device_bytes) if self.peak_device_bytes is not None else "not reported"
        host = sum(c.host_bytes for c in self.components)
        moved = sum(c.bytes_moved for c in self.components)
        misses = sum(c.on_demand_loads for c in self.components)
        return (
            f"{self.kind} offload on {self.device}: host copy {format_bytes(host)}, "
            f"moved {format_bytes(moved)} so far ({misses} blocks loaded on demand), device peak {peak}"
        )

    def __str__(self) -> str:
        table = format_table(
            _HEADERS, self._rows(), right=(False, False, True, True, True, False, True, True)
        )
        return f"{table}\n{self._summary()}"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADERS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self._rows()
        )
        summary = html.escape(self._summary())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><p>{summary}</p>"


def build_report(handle: OffloadHandle) -> OffloadReport:
    """Reads the engine's state (not the modules) into an `OffloadReport`."""
    if handle.removed:
        raise RuntimeError("This offload handle was removed; enable offloading again to get a report.")
    rows = []
    for name, record in handle.components.items():
        member, ring = record.member, record.ring
        weights = held = record.resident_bytes
        loads = moved = misses = 0
        for swapped in (member, *(m for own in record.host_only for m in own.members)):
            if swapped is None:
                continue
            if swapped.device_buffer is not None and swapped.group is not None:
                weights += swapped.group.data_bytes
                held += swapped.device_buffer.numel()
            loads += swapped.loads
            moved += swapped.bytes_moved
        streamed = 0
        if ring is not None:
            stats = ring.stats
            weights += sum(ring.groups[owner].data_bytes for owner in ring.slot_owner if owner >= 0)
            held += ring.device_bytes
            loads += stats.loads
            moved += stats.bytes_moved
            misses += stats.on_demand_loads
            streamed = len(ring.groups)
        rows.append(
            ComponentReport(
                name=name,
                strategy=record.placement.strategy,
                host_bytes=sum(group.slab.nbytes for group in record.groups),
                device_weight_bytes=weights,
                device_reserved_bytes=held,
                blocks_streamed=streamed,
                blocks_resident=record.resident_blocks,
                loads=loads,
                bytes_moved=moved,
                on_demand_loads=misses,
            )
        )
    device = handle.device
    peak = torch.accelerator.max_memory_allocated(device) if is_accelerator(device) else None
    return OffloadReport(handle.kind, str(device), tuple(rows), handle.plan, peak)
