"""`OffloadReport`: what an offload handle placed where, what it has moved so far, and (with
`timing=True`) how much of the copy time compute hid, block by block."""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from .engine import OffloadHandle
from .engine.devices import is_accelerator
from .engine.disk import DiskStats
from .engine.timeline import BlockTiming, PassTiming
from .planning import format_bytes
from .planning.tables import format_table
from .traffic import CallTraffic


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
    disk: DiskStats | None = None  # the disk tier's reader (ram_budget), if some of its blocks are on disk
    disk_bytes: int = 0  # bytes of its blocks left in the checkpoint files


_HEADERS = ("component", "strategy", "host", "on device", "device held", "blocks res/str", "loads", "moved")
_TIMELINE_HEADERS = ("block", "calls", "copy ms", "compute ms", "stall ms")


@dataclass(frozen=True)
class ComponentTimeline:
    """Copy, compute and stall of one streamed component's blocks (means over the last passes).

    On an accelerator the times come from events on the copy and compute streams; on the CPU from the
    wall clock around the synchronous copies, which compute never hides.
    """

    name: str
    clock: str  # "device events" or "wall clock"
    per_pass: PassTiming
    blocks: tuple[BlockTiming, ...]

    def summary(self) -> str:
        p = self.per_pass
        hidden = f"{p.hidden_fraction:.0%}" if p.hidden_fraction is not None else "-"
        return (
            f"{self.name} timeline ({self.clock}, mean of {p.passes} passes), per pass: "
            f"copy {p.copy_ms:.2f} ms, hidden {p.hidden_ms:.2f} ms ({hidden}), "
            f"exposed {p.stall_ms:.2f} ms, compute {p.compute_ms:.2f} ms"
        )

    def table(self) -> str:
        rows = [
            (b.name, str(b.calls), f"{b.copy_ms:.3f}", f"{b.compute_ms:.3f}", f"{b.stall_ms:.3f}")
            for b in self.blocks
        ]
        return format_table(_TIMELINE_HEADERS, rows, right=(False, True, True, True, True))


@dataclass(frozen=True)
class OffloadReport:
    """Per-component placement and traffic; `str()` is a table, notebooks render it as HTML."""

    kind: str
    device: str
    components: tuple[ComponentReport, ...]
    plan: object | None  # the planning.Plan used, if a budget was given
    peak_device_bytes: int | None  # the device's own peak allocation counter, where it has one
    timelines: tuple[ComponentTimeline, ...] = ()  # with timing=True, once blocks have run
    last_call: CallTraffic | None = None  # bytes per step and per image of the last pipeline call

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for c in self.components:
            # resident/streamed, in the same order as the plan's column
            blocks = f"{c.blocks_resident}/{c.blocks_streamed}" if c.strategy == "streamed" else "-"
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

    @property
    def disk_bound(self) -> bool:
        """True when the disk tier set the pace: at least half of the blocks read from disk were not read
        ahead in time, so the copy to the device waited for the disk."""
        return any(c.disk is not None and c.disk.disk_bound for c in self.components)

    def _disk_summary(self) -> str | None:
        tiers = [c for c in self.components if c.disk is not None]
        if not tiers:
            return None
        parts = []
        for c in tiers:
            d = c.disk
            verdict = (
                "the disk is the bottleneck (a faster disk or a larger ram_budget helps)"
                if d.disk_bound
                else "read ahead in time"
            )
            parts.append(
                f"{c.name} disk tier: {format_bytes(c.disk_bytes)} in the checkpoint files, read "
                f"{format_bytes(d.bytes_read)} ({d.reads} block reads); {d.waits} of {d.takes} block loads "
                f"waited for the disk ({d.wait_seconds:.2f} s): {verdict}"
            )
        return "\n".join(parts)

    def __str__(self) -> str:
        table = format_table(
            _HEADERS, self._rows(), right=(False, False, True, True, True, False, True, True)
        )
        parts = [table, self._summary()]
        disk = self._disk_summary()
        if disk is not None:
            parts.append(disk)
        if self.last_call is not None:
            parts.append(self.last_call.summary())
        for timeline in self.timelines:
            parts += ["", timeline.summary(), timeline.table()]
        return "\n".join(parts)

    def plot(self, ax=None):
        """Bars of copy, compute and stall per block for each timed component (needs matplotlib).

        Returns the matplotlib Figure; in a notebook it shows itself. Requires `timing=True` at enable.
        """
        if not self.timelines:
            raise RuntimeError(
                "This report has no timeline: enable offloading with timing=True "
                "(e.g. pipe.enable_layerwise_offload(timing=True)) and run the pipeline first."
            )
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "report.plot() needs matplotlib: pip install matplotlib (or diffusers-offload[plot])."
            ) from error
        if ax is None:
            figure, axes = plt.subplots(
                len(self.timelines), 1, squeeze=False, figsize=(10, 3 * len(self.timelines))
            )
            axes = [row[0] for row in axes]
        else:
            figure, axes = ax.figure, [ax] * len(self.timelines)
        for axis, timeline in zip(axes, self.timelines):
            positions = [b.position for b in timeline.blocks]
            width = 0.28
            for offset, label, values in (
                (-width, "copy", [b.copy_ms for b in timeline.blocks]),
                (0.0, "compute", [b.compute_ms for b in timeline.blocks]),
                (width, "stall", [b.stall_ms for b in timeline.blocks]),
            ):
                axis.bar([p + offset for p in positions], values, width, label=label)
            axis.set_xlabel("block")
            axis.set_ylabel("ms per call")
            axis.set_title(timeline.summary(), fontsize=8)
            axis.legend()
        figure.tight_layout()
        return figure

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADERS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self._rows()
        )
        summary = html.escape(self._summary())
        disk = self._disk_summary()
        if disk is not None:
            summary += "<br>" + html.escape(disk).replace("\n", "<br>")
        if self.last_call is not None:
            summary += "<br>" + html.escape(self.last_call.summary())
        timelines = "".join(
            f"<p>{html.escape(t.summary())}</p><pre>{html.escape(t.table())}</pre>" for t in self.timelines
        )
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><p>{summary}</p>{timelines}"
        )


def build_report(handle: OffloadHandle, last_call: CallTraffic | None = None) -> OffloadReport:
    """Reads the engine's state (not the modules) into an `OffloadReport`; `last_call` is what the last
    pipeline call moved (the pipeline's own record)."""
    if handle.removed:
        raise RuntimeError("This offload handle was removed; enable offloading again to get a report.")
    rows = []
    timelines = []
    clock = "device events" if is_accelerator(handle.device) else "wall clock"
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
        disk, disk_bytes, staging = None, 0, 0
        if ring is not None and ring.reader is not None:
            disk = ring.reader.stats
            disk_bytes = sum(group.disk_bytes for group in ring.groups if group.on_disk)
            staging = ring.reader.staging_bytes
        if ring is not None:
            stats = ring.stats
            weights += sum(ring.groups[owner].data_bytes for owner in ring.slot_owner if owner >= 0)
            held += ring.device_bytes
            loads += stats.loads
            moved += stats.bytes_moved
            misses += stats.on_demand_loads
            streamed = len(ring.groups)
            if ring.timeline is not None:
                blocks = ring.timeline.blocks()
                per_pass = PassTiming.of(blocks)
                if per_pass is not None:
                    timelines.append(ComponentTimeline(name, clock, per_pass, tuple(blocks)))
        rows.append(
            ComponentReport(
                name=name,
                strategy=record.placement.strategy,
                host_bytes=sum(group.slab.nbytes for group in record.groups) + staging,
                device_weight_bytes=weights,
                device_reserved_bytes=held,
                blocks_streamed=streamed,
                blocks_resident=record.resident_blocks,
                loads=loads,
                bytes_moved=moved,
                on_demand_loads=misses,
                disk=disk,
                disk_bytes=disk_bytes,
            )
        )
    device = handle.device
    peak = torch.accelerator.max_memory_allocated(device) if is_accelerator(device) else None
    return OffloadReport(
        handle.kind, str(device), tuple(rows), handle.plan, peak, tuple(timelines), last_call
    )
