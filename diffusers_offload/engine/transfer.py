"""Host-to-device copies and the events that order them against compute.

The ring and the swap logic speak only this small interface, so the same schedule runs on a CUDA/XPU
copy stream, synchronously on the CPU, or under a test copier that defers copies to prove ordering.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Copier(Protocol):
    """Issues copies and orders them against the compute stream with reusable events.

    A copier whose copies are complete when `copy` returns sets `uses_events = False`, and is then
    never asked to wait or record.
    """

    uses_events: bool

    def new_event(self) -> Any:
        """A reusable event (recorded many times)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None) -> None:
        """Copy `src` into `dst` off the compute stream once compute event `after` passed; record `done`."""

    def copy_timed(
        self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None
    ) -> tuple[Any, Any]:
        """Like `copy`; also returns the stamps taken on the copy stream just before and after it."""

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy on the compute stream itself (ordered with everything computed before and after)."""

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (no host-side blocking)."""

    def record(self, event: Any) -> None:
        """Record `event` on the compute stream."""

    def stamp(self) -> Any:
        """A timing stamp taken on the compute stream (for timelines, not on the default hot path)."""

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two stamps; may wait for the device to reach `end`."""


class SyncCopier:
    """Copies synchronously on the calling thread: the CPU execution device."""

    uses_events = False

    def new_event(self) -> object:
        return object()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None) -> None:
        dst.copy_(src)

    def copy_timed(
        self, dst: torch.Tensor, src: torch.Tensor, done: Any, after: Any | None
    ) -> tuple[float, float]:
        start = time.perf_counter()
        dst.copy_(src)
        return start, time.perf_counter()

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        pass

    def record(self, event: Any) -> None:
        pass

    def stamp(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1000.0


class StreamCopier:
    """Copies on a dedicated accelerator stream through torch's generic Stream/Event API."""

    uses_events = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.Stream(device=device)

    def new_event(self) -> torch.Event:
        return torch.Event(device=self.device)

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, done: torch.Event, after: torch.Event | None
    ) -> None:
        if after is not None:
            self.stream.wait_event(after)
        with self.stream:
            dst.copy_(src, non_blocking=True)
        done.record(self.stream)

    def copy_timed(
        self, dst: torch.Tensor, src: torch.Tensor, done: torch.Event, after: torch.Event | None
    ) -> tuple[torch.Event, torch.Event]:
        if after is not None:
            self.stream.wait_event(after)
        # Stamped after the wait for the slot, so that the span is the copy alone.
        start, end = self._timing_event(), self._timing_event()
        start.record(self.stream)
        self.copy(dst, src, done, None)
        end.record(self.stream)
        return start, end

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def wait(self, event: torch.Event) -> None:
        torch.accelerator.current_stream(self.device).wait_event(event)

    def record(self, event: torch.Event) -> None:
        event.record(torch.accelerator.current_stream(self.device))

    def _timing_event(self) -> torch.Event:
        return torch.Event(device=self.device, enable_timing=True)

    def stamp(self) -> torch.Event:
        event = self._timing_event()
        event.record(torch.accelerator.current_stream(self.device))
        return event

    def elapsed_ms(self, start: torch.Event, end: torch.Event) -> float:
        end.synchronize()
        return start.elapsed_time(end)


def make_copier(device: torch.device) -> Copier:
    return SyncCopier() if device.type == "cpu" else StreamCopier(device)
