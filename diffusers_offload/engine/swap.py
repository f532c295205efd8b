"""Model-level swap: components of one exclusion set take turns on the execution device."""

from __future__ import annotations

import torch

from .packing import WeightGroup
from .ring import PrefetchRing
from .transfer import Copier


class SwapMember:
    """One component of a swap set.

    `group` holds the weights loaded whole when the member is entered (a swapped component, or the
    non-block part of a streamed one); `ring` streams a component's blocks and gives its slots back when
    the member is evicted. A member with neither only pushes the others out when entered.
    """

    def __init__(self, name: str, group: WeightGroup | None = None, ring: PrefetchRing | None = None) -> None:
        self.name = name
        self.group = group
        self.ring = ring
        self.device_buffer: torch.Tensor | None = None
        self.loads = 0
        self.bytes_moved = 0


class SwapSet:
    """Loading one member evicts every other member first, so at most one is materialised at a time."""

    def __init__(self, device: torch.device, copier: Copier) -> None:
        self.device = device
        self.copier = copier
        self.members: list[SwapMember] = []
        self.active: SwapMember | None = None

    def add(self, member: SwapMember) -> SwapMember:
        self.members.append(member)
        return member

    def enter(self, member: SwapMember) -> None:
        """Make `member` the one on the device; cheap when it already is."""
        if self.active is member:
            return
        for other in self.members:
            if other is not member:
                self._evict(other)
        group = member.group
        if group is not None and member.device_buffer is None:
            # Allocated and filled on the compute stream: it is freed on eviction, and the caching
            # allocator may only hand the bytes out again after the work queued on that stream.
            buffer = torch.empty(group.nbytes, dtype=torch.uint8, device=self.device)
            self.copier.copy_now(buffer, group.slab.data)
            group.point_to(group.views_into(buffer))
            member.device_buffer = buffer
            member.bytes_moved += group.nbytes
            member.loads += 1
        self.active = member  # a streamed member's ring allocates its slots at its first block

    def _evict(self, member: SwapMember) -> None:
        if member.group is not None and member.device_buffer is not None:
            member.group.offload()
            member.device_buffer = None
        if member.ring is not None:
            member.ring.free()
        if self.active is member:
            self.active = None

    def evict_all(self) -> None:
        for member in self.members:
            self._evict(member)
