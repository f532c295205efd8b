"""Splitting a module's weights into groups, and packing each group into one contiguous host slab.

A `WeightGroup` owns the host copy of a set of tensors (parameters and buffers, each once even when
shared). Where the tensors live is only ever changed by re-pointing `tensor.data`: at a view into the
host slab, into a device buffer, or at an empty placeholder. `Parameter` objects keep their identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

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


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)
_PLAIN_ATTRIBUTE_TYPES = (int, float, str, bool, type(None), torch.dtype, torch.Size, tuple)


def storage_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s bytes, each re-pointed on its own (`leaf.data = view`).

    A plain tensor is its own leaf. A tensor subclass that flattens (`__tensor_flatten__`: torchao,
    optimum-quanto) has its inner tensors, recursively: it reads them on every op. A Parameter subclass
    that carries its quantization state in attributes (bitsandbytes' `Params4bit.quant_state`) has its
    data plus the tensors of that state.
    """
    kind = type(tensor)
    if kind in PLAIN_TYPES:
        return [tensor]
    if hasattr(kind, "__tensor_flatten__"):
        names, _context = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in storage_leaves(getattr(tensor, name))]
    leaves = [tensor]
    for attached in _attached_tensors(tensor):
        if all(attached is not leaf for leaf in leaves):
            leaves.append(attached)
    return leaves


def _attached_tensors(owner: object, depth: int = 0) -> list[torch.Tensor]:
    """Tensors held in `owner`'s attributes, and in plain state objects it holds (two levels down)."""
    found: list[torch.Tensor] = []
    for value in vars(owner).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif depth < 2 and _is_state_object(value):
            found.extend(_attached_tensors(value, depth + 1))
    return found


def _is_state_object(value: object) -> bool:
    # A back-reference to a module (Params4bit.module) is not state of the tensor.
    return (
        hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)) and not callable(value)
    )


def _unsupported(tensor: torch.Tensor) -> str | None:
    """Why `tensor` cannot be packed as bytes, or None."""
    kind = type(tensor)
    if kind.__module__.split(".")[0] == "bitsandbytes":
        if kind.__name__ != "Params4bit":
            return (
                f"bitsandbytes {kind.__name__} moves its quantization state into its module at the first "
                "forward, out of reach of offloading (4-bit Params4bit streams)"
            )
        if not getattr(tensor, "bnb_quantized", False):
            return "this bitsandbytes Params4bit is not quantized yet (move it to a device first)"
    elif kind not in PLAIN_TYPES and not hasattr(kind, "__tensor_flatten__"):
        # A Parameter subclass that only tags its data (diffusers' GGUFParameter) streams like a plain one.
        extra = [
            k
            for k, v in vars(tensor).items()
            if not isinstance(v, (*_PLAIN_ATTRIBUTE_TYPES, torch.nn.Module))
        ]
        if not isinstance(tensor, torch.nn.Parameter) or extra:
            return f"{kind.__name__} holds state the offload cannot re-point ({', '.join(extra) or 'type'})"
    for leaf in storage_leaves(tensor):
        if type(leaf) not in PLAIN_TYPES and leaf is not tensor:
            return f"{kind.__name__} has an inner tensor of type {type(leaf).__name__}"
        if leaf.is_sparse or leaf.device.type == "meta":
            return f"its data is {'sparse' if leaf.is_sparse else 'on meta'}"
    return None


def check_packable(tensors: Sequence[torch.Tensor], where: str) -> None:
    for tensor in tensors:
        reason = _unsupported(tensor)
        if reason is not None:
            raise ValueError(
                f"{where}: cannot offload a tensor of type {type(tensor).__name__} on {tensor.device} "
                f"(dtype {tensor.dtype}): {reason}. Supported: dense tensors with real data (load the "
                "weights, not on 'meta'), tensor subclasses that flatten into dense tensors (torchao, "
                "optimum-quanto), diffusers' GGUFParameter and bitsandbytes' 4-bit Params4bit; for "
                "8-bit weights, quantize with torchao or optimum-quanto instead."
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


class WeightSource(Protocol):
    """Where the bytes of tensors built without them (host stand-ins) come from: a checkpoint
    (`loading.CheckpointWeights`)."""

    def covers(self, tensor: torch.Tensor) -> bool: ...

    def read_into(self, tensor: torch.Tensor, out: torch.Tensor) -> None: ...

    def load(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor: ...

    def provided_elsewhere(self, tensor: torch.Tensor) -> None: ...

    def identity(self, tensor: torch.Tensor) -> str: ...

    def fingerprint(self) -> str: ...


# (group name, bytes, layout, pin, device type) -> (slab, whether it already holds the group's bytes).
# The default makes a private `HostSlab`; `shared_memory.SharedSegment.slab` maps a shared one.
SlabAllocator = Callable[[str, int, tuple, bool, str], tuple[Any, bool]]


def private_slab(name: str, nbytes: int, layout: tuple, pin: bool, device_type: str) -> tuple[HostSlab, bool]:
    return HostSlab(nbytes, pin=pin, device_type=device_type), False


def is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 0 and tensor.untyped_storage().nbytes() == 0


class WeightGroup:
    """The tensors of one block or component, packed into one exact-size host slab."""

    on_disk = False  # a `disk.DiskGroup` holds no slab: its bytes stay in the checkpoint files

    def __init__(
        self,
        name: str,
        tensors: list[torch.Tensor],
        *,
        pin: bool,
        device_type: str,
        source: WeightSource | None = None,
        allocate: SlabAllocator = private_slab,
    ) -> None:
        self.name = name
        self.pin = pin
        self.device_type = device_type
        self.placeholders: list[torch.Tensor] = []
        # While an edit runs on a shared slab: a private copy-on-write view of it (see `point_to_host`).
        self._editable: torch.Tensor | None = None
        leaves = [leaf for tensor in tensors for leaf in storage_leaves(tensor)]
        self._pack(tensors, leaves, [leaf.device for leaf in leaves], source, allocate)

    def _pack(
        self,
        tensors: list[torch.Tensor],
        leaves: list[torch.Tensor],
        original_devices: list[torch.device],
        source: WeightSource | None = None,
        allocate: SlabAllocator = private_slab,
    ) -> None:
        # `tensors`: the parameters and buffers as modules hold them; `leaves`: the plain tensors that
        # hold their bytes (the same tensors, unless some are quantized subclasses). Only leaves move.
        self.tensors = tensors
        self.leaves = leaves
        self.dtypes = [t.dtype for t in leaves]
        self.shapes = [t.shape for t in leaves]
        self.sizes = [t.numel() * t.element_size() for t in leaves]
        self.original_devices = original_devices
        self.offsets: list[int] = []
        offset = 0
        for size in self.sizes:
            self.offsets.append(offset)
            offset += _aligned(size)
        # The last tensor needs no trailing padding: the slab is exactly what the data spans.
        self.nbytes = self.offsets[-1] + self.sizes[-1] if leaves else 0
        self.data_bytes = sum(self.sizes)
        # Groups with equal layouts (identical blocks) can share views into the same buffer.
        self.layout = (tuple(self.offsets), tuple(self.dtypes), tuple(self.shapes))
        self._fill(source, allocate)

    def _fill(self, source: WeightSource | None, allocate: SlabAllocator) -> None:
        """Allocates the host slab (`allocate`: private, or shared by the processes of a node) and moves
        every leaf's bytes into it."""
        self.slab, filled = allocate(self.name, self.nbytes, self.layout, self.pin, self.device_type)
        if filled:
            # Attached to another process's copy of these bytes: nothing is read or copied.
            for leaf, view in zip(self.leaves, self.views_into(self.slab.data), strict=True):
                if source is not None and source.covers(leaf):
                    source.provided_elsewhere(leaf)
                leaf.data = view
            return
        # Each tensor is copied in, then re-pointed at its host view at once, so the original storage
        # can be freed as we go: host memory never holds two copies of the group.
        for leaf, view in zip(self.leaves, self.views_into(self.slab.data), strict=True):
            if source is not None and source.covers(leaf):
                source.read_into(leaf, view)  # straight from the file into the slab
            else:
                view.copy_(leaf.detach())
            leaf.data = view
        if self.shared:
            # Filled: from now on mapped read-only (and page-locked in place).
            self.slab.seal(pin=self.pin, device_type=self.device_type)
            self.point_to(self.views_into(self.slab.data))

    @property
    def shared(self) -> bool:
        """Whether the slab is in shared memory that other processes may read (never written)."""
        return getattr(self.slab, "shared", False)

    def point_to_host(self) -> None:
        """Re-points every tensor at its view of the host slab (the copy that edits must change).

        A shared slab is never written: the tensors point at a private copy-on-write mapping of it
        instead, so an edit costs private memory only for the pages it writes; `refresh` then keeps
        the shared slab if nothing changed, else moves the group to a private slab.
        """
        if self.shared and self._editable is None:
            self._editable = self.slab.editable()
        self.point_to(self.views_into(self._host_buffer()))

    def _host_buffer(self) -> torch.Tensor:
        return self._editable if self._editable is not None else self.slab.data

    def refresh(self, tensors: list[torch.Tensor]) -> bool:
        """Takes in what an edit did while the tensors pointed at the host slab; returns True if repacked.

        `tensors` is what the group's modules hold now. A tensor whose storage was replaced (e.g.
        `weight.data = merged`) is copied back into its view; a tensor added or dropped, or a new shape
        or dtype, re-packs this group (only) into a new slab.
        """
        leaves = [leaf for tensor in tensors for leaf in storage_leaves(tensor)]
        same = [id(t) for t in leaves] == [id(t) for t in self.leaves] and all(
            t.dtype == dtype and t.shape == shape
            for t, dtype, shape in zip(leaves, self.dtypes, self.shapes, strict=True)
        )
        if same:
            self.tensors = tensors
            if self.shared and self._editable is None:
                self._editable = self.slab.editable()  # copies below must not reach the shared slab
            buffer = self._host_buffer()
            for leaf, view in zip(leaves, self.views_into(buffer), strict=True):
                if leaf.numel() and leaf.data_ptr() != view.data_ptr():
                    view.copy_(leaf.detach())
                    leaf.data = view
            if self._editable is not None:
                self._editable = None
                if not torch.equal(buffer, self.slab.data):
                    self._make_private(buffer)
            return False
        known = {id(t): device for t, device in zip(self.leaves, self.original_devices, strict=True)}
        # A new tensor (a LoRA layer added while offloaded) goes back, on removal, where the group's
        # other weights go.
        fallback = self.original_devices[0] if self.original_devices else None
        devices = [known.get(id(t), fallback or t.device) for t in leaves]
        old = self.slab
        self._pack(tensors, leaves, devices)  # a private slab: a shared one is never re-packed in place
        self._editable = None
        old.release()
        return True

    def _make_private(self, buffer: torch.Tensor) -> None:
        """Copy-on-write of the whole group: its edited bytes (`buffer`) into a private slab of its own;
        the shared slab stays as other processes read it."""
        private, _ = private_slab(self.name, self.nbytes, self.layout, self.pin, self.device_type)
        private.data.copy_(buffer)
        self.slab.release()
        self.slab = private
        self.point_to(self.views_into(private.data))

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
        for leaf, view in zip(self.leaves, views):
            leaf.data = view

    def offload(self) -> None:
        """Re-point every tensor at its empty placeholder; never copies device-to-host."""
        for leaf, placeholder in zip(self.leaves, self.placeholders):
            leaf.data = placeholder

    def restore(self, device: torch.device | None = None) -> None:
        """Gives every tensor its own storage again (on `device`, else where it was); frees the slab."""
        for leaf, view, original in zip(
            self.leaves, self.views_into(self.slab.data), self.original_devices, strict=True
        ):
            leaf.data = view.to(device or original, copy=True)
        self.slab.release()
