"""Per-block copy, compute and stall times of a prefetch ring, for the report's timeline.

On an accelerator the stamps are timing events on the copy and compute streams, read only when a
report asks (never on the hot path); on the CPU they are wall-clock times of the synchronous copies
and of the compute. A stall is the time the compute stream waited between the end of the previous
block and the start of this one: the part of the copies that compute did not hide.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from .transfer import Copier

# Passes kept for the report: enough to average over, bounded so that timing never grows memory.
KEPT_PASSES = 8


@dataclass(frozen=True)
class BlockTiming:
    """Mean times of one streamed block over the kept passes, in milliseconds."""

    position: int
    name: str
    calls: int
    copy_ms: float
    compute_ms: float
    stall_ms: float


@dataclass(frozen=True)
class PassTiming:
    """Times of one full pass over the blocks (one forward of the component), in milliseconds."""

    passes: int
    copy_ms: float
    compute_ms: float
    stall_ms: float

    @classmethod
    def of(cls, blocks: list[BlockTiming]) -> PassTiming | None:
        """Sums the blocks' means into one pass; None before the first block call."""
        if not blocks:
            return None
        passes = max(block.calls for block in blocks)
        return cls(
            passes,
            sum(b.copy_ms * b.calls for b in blocks) / passes,
            sum(b.compute_ms * b.calls for b in blocks) / passes,
            sum(b.stall_ms * b.calls for b in blocks) / passes,
        )

    @property
    def hidden_ms(self) -> float:
        """Copy time that overlapped compute."""
        return max(self.copy_ms - self.stall_ms, 0.0)

    @property
    def hidden_fraction(self) -> float | None:
        """Share of the copy time hidden behind compute; None when nothing was copied."""
        return self.hidden_ms / self.copy_ms if self.copy_ms > 0 else None


class BlockTimeline:
    """Stamps taken by a `PrefetchRing` around each block's wait, compute and copy."""

    def __init__(self, copier: Copier, names: list[str]) -> None:
        self.copier = copier
        self.names = names
        # One record per block call: (position, wait, compute start, compute end, copy stamps or None).
        self.records: deque[tuple[int, Any, Any, Any, tuple[Any, Any] | None]] = deque(
            maxlen=KEPT_PASSES * len(names)
        )
        self._copies: list[tuple[Any, Any] | None] = [None] * len(names)
        self._open: tuple[int, Any, Any] | None = None

    def copied(self, position: int, stamps: tuple[Any, Any]) -> None:
        """The copy of block `position` was issued, between these copy-stream stamps."""
        self._copies[position] = stamps

    def started(self, position: int, wait: Any) -> None:
        """Block `position` begins computing; `wait` was stamped before its acquire waited or copied."""
        self._open = (position, wait, self.copier.stamp())

    def finished(self, position: int) -> None:
        if self._open is None or self._open[0] != position:
            return  # an exception between acquire and release of another block: nothing to pair
        _, wait, start = self._open
        self._open = None
        copy, self._copies[position] = self._copies[position], None
        self.records.append((position, wait, start, self.copier.stamp(), copy))

    def blocks(self) -> list[BlockTiming]:
        """Mean copy, compute and stall per block (synchronises with the device when it must)."""
        elapsed = self.copier.elapsed_ms
        sums: dict[int, list[float]] = {}
        for position, wait, start, end, copy in self.records:
            entry = sums.setdefault(position, [0, 0.0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += elapsed(*copy) if copy is not None else 0.0
            entry[2] += elapsed(start, end)
            entry[3] += elapsed(wait, start)
        return [
            BlockTiming(position, self.names[position], int(n), copy / n, compute / n, stall / n)
            for position, (n, copy, compute, stall) in sorted(sums.items())
        ]
