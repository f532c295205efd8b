"""`OffloadHandle`: what an `apply_*_offload` call did, and how to undo it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .devices import is_accelerator
from .hooks import refuse_moves
from .packing import PlaceholderCache, WeightGroup
from .ring import PrefetchRing
from .swap import SwapSet

MARKER = "_diffusers_offload_handle"

logger = logging.getLogger(__name__)

Undo = Callable[[torch.device | None], None]


def ensure_not_offloaded(modules: Iterable[torch.nn.Module]) -> None:
    """Refuses modules already managed by us, by diffusers' group offloading or by accelerate hooks."""
    for root in modules:
        for module in root.modules():
            if getattr(module, MARKER, None) is not None:
                raise RuntimeError(
                    f"{type(module).__name__} already has offloading applied. "
                    "Call handle.remove() (or pipe.disable_offload()) before enabling it again."
                )
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and any(name.endswith("offloading") for name in registry.hooks):
                raise RuntimeError(
                    f"{type(module).__name__} has diffusers group offloading applied; remove it "
                    "(e.g. reload the model) before using diffusers-offload."
                )
            if hasattr(module, "_hf_hook"):
                raise RuntimeError(
                    f"{type(module).__name__} has accelerate hooks (enable_model_cpu_offload, "
                    "enable_sequential_cpu_offload or a device_map); remove them with "
                    "pipe.remove_all_hooks() before using diffusers-offload."
                )


class OffloadHandle:
    """Returned by `apply_layerwise_offload` / `apply_model_offload`; `remove()` undoes everything."""

    def __init__(self, kind: str, device: torch.device, pin_memory: bool) -> None:
        self.kind = kind
        self.device = device
        self.pin_memory = pin_memory
        self.groups: list[WeightGroup] = []
        self.rings: list[PrefetchRing] = []
        self.readers: list[Any] = []  # disk.DiskReader of rings with blocks on the disk tier
        self.swap_sets: list[SwapSet] = []
        self.resident_bytes = 0
        self.components: dict[str, Any] = {}  # name -> placement.ComponentRecord
        self.plan: Any = None  # the planning.Plan that chose the placement, if any
        self.host_plan: Any = None  # the planning.tiers.HostPlan of a ram_budget, if any
        self.timing = False  # whether its rings stamp a timeline of each block's copy and compute
        self.placeholders = PlaceholderCache(device)
        self.resident_tensors: list[torch.Tensor] = []  # on the device for good: no host copy
        self.shared_segment: Any = None  # shared_memory.SharedSegment of the slabs, when shared
        self.packed_leaves: set[int] = set()  # ids of the plain tensors packed into some slab
        # Set by placement: after an edit, takes in what changed; returns the names of re-packed groups.
        self.take_in_edits: Callable[[], list[str]] = list
        self.repacked: list[str] = []  # groups re-packed after weight edits, in order
        self._edit_depth = 0
        self._undo: list[Undo] = []
        self.removed = False

    def on_remove(self, undo: Undo) -> None:
        """Registers the undo of a step just done; steps are undone in reverse order."""
        self._undo.append(undo)

    def mark(self, module: torch.nn.Module, name: str | None = None) -> None:
        """Marks `module` as managed by this handle, and refuses moves/casts of it until removal."""
        setattr(module, MARKER, self)
        self.on_remove(lambda _device: delattr(module, MARKER))
        name = name or type(module).__name__
        # Every submodule too: `block.to(torch.float64)` would be silently undone at the next load.
        for path, sub in module.named_modules():
            undo = refuse_moves(sub, f"{name}.{path}" if path else name, lambda: self._edit_depth > 0)
            self.on_remove(lambda _device, undo=undo: undo())

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held for the weights (exact-size slabs, and the disk tier's staging)."""
        return sum(group.slab.nbytes for group in self.groups) + sum(r.staging_bytes for r in self.readers)

    @property
    def disk_bytes(self) -> int:
        """Bytes of weights left in the checkpoint files (the disk tier), read at every use."""
        return sum(group.disk_bytes for group in self.groups if group.on_disk)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of weights the handle offloaded (without alignment padding)."""
        return sum(group.data_bytes for group in self.groups)

    @contextlib.contextmanager
    def edit_weights(self) -> Iterator[None]:
        """Inside this, the offloaded weights are their host copies: change them freely (fuse a LoRA,
        load a state dict, add layers); on exit the changes are taken in and the next load streams them.

        Re-entrant; LoRA, adapter and `load_state_dict` methods of the components use it themselves.
        Groups whose tensors were added, dropped or reshaped are re-packed (see `repacked`).
        """
        if self.removed:
            raise RuntimeError("This offload handle was removed; edit the weights directly.")
        self._edit_depth += 1
        try:
            if self._edit_depth == 1:
                for swap_set in self.swap_sets:
                    swap_set.evict_all()
                for group in self.groups:
                    group.point_to_host()
            yield
        finally:
            self._edit_depth -= 1
            if self._edit_depth == 0:
                self._end_edit()

    def _end_edit(self) -> None:
        try:
            repacked = self.take_in_edits()
        finally:
            # Whatever happened, nothing may stay pointed at the host copy outside an edit.
            for group in self.groups:
                group.make_placeholders(self.placeholders)
                group.offload()
        if repacked:
            self.repacked.extend(repacked)
            logger.info("diffusers-offload re-packed after a weight edit: %s", ", ".join(repacked))

    def remove(self, device: str | torch.device | None = None) -> None:
        """Removes every hook and gives each tensor ordinary storage again, bitwise as before.

        `device=None` puts each tensor back where it was when offloading was applied.
        """
        if self.removed:
            raise RuntimeError("This offload handle was already removed; there is nothing left to undo.")
        target = torch.device(device) if device is not None else None
        if is_accelerator(self.device):
            # Copies may still be in flight from the host slabs that the undo steps are about to free.
            torch.accelerator.synchronize(self.device)
        # A step is dropped only once it succeeded, so a removal that failed (e.g. out of memory while
        # restoring to the device) can be retried.
        while self._undo:
            self._undo[-1](target)
            self._undo.pop()
        self.removed = True

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"host {self.host_bytes / 2**20:.1f} MiB"
        return f"OffloadHandle(kind={self.kind!r}, device={self.device}, {state})"
