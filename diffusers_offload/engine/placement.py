"""Applying a placement to a set of named components: resident, swapped or streamed.

This is the one mechanism under every entry point: a pipeline's `enable_*_offload` and, for modules you
hold yourself, `apply_layerwise_offload` / `apply_model_offload` (`standalone.py`). The policy (which
component gets which strategy) is decided before, by the caller or the planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook

from .blocks import check_prefetch, resident_indices, resolve_blocks
from .devices import resolve_device, resolve_pin_memory
from .disk import DiskGroup, DiskReader
from .handle import OffloadHandle, ensure_not_offloaded
from .hooks import (
    ARRIVING_BLOCK_HOOK,
    CONFLICTING_METHODS,
    STREAMED_BLOCK_HOOK,
    WEIGHT_EDITORS,
    StreamedBlockHook,
    enter_on_forward,
    load_around_compiled,
    refuse_call,
    register_hook,
    wrap_entry_method,
    wrap_weight_editor,
)
from .loading import release_views
from .packing import (
    PlaceholderCache,
    WeightGroup,
    WeightSource,
    check_packable,
    collect_tensors,
    partition_tensors,
    private_slab,
    storage_leaves,
)
from .ring import PrefetchRing
from .sharing import open_segment
from .swap import ArrivingBlocks, SwapMember, SwapSet
from .transfer import Copier, make_copier

STRATEGIES = ("resident", "swapped", "streamed")


@dataclass(frozen=True)
class Placement:
    """What to do with one component."""

    strategy: str  # "resident" | "swapped" | "streamed"
    block_lists: tuple[str, ...] = ()  # streamed: ModuleList paths, in execution order
    resident_blocks: int | tuple[int, ...] = 0  # streamed: blocks loaded with the rest, not streamed
    prefetch: int = 1
    entry_methods: tuple[str, ...] = ()  # methods other than forward that enter the component
    host_only: tuple[str, ...] = ()  # submodules left on the host, loaded only if called
    resident_tensors: tuple[str, ...] = ()  # parameters/buffers read from outside the component
    rest_resident: bool = False  # streamed: the non-block part stays on the device, not swapped
    # streamed: takes turns with the other hand-over components (Wan 2.2's experts); its first block is
    # prefetched into a ring slot of the one before it, during that one's last blocks
    hand_over: bool = False
    rest_ahead: bool = False  # hand_over: its non-block part is copied then too (beside the one running)
    disk_blocks: tuple[int, ...] = ()  # streamed: blocks whose host copy stays in the checkpoint files
    read_ahead: int = 2  # staging buffers the disk reader fills ahead (with disk_blocks)

    def __post_init__(self) -> None:
        # Callers pass lists and single names; stored as tuples so that a Placement stays immutable.
        lists = self.block_lists
        object.__setattr__(self, "block_lists", (lists,) if isinstance(lists, str) else tuple(lists))
        if not isinstance(self.resident_blocks, int):
            object.__setattr__(self, "resident_blocks", tuple(self.resident_blocks))
        object.__setattr__(self, "disk_blocks", tuple(self.disk_blocks))


@dataclass
class ComponentRecord:
    """What was done to one component, for reports and tests."""

    name: str
    module: torch.nn.Module
    placement: Placement
    member: SwapMember | None = None
    ring: PrefetchRing | None = None
    resident_bytes: int = 0
    resident_blocks: int = 0  # blocks of a streamed component that are loaded with its rest
    groups: list[WeightGroup] = field(default_factory=list)  # every host slab of this component
    host_only: list[SwapSet] = field(default_factory=list)
    host_only_modules: list[torch.nn.Module] = field(default_factory=list)
    streamed_blocks: tuple[torch.nn.Module, ...] = ()  # in ring order


def _validate(
    named: Mapping[str, torch.nn.Module],
    placements: Mapping[str, Placement],
    source: WeightSource | None = None,
) -> None:
    if not named:
        raise ValueError("Nothing to offload: no nn.Module components were given.")
    if set(named) != set(placements):
        raise ValueError(
            f"placements must name exactly the components {sorted(named)}, got {sorted(placements)}."
        )
    if len({id(m) for m in named.values()}) != len(named):
        raise ValueError("The same module is given twice; list each component once.")
    for name, placement in placements.items():
        module = named[name]
        if placement.strategy not in STRATEGIES:
            raise ValueError(
                f"Component {name!r}: strategy must be one of {STRATEGIES}, got {placement.strategy!r}."
            )
        check_prefetch(placement.prefetch)
        for flag in ("rest_resident", "hand_over", "rest_ahead"):
            if getattr(placement, flag) and placement.strategy != "streamed":
                raise ValueError(
                    f"Component {name!r}: {flag} applies to the 'streamed' strategy only, "
                    f"not {placement.strategy!r}."
                )
        if placement.strategy == "streamed":
            if not placement.block_lists:
                raise ValueError(
                    f"Component {name!r} cannot be streamed: no block lists are declared for it."
                )
            count = len(resolve_blocks(module, placement.block_lists))
            keep = resident_indices(placement.resident_blocks, count)
            _check_disk_blocks(name, placement, keep, count, source)
        elif placement.disk_blocks:
            raise ValueError(
                f"Component {name!r}: disk_blocks apply to the 'streamed' strategy only, "
                f"not {placement.strategy!r}."
            )
        for method in placement.entry_methods:
            if not callable(getattr(module, method, None)):
                raise ValueError(f"Component {name!r} ({type(module).__name__}) has no method {method!r}.")
        for path in (*placement.host_only, *placement.resident_tensors):
            _resolve_attr(module, path, name)
    ensure_not_offloaded(named.values())
    for name, module in named.items():
        for key, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.device.type == "meta":
                raise ValueError(
                    f"Component {name!r}: {key} is on the 'meta' device (no weights). Load real weights "
                    "first, or load with OffloadPipeline.from_pretrained(..., offload=...)."
                )


def _check_disk_blocks(
    name: str, placement: Placement, keep: set[int], count: int, source: WeightSource | None
) -> None:
    if not placement.disk_blocks:
        return
    wrong = sorted(
        i for i in placement.disk_blocks if not (isinstance(i, int) and 0 <= i < count) or i in keep
    )
    if wrong:
        raise ValueError(
            f"Component {name!r}: disk_blocks {wrong} are not streamed blocks (there are {count} blocks, "
            f"resident: {sorted(keep)})."
        )
    if not hasattr(source, "locate"):
        raise ValueError(
            f"Component {name!r}: blocks on the disk tier are read from the checkpoint files; load with "
            "OffloadPipeline.from_pretrained(path, offload=..., ram_budget=...)."
        )
    if (
        isinstance(placement.read_ahead, bool)
        or not isinstance(placement.read_ahead, int)
        or placement.read_ahead < 1
    ):
        raise ValueError(f"Component {name!r}: read_ahead must be an int >= 1, got {placement.read_ahead!r}.")


def _resolve_attr(module: torch.nn.Module, path: str, name: str) -> object:
    target: object = module
    for part in path.split("."):
        target = getattr(target, part, None)
    if target is None:
        raise ValueError(f"Component {name!r} ({type(module).__name__}) has no attribute {path!r}.")
    return target


def apply_placements(
    named: Mapping[str, torch.nn.Module],
    placements: Mapping[str, Placement],
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
    *,
    kind: str = "custom",
    copier: Copier | None = None,
    timing: bool = False,
    source: WeightSource | None = None,
    share_host_memory: bool = False,
) -> OffloadHandle:
    """Places each component as its `Placement` says; swapped and streamed ones form one swap set.

    Everything is validated before any weight moves; a failure half-way undoes what was done.
    `timing=True` stamps every streamed block's copy and compute for the report's timeline.
    `source`: where the tensors it covers (stand-ins of a model built without weights) read their
    bytes from, straight into their slabs or onto the device. `share_host_memory=True`: the slabs live in
    named shared memory that every process offloading the same weights the same way uses
    (`shared_memory.SharedSegment`): the first one packs them, the others attach.
    """
    _validate(named, placements, source)
    device = resolve_device(device)
    pin = resolve_pin_memory(pin_memory, device)
    copier = copier or make_copier(device)
    handle = OffloadHandle(kind, device, pin)
    handle.timing = timing
    try:
        if share_host_memory:
            segment = open_segment(named, placements, source)
            if segment is not None:
                handle.shared_segment = segment
                # Registered first, so undone last: after every slab of the segment was let go.
                handle.on_remove(lambda _target: segment.detach())
        _apply(handle, named, placements, copier, source)
        if handle.shared_segment is not None:
            handle.shared_segment.finish()
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply(
    handle: OffloadHandle,
    named: Mapping[str, torch.nn.Module],
    placements: Mapping[str, Placement],
    copier: Copier,
    source: WeightSource | None = None,
) -> None:
    device = handle.device
    # A buffer that is a view (SD3's pos_embed) keeps its base alive, and with it a checkpoint's mapping.
    release_views(named.values(), keep=lambda t: source is not None and source.covers(t))
    placeholders = handle.placeholders
    swap_set = SwapSet(device, copier)
    handle.swap_sets.append(swap_set)
    records = {name: ComponentRecord(name, module, placements[name]) for name, module in named.items()}
    handle.components = records

    # Tensors the pipeline reads from outside a component, or that two components share, stay resident
    # (counted with the first component that has them).
    claimed: set[int] = set()
    always: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    for name, module in named.items():
        for path in placements[name].resident_tensors:
            tensor = _resolve_attr(module, path, name)
            if isinstance(tensor, torch.Tensor) and id(tensor) not in claimed:
                claimed.add(id(tensor))
                always[name].append(tensor)
    first_owner: dict[int, str] = {}
    for name, module in named.items():
        for tensor in collect_tensors([module], set()):
            owner = first_owner.setdefault(id(tensor), name)
            if owner != name and id(tensor) not in claimed:
                claimed.add(id(tensor))
                always[owner].append(tensor)

    for name, module in named.items():
        record, placement = records[name], placements[name]
        before, first_group = handle.resident_bytes, len(handle.groups)
        move_resident(handle, always[name], device, source)
        for path in placement.host_only:
            submodule = _resolve_attr(module, path, name)
            record.host_only.append(
                _host_only(handle, f"{name}.{path}", submodule, claimed, placeholders, copier, source)
            )
            record.host_only_modules.append(submodule)
        if placement.strategy == "resident":
            move_resident(handle, collect_tensors([module], claimed), device, source)
        elif placement.strategy == "swapped":
            tensors = collect_tensors([module], claimed)
            _check_packable(tensors, name, source)
            group = pack_group(handle, name, tensors, placeholders, source)
            record.member = swap_set.add(SwapMember(name, group))
        else:
            blocks = resolve_blocks(module, placement.block_lists)
            keep = resident_indices(placement.resident_blocks, len(blocks))
            streamed = [block for i, block in enumerate(blocks) if i not in keep]
            on_disk = [i in placement.disk_blocks for i in range(len(blocks)) if i not in keep]
            record.resident_blocks = len(keep)
            record.streamed_blocks = tuple(streamed)
            rest, block_tensors = partition_tensors(module, streamed, claimed)
            packed = block_tensors if placement.rest_resident else [rest, *block_tensors]
            for tensors in packed:
                _check_packable(tensors, name, source)
            claimed.update(id(t) for tensors in (rest, *block_tensors) for t in tensors)
            group = None
            if placement.rest_resident:
                move_resident(handle, rest, device, source)
            else:
                group = pack_group(handle, f"{name}.rest", rest, placeholders, source)
            # Slots are allocated when the component is entered, and given back when it leaves.
            ring = None
            if streamed:
                ring = build_ring(
                    handle,
                    streamed,
                    block_tensors,
                    placement.prefetch,
                    placeholders,
                    copier,
                    source,
                    on_disk=on_disk,
                    read_ahead=placement.read_ahead,
                )
            record.ring = ring
            arriving = None
            if placement.hand_over and group is not None and keep:
                arriving = arriving_blocks(handle, group, [blocks[i] for i in sorted(keep)], copier)
            record.member = swap_set.add(
                SwapMember(
                    name,
                    group,
                    ring,
                    hand_over=placement.hand_over,
                    rest_ahead=placement.hand_over and placement.rest_ahead,
                    arriving=arriving,
                )
            )
        record.resident_bytes = handle.resident_bytes - before
        record.groups = handle.groups[first_group:]
        if record.member is not None:
            attach_entry(handle, module, swap_set, record.member, placement.entry_methods)
        handle.mark(module, name)
        for method in WEIGHT_EDITORS:
            if callable(getattr(module, method, None)):
                undo = wrap_weight_editor(module, method, handle.edit_weights)
                handle.on_remove(lambda _target, undo=undo: undo())
        for method in CONFLICTING_METHODS:
            if callable(getattr(module, method, None)):
                undo = refuse_call(module, method, name)
                handle.on_remove(lambda _target, undo=undo: undo())
    # A member alone in its swap set is never pushed out: its slots are allocated now, so that a device
    # too small fails here rather than in the middle of a step.
    if len(swap_set.members) == 1 and swap_set.members[0].ring is not None:
        swap_set.members[0].ring.allocate()
    # Undone first: every member back on placeholders before the groups restore their storage.
    handle.on_remove(lambda _target: swap_set.evict_all())
    handle.take_in_edits = lambda: take_in_edits(handle)


def take_in_edits(handle: OffloadHandle) -> list[str]:
    """After `handle.edit_weights()`: every group takes in its modules' tensors as they are now (tensors
    added inside a streamed block stream with it); returns the names of the groups that were re-packed.

    Tensors are assigned exactly as when offloading was applied; new ones outside any group (a resident
    component, or a streamed one's resident rest) go to the device for good.
    """
    excluded = {id(t) for t in handle.resident_tensors}
    repacked: list[str] = []

    def refresh(group: WeightGroup, tensors: list[torch.Tensor]) -> None:
        check_packable(tensors, group.name)
        if group.refresh(tensors):
            repacked.append(group.name)

    for record in handle.components.values():
        module, placement = record.module, record.placement
        for submodule, own_set in zip(record.host_only_modules, record.host_only, strict=True):
            refresh(own_set.members[0].group, collect_tensors([submodule], excluded))
        if placement.strategy == "resident":
            move_resident(handle, collect_tensors([module], excluded), handle.device)
        elif placement.strategy == "swapped":
            refresh(record.member.group, collect_tensors([module], excluded))
        else:
            rest, per_block = partition_tensors(module, record.streamed_blocks, excluded)
            excluded.update(id(t) for tensors in (rest, *per_block) for t in tensors)
            if record.member.group is None:
                move_resident(handle, rest, handle.device)
            else:
                refresh(record.member.group, rest)
            ring = record.ring
            if ring is not None:
                for group, tensors in zip(ring.groups, per_block, strict=True):
                    refresh(group, tensors)
                # Slots are sized at allocation, and the ring was freed for the edit.
                ring.slot_bytes = max(group.nbytes for group in ring.groups)
    for swap_set in handle.swap_sets[:1]:
        if len(swap_set.members) == 1 and swap_set.members[0].ring is not None:
            swap_set.members[0].ring.allocate()
    return repacked


def _host_only(
    handle: OffloadHandle,
    name: str,
    submodule: object,
    claimed: set[int],
    placeholders: PlaceholderCache,
    copier: Copier,
    source: WeightSource | None = None,
) -> SwapSet:
    """A submodule kept on the host and loaded (for good) the first time it is called."""
    if not isinstance(submodule, torch.nn.Module):
        raise ValueError(f"host_only entry {name!r} is not a module.")
    tensors = collect_tensors([submodule], claimed)
    _check_packable(tensors, name, source)
    own_set = SwapSet(handle.device, copier)
    handle.swap_sets.append(own_set)
    member = own_set.add(SwapMember(name, pack_group(handle, name, tensors, placeholders, source)))
    attach_entry(handle, submodule, own_set, member, ())
    handle.on_remove(lambda _target: own_set.evict_all())
    return own_set


def _check_packable(tensors: list[torch.Tensor], where: str, source: WeightSource | None) -> None:
    # Stand-ins that a checkpoint covers get their bytes from it.
    check_packable([t for t in tensors if source is None or not source.covers(t)], where)


def move_resident(
    handle: OffloadHandle,
    tensors: list[torch.Tensor],
    device: torch.device,
    source: WeightSource | None = None,
) -> None:
    """Moves `tensors` to `device` for as long as the handle lives (no host copy is kept); tensors that
    `source` covers are read from it straight to `device`."""
    already = {id(t) for t in handle.resident_tensors}
    tensors = [t for t in tensors if id(t) not in already]
    originals = [t.device for t in tensors]  # stand-ins read from a checkpoint are host tensors
    for tensor in tensors:
        if source is not None and source.covers(tensor):
            tensor.data = source.load(tensor, device)
        elif tensor.device != device:
            tensor.data = tensor.data.to(device)
        elif device.type == "cpu":
            # Its own storage: it may be a view into a memory-mapped checkpoint, which would stay mapped
            # (and resident) for as long as any of its tensors lives.
            tensor.data = tensor.data.clone()
    handle.resident_bytes += sum(t.numel() * t.element_size() for t in tensors)
    handle.resident_tensors.extend(tensors)

    def undo(target: torch.device | None) -> None:
        for tensor, original in zip(tensors, originals, strict=True):
            destination = target or original
            if tensor.device != destination:
                tensor.data = tensor.data.to(destination)

    handle.on_remove(undo)


def pack_group(
    handle: OffloadHandle,
    name: str,
    tensors: list[torch.Tensor],
    placeholders: PlaceholderCache,
    source: WeightSource | None = None,
    *,
    on_disk: bool = False,
) -> WeightGroup:
    """Packs `tensors` into a host slab (`on_disk`: records where `source`'s files hold them instead),
    leaves them offloaded, and registers the restore."""
    leaves = {id(leaf) for tensor in tensors for leaf in storage_leaves(tensor)}
    if leaves & handle.packed_leaves:
        # Two groups re-pointing one tensor would pull it from under each other.
        raise ValueError(
            f"{name}: a tensor that holds weight bytes (e.g. quantization state) is shared with another "
            "block or component; offloading needs each block to own its tensors. Quantize each layer "
            "separately, or keep the sharing module resident (resident_blocks=...)."
        )
    handle.packed_leaves |= leaves
    segment = handle.shared_segment
    if on_disk:
        # Its bytes stay in the checkpoint files (each process reads them; the OS shares the page cache).
        group: WeightGroup = DiskGroup(name, tensors, device_type=handle.device.type, source=source)
    else:
        group = WeightGroup(
            name,
            tensors,
            pin=handle.pin_memory,
            device_type=handle.device.type,
            source=source,
            allocate=segment.slab if segment is not None else private_slab,
        )
    handle.groups.append(group)
    handle.on_remove(lambda target: group.restore(target))
    group.make_placeholders(placeholders)
    group.offload()
    return group


def build_ring(
    handle: OffloadHandle,
    streamed: Sequence[torch.nn.Module],
    block_tensors: Sequence[list[torch.Tensor]],
    prefetch: int,
    placeholders: PlaceholderCache,
    copier: Copier,
    source: WeightSource | None = None,
    *,
    on_disk: Sequence[bool] = (),
    read_ahead: int = 2,
) -> PrefetchRing:
    """Packs each streamed block (those flagged `on_disk` stay in the checkpoint files, read ahead into
    `read_ahead` staging buffers), builds their ring and hooks every block to it; the ring's slots are
    freed on removal."""
    flags = list(on_disk) or [False] * len(streamed)
    groups = [
        pack_group(handle, f"{type(block).__name__}[{i}]", tensors, placeholders, source, on_disk=disk)
        for i, (block, tensors, disk) in enumerate(zip(streamed, block_tensors, flags, strict=True))
    ]
    reader = None
    if any(flags):
        disk_groups = {position: group for position, group in enumerate(groups) if group.on_disk}
        reader = DiskReader(disk_groups, read_ahead, pin=handle.pin_memory, device_type=handle.device.type)
        handle.readers.append(reader)
        handle.on_remove(lambda _target: reader.close())
    ring = PrefetchRing(groups, handle.device, prefetch, copier, reader)
    if handle.timing:
        ring.start_timing()
    handle.rings.append(ring)
    handle.on_remove(lambda _target: ring.free())
    for position, block in enumerate(streamed):
        hook = StreamedBlockHook(ring, position)
        attach_hook(handle, block, hook, STREAMED_BLOCK_HOOK, innermost=True)
        undo = load_around_compiled(block, hook)
        handle.on_remove(lambda _target, undo=undo: undo())
    return ring


def arriving_blocks(
    handle: OffloadHandle, group: WeightGroup, blocks: Sequence[torch.nn.Module], copier: Copier
) -> ArrivingBlocks | None:
    """The byte range of each of `blocks` (resident blocks packed with the non-block part in `group`)
    and a hook per block that waits for its range; None where a block's bytes are not one run of the
    slab of their own (then the whole slab is copied at entry, as for any member)."""
    index = {id(leaf): i for i, leaf in enumerate(group.leaves)}
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        leaves = [leaf for tensor in collect_tensors([block], set()) for leaf in storage_leaves(tensor)]
        positions = sorted(index[id(leaf)] for leaf in leaves if id(leaf) in index)
        if not positions or positions != list(range(positions[0], positions[-1] + 1)):
            return None
        start, last = group.offsets[positions[0]], positions[-1]
        ranges.append((start, group.offsets[last] + group.sizes[last]))
    if any(end > start for (_, end), (start, _) in zip(ranges, ranges[1:])):
        return None
    head, cursor = [], 0
    for start, end in ranges:
        if start > cursor:
            head.append((cursor, start))
        cursor = end
    if cursor < group.nbytes:
        head.append((cursor, group.nbytes))
    arriving = ArrivingBlocks(ranges, head, copier, group.layout)
    for position, block in enumerate(blocks):
        hook = StreamedBlockHook(arriving, position)  # type: ignore[arg-type]  # a ring's acquire/release
        attach_hook(handle, block, hook, ARRIVING_BLOCK_HOOK, innermost=True)
        undo = load_around_compiled(block, hook)
        handle.on_remove(lambda _target, undo=undo: undo())
    return arriving


def attach_hook(
    handle: OffloadHandle, module: torch.nn.Module, hook: ModelHook, name: str, *, innermost: bool = False
) -> None:
    remove = register_hook(module, hook, name, innermost=innermost)
    handle.on_remove(lambda _target: remove())


def attach_entry(
    handle: OffloadHandle,
    module: torch.nn.Module,
    swap_set: SwapSet,
    member: SwapMember,
    methods: Sequence[str],
) -> None:
    """Hooks `forward` and each of `methods` so that calling them makes `member` the active one."""
    undo_entry = enter_on_forward(module, swap_set, member)
    handle.on_remove(lambda _target: undo_entry())
    for method in methods:
        undo = wrap_entry_method(module, method, lambda: swap_set.enter(member))
        handle.on_remove(lambda _target, undo=undo: undo())
