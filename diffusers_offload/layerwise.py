"""`apply_layerwise_offload`: a module's blocks stream through a prefetch ring; the rest stays resident."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from diffusers.hooks import ModelHook

from .devices import resolve_device, resolve_pin_memory
from .handle import OffloadHandle, ensure_not_offloaded
from .hooks import STREAMED_BLOCK_HOOK, StreamedBlockHook, register_hook
from .packing import PlaceholderCache, WeightGroup, check_packable, collect_tensors
from .planning import spread_indices
from .ring import PrefetchRing
from .transfer import Copier, make_copier


def resolve_block_list(module: torch.nn.Module, path: str) -> torch.nn.ModuleList:
    """The `nn.ModuleList` at dotted `path` inside `module`, with an error that lists what exists."""
    target: object = module
    for part in path.split("."):
        target = getattr(target, part, None)
    if isinstance(target, (torch.nn.ModuleList, torch.nn.Sequential)) and len(target) > 0:
        return target  # type: ignore[return-value]
    lists = [
        name for name, sub in module.named_modules() if isinstance(sub, torch.nn.ModuleList) and len(sub)
    ]
    raise ValueError(
        f"{type(module).__name__} has no non-empty ModuleList at {path!r}. "
        f"Block lists it has: {lists or 'none'}. Pass block_lists=[...] with some of these "
        "(in execution order), or declare an adapter in model_registry."
    )


def resolve_blocks(module: torch.nn.Module, block_lists: Sequence[str]) -> list[torch.nn.Module]:
    """All blocks of `block_lists` in execution order; each block once."""
    if isinstance(block_lists, str):
        block_lists = (block_lists,)
    blocks = [block for path in block_lists for block in resolve_block_list(module, path)]
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError(
            f"block_lists {list(block_lists)} name the same block twice; list each ModuleList once."
        )
    return blocks


def check_prefetch(prefetch: int) -> None:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0 (blocks copied ahead), got {prefetch!r}.")


def resident_indices(resident_blocks: int | Sequence[int], total: int) -> set[int]:
    """Block indices to keep on the device: a count (spread evenly) or explicit indices."""
    if isinstance(resident_blocks, int):
        if not 0 <= resident_blocks <= total:
            raise ValueError(
                f"resident_blocks must be in [0, {total}] (the number of blocks), got {resident_blocks}."
            )
        return set(spread_indices(total, resident_blocks))
    chosen = set(resident_blocks)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < total)]
    if bad:
        raise ValueError(f"resident_blocks indices {bad} are out of range for {total} blocks.")
    return chosen


def _modules_outside(root: torch.nn.Module, excluded: set[int]) -> Iterable[torch.nn.Module]:
    """Every module of `root` not inside a module whose id is in `excluded`."""
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in excluded:
            continue
        yield module
        stack.extend(module._modules.values())


def partition_tensors(
    module: torch.nn.Module, streamed: Sequence[torch.nn.Module], exclude: set[int]
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Splits `module`'s tensors (minus ids in `exclude`) into the rest and one list per streamed block.

    A tensor used outside the streamed blocks, or by two of them, belongs to the rest: a streamed block
    may only own what nothing else reads.
    """
    rest = collect_tensors(_modules_outside(module, {id(b) for b in streamed}), set(exclude), recurse=False)
    rest_ids = {id(t) for t in rest} | exclude
    per_block = [collect_tensors([block], set()) for block in streamed]
    seen: set[int] = set()
    for tensors in per_block:
        for tensor in tensors:
            if id(tensor) in seen and id(tensor) not in rest_ids:
                rest_ids.add(id(tensor))
                rest.append(tensor)
            seen.add(id(tensor))
    return rest, [[t for t in tensors if id(t) not in rest_ids] for tensors in per_block]


def move_resident(handle: OffloadHandle, tensors: list[torch.Tensor], device: torch.device) -> None:
    """Moves `tensors` to `device` for as long as the handle lives (no host copy is kept)."""
    originals = [t.device for t in tensors]
    for tensor in tensors:
        if tensor.device != device:
            tensor.data = tensor.data.to(device)
    handle.resident_bytes += sum(t.numel() * t.element_size() for t in tensors)

    def undo(target: torch.device | None) -> None:
        for tensor, original in zip(tensors, originals, strict=True):
            destination = target or original
            if tensor.device != destination:
                tensor.data = tensor.data.to(destination)

    handle.on_remove(undo)


def pack_group(
    handle: OffloadHandle, name: str, tensors: list[torch.Tensor], placeholders: PlaceholderCache
) -> WeightGroup:
    """Packs `tensors` into a host slab, leaves them offloaded, and registers the restore."""
    group = WeightGroup(name, tensors, pin=handle.pin_memory, device_type=handle.device.type)
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
    *,
    allocate: bool = True,
) -> PrefetchRing:
    """Packs each streamed block, builds their ring and hooks every block to it; `allocate=False`
    leaves the slots to be allocated when the ring is first used."""
    groups = [
        pack_group(handle, f"{type(block).__name__}[{i}]", tensors, placeholders)
        for i, (block, tensors) in enumerate(zip(streamed, block_tensors, strict=True))
    ]
    ring = PrefetchRing(groups, handle.device, prefetch, copier, allocate=allocate)
    handle.rings.append(ring)
    handle.on_remove(lambda _target: ring.free())
    for position, block in enumerate(streamed):
        attach_hook(handle, block, StreamedBlockHook(ring, position), STREAMED_BLOCK_HOOK)
    return ring


def attach_hook(handle: OffloadHandle, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    remove = register_hook(module, hook, name)
    handle.on_remove(lambda _target: remove())


def apply_layerwise_offload(
    module: torch.nn.Module,
    block_lists: Sequence[str] = ("transformer_blocks",),
    device: str | torch.device | None = None,
    prefetch: int = 1,
    resident_blocks: int | Sequence[int] = 0,
    pin_memory: bool | None = None,
    *,
    copier: Copier | None = None,
) -> OffloadHandle:
    """Streams the blocks of `module` from host memory to `device` one by one while it runs.

    Args:
        module: the model (e.g. a diffusers transformer).
        block_lists: dotted paths of the `nn.ModuleList`s whose blocks stream, in execution order.
        device: execution device; `None` is the current accelerator (else the CPU, with a warning).
        prefetch: how many blocks ahead to copy while a block computes (0 = load on demand).
        resident_blocks: how many blocks (spread evenly) or which block indices stay on the device.
        pin_memory: page-lock the host copy; `None` pins when `device` is an accelerator.
        copier: advanced: how copies are issued (tests use it to prove ordering).

    Everything outside the block lists is moved to `device` and stays there. Call `handle.remove()`
    to undo.
    """
    check_prefetch(prefetch)
    ensure_not_offloaded([module])
    blocks = resolve_blocks(module, block_lists)
    resident = resident_indices(resident_blocks, len(blocks))
    device = resolve_device(device)
    pin = resolve_pin_memory(pin_memory, device)
    streamed = [block for i, block in enumerate(blocks) if i not in resident]
    rest, block_tensors = partition_tensors(module, streamed, set())
    for tensors in block_tensors:
        check_packable(tensors, type(module).__name__)

    handle = OffloadHandle("layerwise", device, pin)
    try:
        move_resident(handle, rest, device)
        if streamed:
            placeholders = PlaceholderCache(device)
            build_ring(handle, streamed, block_tensors, prefetch, placeholders, copier or make_copier(device))
        handle.mark(module)
    except BaseException:
        handle.remove()
        raise
    return handle
