"""Byte sizes of pipeline components: streamable blocks, the resident remainder and host-only parts.

Sizes are ``numel * element_size`` of parameters and buffers, so they work on ``meta`` modules as well as real
ones. A tensor reachable under several names (tied weights) is counted once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..model_registry import ModelAdapter

_OTHER = -1  # bucket for the non-block remainder
_HOST = -2  # bucket for host-only submodules


@dataclass(frozen=True)
class ComponentSizes:
    """Sizes of one pipeline component, in bytes."""

    name: str  # pipeline attribute
    role: str  # "denoiser" | "encoder" | "vae" | "other"
    block_bytes: tuple[int, ...]  # each streamable block in execution order; () if none
    other_bytes: int  # everything else on the device (host_only parts excluded)
    host_only_bytes: int = 0  # submodules kept on host and loaded only if called
    prefer_resident_blocks: bool = False

    @property
    def total_bytes(self) -> int:
        """Whole component, host-only parts included."""
        return sum(self.block_bytes) + self.other_bytes + self.host_only_bytes

    @property
    def device_bytes(self) -> int:
        """What the component needs on the device when fully resident (host-only parts excluded)."""
        return sum(self.block_bytes) + self.other_bytes


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # remove_duplicate=False: a tied tensor must be seen under every name to know all of its owners.
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _is_flattening_subclass(t: torch.Tensor) -> bool:
    # Quantized tensor subclasses (torchao, optimum-quanto) keep their bytes in inner tensors.
    return hasattr(type(t), "__tensor_flatten__")


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes `t` really holds: a quantized subclass's inner tensors, not its dequantized size."""
    if _is_flattening_subclass(t):
        names, _context = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _tensor_key(t: torch.Tensor) -> object:
    # Tied weights share one Parameter object; on real devices also catch distinct views of one storage.
    if t.device.type == "meta" or _is_flattening_subclass(t):
        return id(t)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _bucket(name: str, blocks: list[str], host: list[str]) -> int:
    for prefix in host:
        if name.startswith(prefix + "."):
            return _HOST
    for index, prefix in enumerate(blocks):
        if name.startswith(prefix + "."):
            return index
    return _OTHER


def measure_component(name: str, module: nn.Module, adapter: ModelAdapter) -> ComponentSizes:
    """Sizes of one component, split by the adapter's block lists and host-only paths for ``name``."""
    # One prefix per block, "path.index", flattened across the block lists in execution order.
    blocks = [f"{path}.{i}" for path, ml in adapter.block_lists_of(name, module) for i in range(len(ml))]
    host = [path for path, _ in adapter.host_only_of(name, module)]

    owners: dict[object, set[int]] = {}
    sizes: dict[object, int] = {}
    for tensor_name, tensor in _named_tensors(module):
        key = _tensor_key(tensor)
        owners.setdefault(key, set()).add(_bucket(tensor_name, blocks, host))
        sizes[key] = _stored_bytes(tensor)

    block_bytes = [0] * len(blocks)
    other_bytes = host_bytes = 0
    for key, where in owners.items():
        # A tensor shared by two blocks, or by a block and the remainder, must stay resident to serve both;
        # one shared by a host-only part and anything else cannot stay on the host.
        if where == {_HOST}:
            host_bytes += sizes[key]
        elif len(where) == 1 and _OTHER not in where:
            block_bytes[next(iter(where))] += sizes[key]
        else:
            other_bytes += sizes[key]
    return ComponentSizes(
        name=name,
        role=adapter.role(name),
        block_bytes=tuple(block_bytes),
        other_bytes=other_bytes,
        host_only_bytes=host_bytes,
        prefer_resident_blocks=adapter.prefers_resident(name),
    )


def measure_components(components: Mapping[str, nn.Module], adapter: ModelAdapter) -> list[ComponentSizes]:
    """:class:`ComponentSizes` for each ``nn.Module`` in ``components``, in the mapping's order.

    Raises:
        ValueError: when a declared block-list or host-only path does not resolve in its component.
    """
    return [
        measure_component(name, module, adapter)
        for name, module in components.items()
        if isinstance(module, nn.Module)
    ]
