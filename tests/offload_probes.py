"""Test helpers that look at where each tensor's storage actually lives, and a deferring copier."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from diffusers_offload.engine.packing import is_placeholder


def materialised(module: torch.nn.Module) -> bool:
    """True when every parameter/buffer of `module` holds real data (none is an empty placeholder)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and not any(is_placeholder(t) for t in tensors)


def only_placeholders(module: torch.nn.Module) -> bool:
    return all(is_placeholder(t) for t in [*module.parameters(), *module.buffers()])


def storage_within(tensor: torch.Tensor, buffers: list[torch.Tensor]) -> int | None:
    """Index of the buffer whose bytes contain `tensor`'s data, else None."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for index, buffer in enumerate(buffers):
        lo = buffer.data_ptr()
        if lo <= start and end <= lo + buffer.numel() * buffer.element_size():
            return index
    return None


@contextmanager
def on_every_leaf_forward(root: torch.nn.Module, check) -> Iterator[list[str]]:
    """Calls `check(name, leaf)` before every leaf module forward under `root`; yields the call log."""
    calls: list[str] = []
    handles = []
    for name, module in root.named_modules():
        if next(module.children(), None) is None:

            def pre_hook(mod: torch.nn.Module, args: Any, name: str = name) -> None:
                calls.append(name)
                check(name, mod)

            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class DeferredCopier:
    """A copier that models an asynchronous copy engine on the CPU.

    A copy is only carried out when compute waits on its `done` event, so a block computed without
    waiting for its copy sees stale slot contents and the output differs. A copy into a slot must name
    an `after` event recorded after the last use of that slot began, else `violations` records it:
    that is the ordering a real copy stream needs so as not to overwrite a slot still in use.
    """

    uses_events = True

    def __init__(self) -> None:
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clock = 0
        self.recorded_at: dict[int, int] = {}
        self.slot_last_use: dict[int, int] = {}
        self.slot_of_event: dict[int, int] = {}
        self.violations: list[str] = []
        self.copies = 0
        self.deferred_runs = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def new_event(self) -> object:
        return object()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None) -> None:
        slot = dst.untyped_storage().data_ptr()
        last_use = self.slot_last_use.get(slot)
        if last_use is not None:
            if after is None:
                self.violations.append(f"copy into used slot {slot:#x} without waiting for compute")
            elif self.recorded_at.get(id(after), -1) < last_use:
                self.violations.append(f"copy into slot {slot:#x} ordered before the end of its last use")
        self.copies += 1
        self.pending[id(done)] = (dst, src)
        self.slot_of_event[id(done)] = slot

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        work = self.pending.pop(id(event), None)
        if work is not None:
            dst, src = work
            dst.copy_(src)
            self.deferred_runs += 1
        slot = self.slot_of_event.get(id(event))
        if slot is not None:
            self.slot_last_use[slot] = self._tick()

    def record(self, event: Any) -> None:
        self.recorded_at[id(event)] = self._tick()
