"""Model-level swap: components of one exclusion set take turns on the execution device."""

from __future__ import annotations

from typing import Any

import torch

from .packing import WeightGroup
from .ring import PrefetchRing
from .transfer import Copier


class ArrivingBlocks:
    """The resident blocks inside a hand-over member's non-block slab, copied one block at a time after
    its entry instead of with the rest: the entry waits for the non-block bytes only, and block `k`'s
    hook waits for the copies up to its own (`acquire(k)`) before its first forward, so the copies
    overlap the compute of the blocks before. It stands in for a ring in `StreamedBlockHook`.

    `ranges[k]`: block k's bytes in the slab, in block order; `head`: the slab's other bytes.
    """

    def __init__(
        self, ranges: list[tuple[int, int]], head: list[tuple[int, int]], copier: Copier, layout: tuple
    ) -> None:
        self.layout = layout  # the slab layout the ranges were taken from (an edit may repack the slab)
        self.ranges = ranges
        self.head = head
        self.copier = copier
        self.events: list[Any] = []  # copy events of the blocks, while some are not waited for yet
        self.arrived = 0  # blocks waited for

    def acquire(self, position: int) -> None:
        if self.events and position >= self.arrived:
            self._wait_through(position)

    def release(self, position: int) -> None:
        pass

    def _wait_through(self, position: int) -> None:
        # Each event on its own: copies on one stream finish in order, but a copier need not run them so.
        for index in range(self.arrived, min(position + 1, len(self.events))):
            self.copier.wait(self.events[index])
        self.arrived = position + 1
        if self.arrived >= len(self.events):
            self.events, self.arrived = [], 0

    def copy_in(self, buffer: torch.Tensor, source: torch.Tensor) -> None:
        """Issues the copies of the slab `source` into `buffer` (fresh, allocated on the compute stream):
        the non-block bytes first, waited for now, then each block's."""
        copier = self.copier
        allocated = copier.new_event()
        copier.record(allocated)  # the buffer's bytes may be freed ones that queued work still reads

        def issue(ranges: list[tuple[int, int]]) -> list[Any]:
            events = []
            for start, end in ranges:
                events.append(copier.new_event())
                copier.copy(buffer[start:end], source[start:end], events[-1], allocated)
            return events

        head = issue(self.head)
        self.events, self.arrived = issue(self.ranges), 0
        for event in head:
            copier.wait(event)

    def settle(self) -> None:
        """Waits for every copy still in flight (before the buffer is given back)."""
        if self.events:
            self._wait_through(len(self.events) - 1)


class SwapMember:
    """One component of a swap set.

    `group` holds the weights loaded whole when the member is entered (a swapped component, or the
    non-block part of a streamed one); `ring` streams a component's blocks and gives its slots back when
    the member is evicted. A member with neither only pushes the others out when entered.

    `hand_over`: a streamed member that takes turns with other hand-over members (Wan 2.2's experts).
    When one of them is about to be followed by another (as last time), the next one's first streamed
    block is copied during the last streamed blocks of the one running, into a slot it no longer needs;
    with `rest_ahead`, the next one's non-block part too (into memory beside the running one).
    `arriving`: when it is entered otherwise, its resident blocks are copied block by block behind its
    non-block part rather than with it (see `ArrivingBlocks`).
    """

    def __init__(
        self,
        name: str,
        group: WeightGroup | None = None,
        ring: PrefetchRing | None = None,
        *,
        hand_over: bool = False,
        rest_ahead: bool = False,
        arriving: ArrivingBlocks | None = None,
    ) -> None:
        self.name = name
        self.arriving = arriving
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
            arriving = member.arriving
            if arriving is not None and arriving.layout == group.layout and self.copier.uses_events:
                arriving.copy_in(buffer, group.slab.data)  # its resident blocks arrive as they run
            else:
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
        if member.arriving is not None:
            member.arriving.settle()
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
