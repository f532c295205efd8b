"""`apply_model_offload`: whole components take turns on the execution device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .devices import resolve_device, resolve_pin_memory
from .handle import OffloadHandle, ensure_not_offloaded
from .hooks import SWAP_ENTRY_HOOK, SwapEntryHook, register_hook, wrap_entry_method
from .packing import PlaceholderCache, WeightGroup, check_packable, collect_tensors
from .swap import SwapMember, SwapSet
from .transfer import Copier, make_copier


def apply_model_offload(
    components: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
    *,
    entry_methods: Mapping[str, Sequence[str]] | None = None,
    copier: Copier | None = None,
) -> OffloadHandle:
    """Keeps `components` in host memory and loads each one onto `device` just before it runs,
    evicting the others first (a model-level swap).

    Args:
        components: the models that take turns, as a list or a name -> module mapping.
        device: execution device; `None` is the current accelerator (else the CPU, with a warning).
        pin_memory: page-lock the host copies; `None` pins when `device` is an accelerator.
        entry_methods: name -> methods other than `forward` that enter that component, e.g.
            `{"vae": ("encode", "decode")}` (keys are indices as strings when a list is given).
        copier: advanced: how copies are issued.
    """
    named = (
        dict(components) if isinstance(components, Mapping) else {str(i): m for i, m in enumerate(components)}
    )
    if not named:
        raise ValueError("apply_model_offload needs at least one component.")
    if len({id(m) for m in named.values()}) != len(named):
        raise ValueError("apply_model_offload got the same module twice; list each component once.")
    entry_methods = dict(entry_methods or {})
    unknown = sorted(set(entry_methods) - set(named))
    if unknown:
        raise ValueError(f"entry_methods names unknown components {unknown}; components are {sorted(named)}.")
    for name, methods in entry_methods.items():
        for method in methods:
            if not callable(getattr(named[name], method, None)):
                raise ValueError(
                    f"Component {name!r} ({type(named[name]).__name__}) has no method {method!r}."
                )
    ensure_not_offloaded(named.values())
    device = resolve_device(device)
    pin = resolve_pin_memory(pin_memory, device)
    claimed: set[int] = set()
    tensors = {name: collect_tensors([module], claimed) for name, module in named.items()}
    for name, found in tensors.items():
        check_packable(found, name)

    handle = OffloadHandle("model", device, pin)
    try:
        swap_set = SwapSet(device, copier or make_copier(device))
        handle.swap_sets.append(swap_set)
        placeholders = PlaceholderCache(device)
        for name, module in named.items():
            group = WeightGroup(name, tensors[name], pin=pin, device_type=device.type)
            handle.groups.append(group)
            handle.on_remove(lambda target, group=group: group.restore(target))
            group.make_placeholders(placeholders)
            group.offload()
            member = swap_set.add(SwapMember(name, group))
            attach_swap_entry(handle, module, swap_set, member, entry_methods.get(name, ()))
            handle.mark(module)
        # Undone first: every member back on placeholders before the groups restore their storage.
        handle.on_remove(lambda _target: swap_set.evict_all())
    except BaseException:
        handle.remove()
        raise
    return handle


def attach_swap_entry(
    handle: OffloadHandle,
    module: torch.nn.Module,
    swap_set: SwapSet,
    member: SwapMember,
    methods: Sequence[str],
) -> None:
    """Hooks `forward` and each of `methods` so that calling them makes `member` the active one."""
    remove = register_hook(module, SwapEntryHook(swap_set, member), SWAP_ENTRY_HOOK)
    handle.on_remove(lambda _target: remove())
    for method in methods:
        undo = wrap_entry_method(module, method, lambda: swap_set.enter(member))
        handle.on_remove(lambda _target, undo=undo: undo())
