"""Test helpers that look at where each tensor's storage actually lives, and a copier that models streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that `tensor` spans (a copy into part of a buffer writes only those)."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    extent = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (extent * size if tensor.numel() else 0)


def _overlaps(tensor: torch.Tensor, ranges: dict[int, tuple[int, int]] | None) -> bool:
    if not ranges:
        return False
    start, end = _byte_range(tensor)
    return any(start < hi and lo < end for lo, hi in ranges.values())


class DeferredCopier(TorchDispatchMode):
    """A copier that models an asynchronous copy engine beside a compute stream, on the CPU.

    Use it as a context manager around the forward passes (`with copier: model(...)`): every aten op
    run inside is one op of a virtual compute stream that reads the ring slots its tensor arguments live
    in. Events record a position on that stream. Two rules of a real copy stream are checked, and each
    breach is appended to `violations`:
    - a copy into a slot must wait for an event recorded after every op that read the slot (else the
      copy could overwrite weights still being read);
    - an op may read a slot only after the compute stream waited for the last copy into it.
    Copies are also carried out only when compute waits for them, so a missing wait computes on stale
    slot contents and changes the output.
    """

    uses_events = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0
        self.recorded_at: dict[int, int] = {}  # id(event) -> position of its latest record
        self.pending: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # id(done) -> slot, dst, src
        # slot -> {id(done): byte range written} of its copies that compute has not waited for yet
        self.unwaited: dict[int, dict[int, tuple[int, int]]] = {}
        self.last_read: dict[int, int] = {}  # slot -> position of the last op that read it
        self.violations: list[str] = []
        self.copies = 0
        self.deferred_runs = 0
        self.reads = 0
        self._active = False
        self._running_copy = False

    def __enter__(self):
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._running_copy and not func.is_view:  # views only relabel bytes, they read nothing
            self.clock += 1
            for arg in tree_flatten((args, kwargs))[0]:
                if isinstance(arg, torch.Tensor) and arg.device.type != "meta":
                    slot = arg.untyped_storage().data_ptr()
                    if slot in self.last_read:
                        self.reads += 1
                        if _overlaps(arg, self.unwaited.get(slot)):
                            self.violations.append(f"{func} read slot {slot:#x} before waiting for its copy")
                        self.last_read[slot] = self.clock
        return func(*args, **kwargs)

    def new_event(self) -> object:
        return object()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None) -> None:
        if not self._active:
            raise AssertionError("run the forward passes inside `with copier:` so that reads are seen")
        slot = dst.untyped_storage().data_ptr()
        last_read = self.last_read.setdefault(slot, 0)
        if last_read and (after is None or self.recorded_at.get(id(after), -1) < last_read):
            self.violations.append(f"copy into slot {slot:#x} not ordered after the last op that read it")
        self.copies += 1
        self.pending[id(done)] = (slot, dst, src)
        written = _byte_range(dst)
        ranges = self.unwaited.setdefault(slot, {})
        for key, (lo, hi) in list(ranges.items()):  # superseded: the bytes it wrote are written again
            if lo < written[1] and written[0] < hi:
                del ranges[key]
        ranges[id(done)] = written

    def copy_timed(
        self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None
    ) -> tuple[int, int]:
        start = self.stamp()
        self.copy(dst, src, done, after)
        return start, self.stamp()

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        work = self.pending.pop(id(event), None)
        if work is None:
            return
        slot, dst, src = work
        self._running_copy = True
        try:
            dst.copy_(src)
        finally:
            self._running_copy = False
        self.deferred_runs += 1
        ranges = self.unwaited.get(slot, {})
        ranges.pop(id(event), None)
        if not ranges:
            self.unwaited.pop(slot, None)

    def record(self, event: Any) -> None:
        self.clock += 1
        self.recorded_at[id(event)] = self.clock

    def stamp(self) -> int:
        """Positions on the virtual compute stream stand in for times."""
        return self.clock

    def elapsed_ms(self, start: int, end: int) -> float:
        return float(end - start)
