"""The prefetch ring: `prefetch + 1` device slots that streamed blocks take turns in.

Blocks are expected in a cyclic order (the last block of a forward is followed by the first of the next
one). Entering block i makes sure it is in a slot, makes compute wait for its copy, and issues the copies
of the `prefetch` blocks expected after it into slots whose occupants are outside that window. The order
expected is learned: it starts as i+1, i+2, ... and each block remembers which block came after it last
time, so a cache that skips blocks (the same ones pass after pass) gets the blocks that will really run
prefetched. Any other order is still correct: a block that is not in a slot is loaded on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .packing import WeightGroup
from .timeline import BlockTimeline
from .transfer import Copier

if TYPE_CHECKING:
    from .disk import DiskReader

EMPTY = -1
LENT = -2  # a slot given to the next member of a swap set (its first block is being copied in)


@dataclass(frozen=True)
class RingStats:
    """Counters for the report: transfers issued and how many were on demand (not prefetched)."""

    loads: int = 0
    on_demand_loads: int = 0
    bytes_moved: int = 0
    calls: int = 0


class PrefetchRing:
    """Streams `groups` (in expected execution order) through `prefetch + 1` fixed device slots.

    The slots are allocated by `allocate()`, or else by the first `acquire`, and given back by `free()`.
    `start_timing()` makes it stamp every block's copy, wait and compute into `timeline` (off by default).
    Groups on the disk tier (`group.on_disk`) are copied from the staging buffer `reader` read them into.
    """

    def __init__(
        self,
        groups: Sequence[WeightGroup],
        device: torch.device,
        prefetch: int,
        copier: Copier,
        reader: DiskReader | None = None,
    ) -> None:
        if not groups:
            raise ValueError("PrefetchRing needs at least one group to stream.")
        self.groups = list(groups)
        self.copier = copier
        self.reader = reader
        if reader is None and any(group.on_disk for group in self.groups):
            raise ValueError("PrefetchRing: groups on the disk tier need a DiskReader.")
        count = len(self.groups)
        self.lookahead = min(prefetch, count - 1)
        num_slots = self.lookahead + 1
        self.device = device
        self.num_slots = num_slots
        self.slot_bytes = max(group.nbytes for group in self.groups)
        self.slot_owner = [EMPTY] * num_slots
        self.slot_of = [EMPTY] * count
        self._copied = [copier.new_event() for _ in range(num_slots)]
        self._released = [copier.new_event() for _ in range(num_slots)]
        # Synchronous copiers (the CPU) order nothing with events: skip those calls on the hot path.
        self._events = copier.uses_events
        self.slots: list[torch.Tensor] = []
        # The block seen after each block last time, and the prefetch window that follows from it.
        self._next = [(position + 1) % count for position in range(count)]
        self._ahead = [self._window(position) for position in range(count)]
        self._previous = EMPTY
        self.calls = self.loads = self.on_demand_loads = self.bytes_moved = 0
        self.timeline: BlockTimeline | None = None
        # A hand-over to the next member of a swap set (see `hand_over_at_end`); unset on the common path.
        self._successor: PrefetchRing | None = None
        self._on_hand_over: Callable[[], None] | None = None
        self._on_cancel: Callable[[], None] | None = None
        self._hand_over_at = EMPTY
        self._lent = EMPTY  # the slot holding the successor's first block, taken over at its entry
        self.staged_slot = EMPTY  # as the successor: the slot its first block was copied into ahead

    def start_timing(self) -> BlockTimeline:
        """Stamps each block call from now on (a few events per block: the hot path gets slower)."""
        if self.timeline is None:
            self.timeline = BlockTimeline(self.copier, [group.name for group in self.groups])
        return self.timeline

    def _window(self, position: int) -> tuple[int, ...]:
        """The blocks expected after `position`, up to `lookahead` of them, each once."""
        window: list[int] = []
        upcoming = position
        for _ in range(self.lookahead):
            upcoming = self._next[upcoming]
            if upcoming == position or upcoming in window:
                break
            window.append(upcoming)
        return tuple(window)

    def _learn(self, previous: int, position: int) -> None:
        """Block `position` followed `previous`: expect that from now on (off the common path)."""
        self._next[previous] = position
        self._ahead = [self._window(p) for p in range(len(self.groups))]

    @property
    def stats(self) -> RingStats:
        """A snapshot of the counters, for reports and tests."""
        return RingStats(self.loads, self.on_demand_loads, self.bytes_moved, self.calls)

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def allocate(self, slots: Sequence[torch.Tensor] | None = None) -> None:
        """Allocates the slots (once; again only after `free`), or takes over `slots` (a predecessor's)."""
        if self.slots:
            return
        # Allocated once: no allocator traffic per block or per step.
        self.slots = (
            list(slots)
            if slots is not None
            else [
                torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                for _ in range(self.num_slots)
            ]
        )
        # None: a disk group, whose bytes are in the reader's staging buffer when its turn comes.
        self._src = [None if group.on_disk else group.slab.data for group in self.groups]
        if self._events:
            # Fresh slots may reuse memory that work queued on the compute stream still reads: order
            # the first copy into each slot after everything queued so far.
            for event in self._released:
                self.copier.record(event)
        # Precomputed so that the hot path only re-points (slicing a view costs microseconds). Blocks of
        # one layout share their view objects (re-pointing copies a view's metadata, it keeps no
        # reference), which keeps the hot path's working set small.
        shared: dict[tuple, list[torch.Tensor]] = {}
        self._views = [
            [
                shared.setdefault((group.layout, index), group.views_into(slot))
                for index, slot in enumerate(self.slots)
            ]
            for group in self.groups
        ]
        self._dst = [[slot[: group.nbytes] for slot in self.slots] for group in self.groups]

    def free(self) -> None:
        """Evicts every block and gives the slots back to the allocator."""
        self._disarm()
        self.staged_slot = EMPTY
        self.evict_all()
        if self._events:
            for event in self._copied:
                # The compute stream must not reuse a slot's memory before copies still in flight land in it.
                self.copier.wait(event)
        # Dropping the slab references too: after removal the slabs must be freeable.
        self.slots, self._views, self._dst, self._src = [], [], [], []
        if self.reader is not None:
            self.reader.rewind()

    def acquire(self, position: int) -> None:
        """Called before block `position` computes: its weights are in a slot once compute proceeds."""
        # The hot path: a few list lookups, no allocation; counters are plain ints.
        self.calls += 1
        timeline = self.timeline
        if timeline is not None:
            wait = self.copier.stamp()
        previous = self._previous
        if previous != EMPTY and self._next[previous] != position:
            self._learn(previous, position)
        self._previous = position
        if not self.slots:
            self.allocate()
        slot_of = self.slot_of
        slot = slot_of[position]
        if slot == EMPTY:
            slot = self._load(position, position)
            self.on_demand_loads += 1
        if self._events:
            self.copier.wait(self._copied[slot])
        for upcoming in self._ahead[position]:
            if slot_of[upcoming] == EMPTY:
                self._load(upcoming, position)
        if timeline is not None:
            # Stamped after the prefetches are issued: on the CPU they are synchronous and delay compute.
            timeline.started(position, wait)

    def release(self, position: int) -> None:
        """Called after block `position` computed (or raised): its slot may be reused after this point."""
        if self.timeline is not None:
            self.timeline.finished(position)
        if self._events:
            slot = self.slot_of[position]
            if slot != EMPTY:
                self.copier.record(self._released[slot])

    def _load(self, position: int, window_start: int) -> int:
        slot = self._victim(window_start)
        owner = self.slot_owner[slot]
        if owner != EMPTY:
            self.groups[owner].offload()
            self.slot_of[owner] = EMPTY
        src = self._src[position]
        staged = src is None
        if staged:
            src = self.reader.take(position)  # waits for the disk if the read-ahead is behind
        copy = (self._dst[position][slot], src, self._copied[slot], self._released[slot])
        if self.timeline is None:
            self.copier.copy(*copy)
        else:
            self.timeline.copied(position, self.copier.copy_timed(*copy))
        if staged:
            # The buffer is reused once the copy recorded in `_copied[slot]` is done.
            self.reader.release(position, self._copied[slot] if self._events else None)
        group = self.groups[position]
        group.point_to(self._views[position][slot])
        self.slot_owner[slot] = position
        self.slot_of[position] = slot
        self.loads += 1
        self.bytes_moved += group.nbytes
        return slot

    def _victim(self, window_start: int) -> int:
        """An empty slot, else the slot of a block outside the window of `window_start` (the block about
        to run and those expected next), the furthest ahead in block order."""
        count = len(self.groups)
        window = self._ahead[window_start]
        best, best_distance = EMPTY, -1
        for slot, owner in enumerate(self.slot_owner):
            if owner == EMPTY:
                return slot
            distance = (owner - window_start) % count
            if owner != window_start and owner not in window and distance > best_distance:
                best, best_distance = slot, distance
        if best == EMPTY:  # pragma: no cover - the window holds at most num_slots - 1 loaded blocks here
            raise RuntimeError("PrefetchRing: no free slot; this is a bug in diffusers-offload.")
        return best

    def hand_over_at_end(
        self,
        successor: PrefetchRing | None,
        on_hand_over: Callable[[], None],
        on_cancel: Callable[[], None],
    ) -> None:
        """For the forward about to run, the last before the swap set enters another member: from the
        first block whose prefetch window wraps to the next forward, nothing of this ring is prefetched
        for a next forward; there `on_hand_over()` runs (it copies the member's non-block part ahead) and
        `successor`'s first block is copied into the slot this forward no longer needs, which
        `successor.take_over(self)` adopts at its entry (`successor` None: no block is copied).

        If this ring needs a block loaded after that point (another forward after all), the hand-over is
        cancelled: `on_cancel()` runs, the slot comes back, and the block loads on demand as usual.
        """
        count = len(self.groups)
        compatible = (
            successor is not None
            and self.lookahead > 0
            and successor.num_slots == self.num_slots
            and successor.slot_bytes <= self.slot_bytes
            # A head on the disk tier has no host slab to copy from; it loads through its reader.
            and not successor.groups[0].on_disk
        )
        self._successor = successor if compatible else None
        self._on_hand_over, self._on_cancel = on_hand_over, on_cancel
        self._hand_over_at = max(count - self.lookahead, 0) if self.lookahead else count - 1
        at = self._hand_over_at
        self._ahead = [
            window if p < at else tuple(u for u in window if u > p) for p, window in enumerate(self._ahead)
        ]
        # An instance attribute shadowing the method for this forward only: no cost on the common path.
        self.acquire = self._acquire_handing_over  # type: ignore[method-assign]

    def _acquire_handing_over(self, position: int) -> None:
        if self._lent != EMPTY or self._on_hand_over is None:
            slot_of = self.slot_of
            if slot_of[position] == EMPTY or any(slot_of[u] == EMPTY for u in self._ahead[position]):
                self._cancel_hand_over()  # this ring runs on: the successor's head is not next
            PrefetchRing.acquire(self, position)
            return
        PrefetchRing.acquire(self, position)
        if position >= self._hand_over_at:
            self._hand_over(position)

    def _hand_over(self, position: int) -> None:
        on_hand_over, self._on_hand_over = self._on_hand_over, None
        successor = self._successor
        if successor is not None:
            slot = self._victim(position)
            owner = self.slot_owner[slot]
            if owner != EMPTY:
                self.groups[owner].offload()
                self.slot_of[owner] = EMPTY
            self.slot_owner[slot] = LENT
            self._lent = slot
            head = successor.groups[0]
            # Ordered after the last read of the slot by this ring's compute; the successor waits for it.
            self.copier.copy(
                self.slots[slot][: head.nbytes], head.slab.data, successor._copied[slot], self._released[slot]
            )
            successor.staged_slot = slot
            successor.loads += 1
            successor.bytes_moved += head.nbytes
        on_hand_over()

    def _cancel_hand_over(self) -> None:
        on_cancel = self._on_cancel
        if self._successor is not None:
            self._successor.staged_slot = EMPTY
        self._disarm()
        if on_cancel is not None:
            on_cancel()

    def _disarm(self) -> None:
        if self._on_cancel is None:
            return
        if self._lent != EMPTY:
            self.slot_owner[self._lent] = EMPTY
        self._lent = EMPTY
        self._successor = self._on_hand_over = self._on_cancel = None
        self._hand_over_at = EMPTY
        self.__dict__.pop("acquire", None)
        self._ahead = [self._window(p) for p in range(len(self.groups))]

    def take_over(self, predecessor: PrefetchRing) -> None:
        """At entry: adopts `predecessor`'s slots when its hand-over copied this ring's first block ahead
        (call before the predecessor is freed); the block then counts as loaded, not on demand."""
        slot = self.staged_slot
        if slot == EMPTY or predecessor._lent != slot:
            self.staged_slot = EMPTY
            return
        predecessor.slot_owner[slot] = EMPTY
        predecessor._lent = EMPTY
        self.allocate(predecessor.slots)
        self.groups[0].point_to(self._views[0][slot])
        self.slot_owner[slot] = 0
        self.slot_of[0] = slot
        self.staged_slot = EMPTY

    def evict_all(self) -> None:
        for slot, owner in enumerate(self.slot_owner):
            if owner >= 0:
                self.groups[owner].offload()
                self.slot_of[owner] = EMPTY
            self.slot_owner[slot] = EMPTY
