"""Splitting a module's weights into groups, and packing each group into one contiguous host slab.

A `WeightGroup` owns the host copy of a set of tensors (parameters and buffers, each once even when
shared). Where the tensors live is only ever changed by re-pointing `tensor.data`: at a view into the
host slab, into a device buffer, or at an empty placeholder. `Parameter` objects keep their identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .host_memory import HostSlab

# Offsets are aligned so that every view starts on a boundary that vectorised kernels like.
ALIGNMENT = 64


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def collect_tensors(
    modules: Iterable[torch.nn.Module], claimed: set[int], *, recurse: bool = True
) -> list[torch.Tensor]:
    """Parameters and buffers of `modules` (and their submodules if `recurse`) not in `claimed` (ids),
    each once; adds them to `claimed`."""
    tensors: list[torch.Tensor] = []
    for module in modules:
        for sub in module.modules() if recurse else (module,):
            for tensor in (*sub._parameters.values(), *sub._buffers.values()):
                if tensor is None or id(tensor) in claimed:
                    continue
                claimed.add(id(tensor))
                tensors.append(tensor)
    return tensors


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


def check_packable(tensors: Sequence[torch.Tensor], where: str) -> None:
    for tensor in tensors:
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)
        if not plain or tensor.is_sparse or tensor.device.type == "meta":
            raise ValueError(
                f"{where}: cannot offload a tensor of type {type(tensor).__name__} on {tensor.device} "
                f"(dtype {tensor.dtype}). Load real weights (not on 'meta') as ordinary dense tensors."
            )


class PlaceholderCache:
    """One empty tensor per dtype on the execution device; offloaded tensors point at these."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        placeholder = self._by_dtype.get(dtype)
        if placeholder is None:
            placeholder = self._by_dtype[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return placeholder


def is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 0 and tensor.untyped_storage().nbytes() == 0


class WeightGroup:
    """The tensors of one block or component, packed into one exact-size host slab."""

    def __init__(self, name: str, tensors: list[torch.Tensor], *, pin: bool, device_type: str) -> None:
        self.name = name
        self.pin = pin
        self.device_type = device_type
        self.placeholders: list[torch.Tensor] = []
        self._pack(tensors, [t.device for t in tensors])

    def _pack(self, tensors: list[torch.Tensor], original_devices: list[torch.device]) -> None:
        self.tensors = tensors
        self.dtypes = [t.dtype for t in tensors]
        self.shapes = [t.shape for t in tensors]
        self.sizes = [t.numel() * t.element_size() for t in tensors]
        self.original_devices = original_devices
        self.offsets: list[int] = []
        offset = 0
        for size in self.sizes:
            self.offsets.append(offset)
            offset += _aligned(size)
        # The last tensor needs no trailing padding: the slab is exactly what the data spans.
        self.nbytes = self.offsets[-1] + self.sizes[-1] if tensors else 0
        self.data_bytes = sum(self.sizes)
        # Groups with equal layouts (identical blocks) can share views into the same buffer.
        self.layout = (tuple(self.offsets), tuple(self.dtypes), tuple(self.shapes))
        self.slab = HostSlab(self.nbytes, pin=self.pin, device_type=self.device_type)
        # Each tensor is copied in, then re-pointed at its host view at once, so the original storage
        # can be freed as we go: host memory never holds two copies of the group.
        for tensor, view in zip(self.tensors, self.views_into(self.slab.data), strict=True):
            view.copy_(tensor.detach())
            tensor.data = view

    def point_to_host(self) -> None:
        """Re-points every tensor at its view of the host slab (the copy that edits must change)."""
        self.point_to(self.views_into(self.slab.data))

    def refresh(self, tensors: list[torch.Tensor]) -> bool:
        """Takes in what an edit did while the tensors pointed at the host slab; returns True if repacked.

        `tensors` is what the group's modules hold now. A tensor whose storage was replaced (e.g.
        `weight.data = merged`) is copied back into its view; a tensor added or dropped, or a new shape
        or dtype, re-packs this group (only) into a new slab.
        """
        same = [id(t) for t in tensors] == [id(t) for t in self.tensors] and all(
            t.dtype == dtype and t.shape == shape
            for t, dtype, shape in zip(tensors, self.dtypes, self.shapes, strict=True)
        )
        if same:
            for tensor, view in zip(tensors, self.views_into(self.slab.data), strict=True):
                if tensor.numel() and tensor.data_ptr() != view.data_ptr():
                    view.copy_(tensor.detach())
                    tensor.data = view
            return False
        known = {id(t): device for t, device in zip(self.tensors, self.original_devices, strict=True)}
        # A new tensor (a LoRA layer added while offloaded) goes back, on removal, where the group's
        # other weights go.
        fallback = self.original_devices[0] if self.original_devices else None
        devices = [known.get(id(t), fallback or t.device) for t in tensors]
        old = self.slab
        self._pack(tensors, devices)
        old.release()
        return True

    def views_into(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of every tensor inside a uint8 `buffer` laid out like the host slab."""
        return [
            buffer[offset : offset + size].view(dtype).view(shape)
            for offset, size, dtype, shape in zip(
                self.offsets, self.sizes, self.dtypes, self.shapes, strict=True
            )
        ]

    def make_placeholders(self, placeholders: PlaceholderCache) -> None:
        self.placeholders = [placeholders(dtype) for dtype in self.dtypes]

    def point_to(self, views: Sequence[torch.Tensor]) -> None:
        for tensor, view in zip(self.tensors, views):
            tensor.data = view

    def offload(self) -> None:
        """Re-point every tensor at its empty placeholder; never copies device-to-host."""
        for tensor, placeholder in zip(self.tensors, self.placeholders):
            tensor.data = placeholder

    def restore(self, device: torch.device | None = None) -> None:
        """Gives every tensor its own storage again (on `device`, else where it was); frees the slab."""
        for tensor, view, original in zip(
            self.tensors, self.views_into(self.slab.data), self.original_devices, strict=True
        ):
            tensor.data = view.to(device or original, copy=True)
        self.slab.release()
