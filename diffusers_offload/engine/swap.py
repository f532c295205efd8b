"""Model-level swap: components of one exclusion set take turns on the execution device."""

from __future__ import annotations

from typing import Any

import torch

from .packing import WeightGroup
from .ring import PrefetchRing
from .transfer import Copier


class SwapMember:
    """One component of a swap set.

    `group` holds the weights loaded whole when the member is entered (a swapped component, or the
    non-block part of a streamed one); `ring` streams a component's blocks and gives its slots back when
    the member is evicted. A member with neither only pushes the others out when entered.

    `hand_over`: a streamed member that takes turns with other hand-over members (Wan 2.2's experts).
    When one of them is about to be followed by another (as last time), the next one's first streamed
    block is copied during the last streamed blocks of the one running, into a slot it no longer needs;
    with `rest_ahead`, the next one's non-block part too (into memory beside the running one).
    """

    def __init__(
        self,
        name: str,
        group: WeightGroup | None = None,
        ring: PrefetchRing | None = None,
        *,
        hand_over: bool = False,
        rest_ahead: bool = False,
    ) -> None:
        self.name = name
        self.group = group
        self.ring = ring
        self.hand_over = hand_over
        self.rest_ahead = rest_ahead
        self.device_buffer: torch.Tensor | None = None
        self.staged: Any = None  # the copy event of a non-block part copied ahead of the entry
        self.loads = 0
        self.loads_ahead = 0  # loads of its non-block part issued before it was entered
        self.bytes_moved = 0


class SwapSet:
    """Loading one member evicts every other member first, so at most one is materialised at a time.

    Between hand-over members it learns which member followed which after how many calls (the forwards
    and entry methods of one turn), and prefetches the next one's head at the end of that many calls.
    """

    def __init__(self, device: torch.device, copier: Copier) -> None:
        self.device = device
        self.copier = copier
        self.members: list[SwapMember] = []
        self.active: SwapMember | None = None
        self.calls = 0  # calls of the active member in its current turn
        self._followed_by: dict[int, tuple[SwapMember, int]] = {}  # id(member) -> (next member, calls)
        self._hand_over_call = -1  # the call of the active member's turn after which the next one runs

    def add(self, member: SwapMember) -> SwapMember:
        self.members.append(member)
        return member

    def enter(self, member: SwapMember) -> None:
        """Make `member` the one on the device; cheap when it already is."""
        if self.active is member:
            self.calls += 1
            if self.calls == self._hand_over_call:
                self._prepare_hand_over(member)
            return
        previous = self.active
        if previous is not None and previous.hand_over and member.hand_over:
            self._followed_by[id(previous)] = (member, self.calls)
        if previous is not None and previous.ring is not None and member.ring is not None:
            member.ring.take_over(previous.ring)  # the slots holding its first block, if handed over
        for other in self.members:
            if other is not member:
                self._evict(other)
        group = member.group
        if group is not None and member.staged is not None:
            self.copier.wait(member.staged)
            member.staged = None
            group.point_to(group.views_into(member.device_buffer))
        elif group is not None and member.device_buffer is None:
            # Allocated and filled on the compute stream: it is freed on eviction, and the caching
            # allocator may only hand the bytes out again after the work queued on that stream.
            buffer = torch.empty(group.nbytes, dtype=torch.uint8, device=self.device)
            self.copier.copy_now(buffer, group.slab.data)
            group.point_to(group.views_into(buffer))
            member.device_buffer = buffer
            member.bytes_moved += group.nbytes
            member.loads += 1
        self.active = member  # a streamed member's ring allocates its slots at its first block
        self.calls = 1
        learned = self._followed_by.get(id(member))
        self._hand_over_call = learned[1] if learned is not None else -1
        if self._hand_over_call == 1:
            self._prepare_hand_over(member)

    def _prepare_hand_over(self, member: SwapMember) -> None:
        """The call starting now is `member`'s last before the one that followed it last time."""
        following = self._followed_by[id(member)][0]
        if member.ring is None or following.ring is None:
            return
        member.ring.hand_over_at_end(
            following.ring,
            on_hand_over=lambda: self._load_ahead(following),
            on_cancel=lambda: self._drop_ahead(following),
        )

    def _load_ahead(self, member: SwapMember) -> None:
        """Copies `member`'s non-block part off the compute stream; its entry waits for the copy."""
        group = member.group
        if group is None or not member.rest_ahead or member.device_buffer is not None:
            return
        buffer = torch.empty(group.nbytes, dtype=torch.uint8, device=self.device)
        allocated, member.staged = self.copier.new_event(), self.copier.new_event()
        if self.copier.uses_events:
            # The bytes may have been freed by work still queued on the compute stream.
            self.copier.record(allocated)
        self.copier.copy(buffer, group.slab.data, member.staged, allocated)
        member.device_buffer = buffer
        member.bytes_moved += group.nbytes
        member.loads += 1
        member.loads_ahead += 1

    def _drop_ahead(self, member: SwapMember) -> None:
        if member.staged is not None:
            # The buffer goes back to the allocator: the compute stream must not reuse it mid-copy.
            self.copier.wait(member.staged)
            member.staged = None
            member.device_buffer = None

    def _evict(self, member: SwapMember) -> None:
        self._drop_ahead(member)
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
