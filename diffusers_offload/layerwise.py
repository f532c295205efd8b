"""`apply_layerwise_offload`: a module's blocks stream through a prefetch ring; the rest stays resident."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from diffusers.hooks import ModelHook

from .devices import resolve_device, resolve_pin_memory
from .handle import OffloadHandle, ensure_not_offloaded
from .hooks import STREAMED_BLOCK_HOOK, StreamedBlockHook, register_hook
from .packing import PlaceholderCache, WeightGroup, check_packable, collect_tensors
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


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices out of `range(total)`, evenly spaced, so transfers between them stay evenly spaced."""
    if count <= 0:
        return []
    if count >= total:
        return list(range(total))
    return [int((i + 0.5) * total / count) for i in range(count)]


def _resident_indices(resident_blocks: int | Sequence[int], total: int) -> set[int]:
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
        stack.extend(module._modules.values() if module._modules else ())


def _move_resident(handle: OffloadHandle, tensors: list[torch.Tensor], device: torch.device) -> None:
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
    if isinstance(block_lists, str):
        block_lists = (block_lists,)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0 (blocks copied ahead), got {prefetch!r}.")
    ensure_not_offloaded([module])
    blocks = [block for path in block_lists for block in resolve_block_list(module, path)]
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError(
            f"block_lists {list(block_lists)} name the same block twice; list each ModuleList once."
        )
    resident = _resident_indices(resident_blocks, len(blocks))
    device = resolve_device(device)
    pin = resolve_pin_memory(pin_memory, device)
    streamed = [block for i, block in enumerate(blocks) if i not in resident]

    # A tensor used outside the streamed blocks, or by two of them, must stay resident.
    block_tensors = [collect_tensors([block], set()) for block in streamed]
    for tensors in block_tensors:
        check_packable(tensors, type(module).__name__)
    resident_tensors = collect_tensors(
        _modules_outside(module, {id(b) for b in streamed}), set(), recurse=False
    )
    resident_ids = {id(t) for t in resident_tensors}
    seen: set[int] = set()
    for tensors in block_tensors:
        for tensor in tensors:
            if id(tensor) in seen and id(tensor) not in resident_ids:
                resident_ids.add(id(tensor))
                resident_tensors.append(tensor)
            seen.add(id(tensor))

    handle = OffloadHandle("layerwise", device, pin)
    try:
        _move_resident(handle, resident_tensors, device)
        if streamed:
            _stream_blocks(handle, streamed, block_tensors, resident_ids, device, prefetch, copier)
        handle.mark(module)
    except BaseException:
        handle.remove()
        raise
    return handle


def _stream_blocks(
    handle: OffloadHandle,
    streamed: list[torch.nn.Module],
    block_tensors: list[list[torch.Tensor]],
    resident_ids: set[int],
    device: torch.device,
    prefetch: int,
    copier: Copier | None,
) -> None:
    placeholders = PlaceholderCache(device)
    groups: list[WeightGroup] = []

    def restore(target: torch.device | None) -> None:
        for group in groups:
            group.restore(target)

    handle.on_remove(restore)
    for index, (block, tensors) in enumerate(zip(streamed, block_tensors, strict=True)):
        group = WeightGroup(
            f"{type(block).__name__}[{index}]",
            [t for t in tensors if id(t) not in resident_ids],
            pin=handle.pin_memory,
            device_type=device.type,
        )
        group.make_placeholders(placeholders)
        group.offload()
        groups.append(group)
        handle.groups.append(group)
    ring = PrefetchRing(groups, device, prefetch, copier or make_copier(device))
    handle.rings.append(ring)
    handle.on_remove(lambda _target: ring.evict_all())
    for position, block in enumerate(streamed):
        _hook(handle, block, StreamedBlockHook(ring, position), STREAMED_BLOCK_HOOK)


def _hook(handle: OffloadHandle, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    remove = register_hook(module, hook, name)
    handle.on_remove(lambda _target: remove())
