"""The host tier of a plan: within a host RAM budget, which streamed blocks stay on disk.

The device plan (``planner.plan_offload``, or placements given by hand) says what is resident on the device,
swapped or streamed. Every weight that is not resident on an accelerator has a host copy, except the
streamed blocks this module moves to the disk tier: they stay in the checkpoint files and a reader thread
reads them ahead, ``read_ahead`` blocks at most, into staging buffers of the largest disk block's size.

Host bytes held = host-only parts + swapped components whole + the non-block part and resident blocks of
streamed components + streamed blocks kept on the host + staging buffers; when the execution device is
the CPU, what the device plan puts "on the device" is host memory too and is added.

Rules where a choice had to be made:

* Blocks go to disk from the components read least often first: streamed encoders (one pass per pipeline
  call) before denoisers (``calls_per_step`` passes per step).
* Within a component, the fewest blocks that make the budget fit go to disk, spread evenly over its
  streamed blocks: the reader reads one while the host blocks between them compute.
* Swapped components and non-block parts are never put on disk: they are copied whole when entered, so
  a disk read there would stall the pipeline for the whole component. When even every streamed block
  on disk does not fit, swapped non-denoisers that have blocks (text encoders), largest first, stream
  instead (a ring on the device, which needs less device memory than the whole component), and then
  their blocks can go to disk like any other.
* Predicted disk reads: ``disk_bytes_per_step`` = ``calls_per_step`` times the disk bytes of the largest
  streamed denoiser (experts take turns, as in the device plan); ``disk_bytes_per_call`` = one pass of
  each streamed non-denoiser's disk blocks. At the end of a call the reader has read up to ``read_ahead``
  blocks for a next step that does not come; those reads are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..engine.blocks import spread_indices
from .budget import format_bytes, parse_bytes
from .planner import ComponentSizesLike
from .tables import format_table

# Staging buffers of a ring whose blocks are on disk: one being copied to the device, one being read.
DEFAULT_READ_AHEAD = 2


@dataclass(frozen=True)
class PlacedComponent:
    """What the device placement does with one component, as far as host memory is concerned."""

    name: str
    strategy: str  # "resident" | "swapped" | "streamed"
    streamed_blocks: tuple[int, ...] = ()  # block indices that stream (only "streamed")
    slots: int = 0  # device ring slots (only "streamed")


@dataclass(frozen=True)
class HostComponent:
    """Host memory and disk tier of one component."""

    name: str
    role: str
    host_bytes: int  # host slabs held (staging buffers excluded)
    disk_blocks: tuple[int, ...]  # block indices left on disk
    disk_bytes: int  # their bytes, read at every pass
    staging_bytes: int  # staging buffers of its ring (read_ahead x largest disk block)
    streamed_instead: bool = False  # swapped in the device plan, streamed so that its blocks stay on disk


@dataclass(frozen=True)
class HostPlan:
    """Where every weight lives off the device (host RAM or disk) and what is read from disk per step."""

    components: tuple[HostComponent, ...]
    ram_budget_bytes: int
    device_bytes_on_host: int  # the device plan's weights when the execution device is the CPU
    read_ahead: int
    disk_bytes_per_step: int
    disk_bytes_per_call: int
    calls_per_step: int = 1
    step_unit: str = "denoising step"

    @property
    def staging_bytes(self) -> int:
        return sum(c.staging_bytes for c in self.components)

    @property
    def host_bytes(self) -> int:
        """Predicted host bytes held for weights: slabs, staging buffers and (CPU device) device copies."""
        return sum(c.host_bytes for c in self.components) + self.staging_bytes + self.device_bytes_on_host

    @property
    def disk_bytes(self) -> int:
        return sum(c.disk_bytes for c in self.components)

    @property
    def streamed_instead(self) -> tuple[str, ...]:
        """Components the device plan swaps whole that stream instead, their blocks read from disk."""
        return tuple(c.name for c in self.components if c.streamed_instead)

    def disk_blocks(self, name: str) -> tuple[int, ...]:
        """Block indices of component `name` left on disk (empty if none)."""
        for comp in self.components:
            if comp.name == name:
                return comp.disk_blocks
        return ()

    def __str__(self) -> str:
        headers = ("component", "host", "disk", "blocks on disk", "staging")
        rows = [
            (
                c.name + (" (streamed)" if c.streamed_instead else ""),
                format_bytes(c.host_bytes),
                format_bytes(c.disk_bytes),
                str(len(c.disk_blocks)),
                format_bytes(c.staging_bytes),
            )
            for c in self.components
        ]
        lines = [format_table(headers, rows, right=(False, True, True, True, True))]
        on_device = (
            f" + {format_bytes(self.device_bytes_on_host)} on the CPU device"
            if self.device_bytes_on_host
            else ""
        )
        lines.append(
            f"host RAM: {format_bytes(self.host_bytes)} of {format_bytes(self.ram_budget_bytes)} ram budget "
            f"(staging {self.read_ahead} x per streamed ring: {format_bytes(self.staging_bytes)}{on_device})"
        )
        calls = f" ({self.calls_per_step} denoiser calls)" if self.calls_per_step != 1 else ""
        if self.streamed_instead:
            lines.append(
                f"{', '.join(self.streamed_instead)}: streamed layer-wise instead of swapped, so that its "
                "blocks can stay on disk (one pass per call)"
            )
        lines.append(
            f"disk tier: {format_bytes(self.disk_bytes)} left in the checkpoint files, "
            f"{format_bytes(self.disk_bytes_per_step)} read per {self.step_unit}{calls}"
            + (
                f", {format_bytes(self.disk_bytes_per_call)} once per call"
                if self.disk_bytes_per_call
                else ""
            )
        )
        return "\n".join(lines)


def _device_active(size: ComponentSizesLike, placed: PlacedComponent) -> int:
    blocks = size.block_bytes
    if placed.strategy != "streamed":
        return sum(blocks) + size.other_bytes
    streamed = set(placed.streamed_blocks)
    kept = sum(b for i, b in enumerate(blocks) if i not in streamed)
    return size.other_bytes + kept + placed.slots * max((blocks[i] for i in streamed), default=0)


def plan_host(
    sizes: Sequence[ComponentSizesLike],
    placed: Sequence[PlacedComponent],
    ram_budget: int | str,
    *,
    host_total: int | None = None,
    device_is_host: bool = False,
    read_ahead: int = DEFAULT_READ_AHEAD,
    prefetch: int = 1,
    calls_per_step: int = 1,
    step_unit: str = "denoising step",
) -> HostPlan:
    """Leaves the fewest streamed blocks on disk that bring the host bytes within ``ram_budget``.

    ``ram_budget``: bytes or a string ("24GiB", "60%" of ``host_total``). ``device_is_host``: the execution
    device is the CPU, so the device plan's weights are host memory too. When even every streamed block
    on disk does not fit, swapped non-denoisers with blocks (text encoders), largest first, are streamed
    instead (``prefetch`` blocks ahead) so that their blocks can stay on disk too; if that is still not
    enough, raises ValueError naming the minimum and the ways to reach it.
    """
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 1:
        raise ValueError(f"read_ahead must be an int >= 1 (staging buffers per ring), got {read_ahead!r}")
    budget = parse_bytes(ram_budget, total=host_total)
    by_name = {p.name: p for p in placed}
    missing = [s.name for s in sizes if s.name not in by_name]
    if missing:
        raise ValueError(f"plan_host: no placement for the components {missing}")
    promotable = sorted(
        (
            s
            for s in sizes
            if by_name[s.name].strategy == "swapped" and s.block_bytes and s.role != "denoiser"
        ),
        key=lambda s: -sum(s.block_bytes),
    )
    promoted: list[str] = []
    while True:
        try:
            return _plan_host(
                sizes, by_name, budget, device_is_host, read_ahead, calls_per_step, step_unit, tuple(promoted)
            )
        except _TooSmall as error:
            if not promotable:
                raise error.error from None
        size = promotable.pop(0)
        n = len(size.block_bytes)
        by_name[size.name] = PlacedComponent(size.name, "streamed", tuple(range(n)), min(prefetch + 1, n))
        promoted.append(size.name)


class _TooSmall(Exception):
    def __init__(self, error: ValueError) -> None:
        self.error = error


def _plan_host(
    sizes: Sequence[ComponentSizesLike],
    by_name: dict[str, PlacedComponent],
    budget: int,
    device_is_host: bool,
    read_ahead: int,
    calls_per_step: int,
    step_unit: str,
    promoted: tuple[str, ...],
) -> HostPlan:
    fixed: dict[str, int] = {}  # host bytes that cannot go to disk
    candidates: dict[str, list[tuple[int, int]]] = {}  # streamed (block index, bytes)
    for size in sizes:
        p = by_name[size.name]
        held = size.host_only_bytes
        if p.strategy == "swapped":
            held += sum(size.block_bytes) + size.other_bytes
        elif p.strategy == "streamed":
            streamed = set(p.streamed_blocks)
            held += size.other_bytes + sum(b for i, b in enumerate(size.block_bytes) if i not in streamed)
            candidates[size.name] = [(i, size.block_bytes[i]) for i in sorted(streamed)]
        fixed[size.name] = held
    device_on_host = 0
    if device_is_host:
        resident = [s for s in sizes if by_name[s.name].strategy == "resident"]
        others = [s for s in sizes if by_name[s.name].strategy != "resident"]
        device_on_host = sum(sum(s.block_bytes) + s.other_bytes for s in resident) + max(
            (_device_active(s, by_name[s.name]) for s in others), default=0
        )

    total = sum(fixed.values()) + device_on_host + sum(b for c in candidates.values() for _, b in c)
    excess = total - budget
    # Read least often first: encoders once per call, denoisers every step.
    order = sorted(
        (s for s in sizes if candidates.get(s.name)),
        key=lambda s: (s.role == "denoiser", -len(candidates[s.name])),
    )
    chosen: dict[str, tuple[int, ...]] = {}
    for size in order:
        if excess <= 0:
            break
        blocks = candidates[size.name]
        for k in range(1, len(blocks) + 1):
            picked = [blocks[j] for j in spread_indices(len(blocks), k)]
            freed = sum(b for _, b in picked) - read_ahead * max(b for _, b in picked)
            if freed >= excess or k == len(blocks):
                break
        if freed <= 0:  # too few blocks: their staging buffers would cost what they free
            continue
        chosen[size.name] = tuple(i for i, _ in picked)
        excess -= freed
    if excess > 0:
        raise _TooSmall(_too_small(sizes, by_name, fixed, candidates, budget, device_on_host, read_ahead))

    comps = []
    for size in sizes:
        disk = chosen.get(size.name, ())
        disk_set = set(disk)
        disk_bytes = sum(b for i, b in candidates.get(size.name, []) if i in disk_set)
        kept = sum(b for i, b in candidates.get(size.name, []) if i not in disk_set)
        staging = read_ahead * max((size.block_bytes[i] for i in disk), default=0)
        comps.append(
            HostComponent(
                size.name,
                size.role,
                fixed[size.name] + kept,
                disk,
                disk_bytes,
                staging,
                size.name in promoted and bool(disk),
            )
        )
    per_forward = max((c.disk_bytes for c in comps if c.role == "denoiser"), default=0)
    return HostPlan(
        components=tuple(comps),
        ram_budget_bytes=budget,
        device_bytes_on_host=device_on_host,
        read_ahead=read_ahead,
        disk_bytes_per_step=calls_per_step * per_forward,
        disk_bytes_per_call=sum(c.disk_bytes for c in comps if c.role != "denoiser"),
        calls_per_step=calls_per_step,
        step_unit=step_unit,
    )


def _too_small(
    sizes: Sequence[ComponentSizesLike],
    by_name: dict[str, PlacedComponent],
    fixed: dict[str, int],
    candidates: dict[str, list[tuple[int, int]]],
    budget: int,
    device_on_host: int,
    read_ahead: int,
) -> ValueError:
    staging = sum(read_ahead * max(b for _, b in c) for c in candidates.values() if c)
    minimum = sum(fixed.values()) + device_on_host + staging
    largest = sorted(sizes, key=lambda s: -fixed[s.name])[:3]
    held = ", ".join(f"{s.name} {format_bytes(fixed[s.name])} ({by_name[s.name].strategy})" for s in largest)
    at_least = format_bytes(minimum, round_up=True)
    fixes = [f"raise ram_budget to at least {at_least}"]
    kept_blocks = [
        s.name
        for s in sizes
        if by_name[s.name].strategy == "streamed"
        and len(by_name[s.name].streamed_blocks) < len(s.block_bytes)
    ]
    if kept_blocks:
        fixes.append(
            f"stream more blocks of {', '.join(kept_blocks)} (a smaller vram budget: blocks kept on the "
            "device while it runs have a host copy, streamed ones can stay on disk)"
        )
    if device_on_host:
        fixes.append("run on an accelerator (on the CPU the device's copies are host memory too)")
    return ValueError(
        f"ram_budget {format_bytes(budget)} ({budget} bytes) cannot hold this pipeline even with every "
        f"streamed block on disk: it needs at least {at_least} ({minimum} bytes) of host memory: what "
        f"must stay on the host ({held}, ...), staging buffers {format_bytes(staging)} ({read_ahead} per "
        f"streamed ring)"
        + (f", {format_bytes(device_on_host)} of device copies on the CPU" if device_on_host else "")
        + ". Swapped components and the non-block parts of streamed ones are held whole on the host"
        f". To fit: {', or '.join(fixes)}."
    )
