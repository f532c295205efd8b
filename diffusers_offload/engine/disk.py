"""The disk tier: weight groups whose bytes stay in their checkpoint files, read ahead by a thread.

A `DiskGroup` is a `WeightGroup` without a host slab: it knows where each of its tensors lies in its
safetensors file (offset, stored dtype). A `DiskReader` owns a small ring of staging buffers (page-locked
when the device is an accelerator) and a background thread that reads the disk groups of one prefetch
ring into them, in the ring's block order, as far ahead as it has free buffers. The prefetch ring takes a
group's staging buffer instead of its slab, copies it to the device and gives the buffer back; when the
bytes are not there yet it waits, and the reader counts those waits and their time (the disk, not the
copy, is then the bottleneck).

Reads go straight from the checkpoint files (`os.preadv` at the offsets of their headers): no second copy
of the model on disk, nothing written at load time, and a block's tensors are adjacent in the file, so
one block is a few large sequential reads.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .host_memory import HostSlab
from .loading import CheckpointError, Entry, ReadInto, byte_view
from .packing import WeightGroup


class EntrySource(Protocol):
    """What a disk group needs of a checkpoint: where a tensor's bytes are (`loading.CheckpointWeights`)."""

    reader: ReadInto

    def locate(self, tensor: torch.Tensor) -> Entry | None: ...


class FileHandles:
    """Read-only file descriptors by path, opened on first use; `close()` closes them all."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"{path}: the checkpoint file disappeared; its weights are on the disk tier "
                        "(ram_budget) and are read from it at every step. Restore the file or load again."
                    ) from None
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_entry(entry: Entry, out: torch.Tensor, reader: ReadInto, files: FileHandles) -> None:
    """Reads `entry`'s bytes into `out` (a contiguous CPU tensor of its shape), converting the dtype
    through one temporary tensor when the file stores another one."""
    target = out if entry.dtype == out.dtype else torch.empty(entry.shape, dtype=entry.dtype)
    try:
        reader(files(entry.path), entry.start, byte_view(target))
    except CheckpointError as error:
        raise CheckpointError(
            f"{entry.path}: reading {entry.key!r} from the disk tier failed: {error} The file changed "
            "or was truncated after loading; restore it (download or save again) and load again."
        ) from None
    if target is not out:
        out.copy_(target)


class DiskGroup(WeightGroup):
    """A weight group whose bytes stay on disk: its layout is a slab's, but no slab is allocated.

    `entries[i]` is where leaf i's bytes are; a leaf no checkpoint holds (a buffer computed at init)
    keeps its own small host copy instead. Its weights cannot be edited in place (`point_to_host`
    raises), and restoring reads them from the files again.
    """

    on_disk = True

    def __init__(
        self, name: str, tensors: list[torch.Tensor], *, device_type: str, source: EntrySource
    ) -> None:
        self._source = source
        super().__init__(name, tensors, pin=False, device_type=device_type)

    def _fill(self, source: Any = None, allocate: Any = None) -> None:
        self.slab = HostSlab(0, pin=False)
        self.entries: list[Entry | None] = []
        self.kept: list[torch.Tensor | None] = []
        for leaf in self.leaves:
            entry = self._source.locate(leaf)
            self.entries.append(entry)
            self.kept.append(None if entry is not None else leaf.detach().clone())
        self.disk_bytes = sum(e.nbytes for e in self.entries if e is not None)
        self.reader = self._source.reader
        del self._source

    def read_into(self, buffer: torch.Tensor, files: FileHandles) -> int:
        """Fills `buffer` (a uint8 CPU tensor of at least `nbytes`) as the slab would be; returns the
        bytes read from disk."""
        for entry, kept, view in zip(self.entries, self.kept, self.views_into(buffer), strict=True):
            if entry is not None:
                read_entry(entry, view, self.reader, files)
            else:
                view.copy_(kept)
        return self.disk_bytes

    def point_to_host(self) -> None:
        raise RuntimeError(
            f"{self.name}'s weights are on the disk tier (ram_budget): they have no host copy to edit. "
            "Load without ram_budget (or with one that holds the model) to edit weights, fuse LoRAs or "
            "save the model while offloaded."
        )

    def refresh(self, tensors: list[torch.Tensor]) -> bool:
        return False  # never edited: `point_to_host` refused the edit

    def restore(self, device: torch.device | None = None) -> None:
        files = FileHandles()
        try:
            for leaf, entry, kept, dtype, shape, original in zip(
                self.leaves,
                self.entries,
                self.kept,
                self.dtypes,
                self.shapes,
                self.original_devices,
                strict=True,
            ):
                host = torch.empty(shape, dtype=dtype)
                if entry is not None:
                    read_entry(entry, host, self.reader, files)
                else:
                    host.copy_(kept)
                leaf.data = host.to(device or original)
        finally:
            files.close()


@dataclass(frozen=True)
class DiskStats:
    """What the reader did so far: groups and bytes read, and how often (and how long) the copy to the
    device had to wait for the disk."""

    reads: int = 0
    bytes_read: int = 0
    takes: int = 0  # staging buffers handed to the ring
    waits: int = 0  # takes that found their group not read yet
    wait_seconds: float = 0.0
    restarts: int = 0  # blocks asked for out of the expected order (read-ahead restarted there)

    @property
    def disk_bound(self) -> bool:
        """True when at least half of the groups taken were not read in time: the disk, not the copy or
        compute, sets the pace."""
        return self.takes > 0 and 2 * self.waits >= self.takes


# Readers still running at interpreter exit are stopped first: a thread left inside torch while the
# interpreter finalizes aborts the process.
_RUNNING: weakref.WeakSet[DiskReader] = weakref.WeakSet()


@atexit.register
def _stop_running_readers() -> None:
    for reader in list(_RUNNING):
        reader.close()


class DiskReader:
    """Reads `groups` (the disk groups of one prefetch ring, by ring position) ahead into `buffers`
    staging buffers on a background thread, in cyclic ring order.

    `take(position)` returns the staging buffer holding that group's bytes, waiting for the read if
    needed; `release(position, fence)` gives it back once the copy from it is issued (`fence`: an event
    recorded after that copy, which the thread waits for before reusing the buffer; None when the copy
    was synchronous). `rewind()` restarts the read-ahead at the first group (the component left the
    device); `close()` stops the thread and closes the files. An error while reading (a truncated
    file) is raised by the `take` that needed it.
    """

    def __init__(self, groups: dict[int, DiskGroup], buffers: int, *, pin: bool, device_type: str) -> None:
        if buffers < 1:
            raise ValueError(f"the disk tier needs at least one staging buffer, got {buffers}.")
        self.groups = groups
        self.order = sorted(groups)
        self._index = {position: i for i, position in enumerate(self.order)}
        self.buffer_bytes = max(group.nbytes for group in groups.values())
        self.staging = [HostSlab(self.buffer_bytes, pin=pin, device_type=device_type) for _ in range(buffers)]
        self._files = FileHandles()
        self._cond = threading.Condition()
        self._free = list(range(buffers))
        self._fences: list[Any] = [None] * buffers
        self._ready: dict[int, int] = {}  # position -> staging buffer
        self._reading: int | None = None
        self._discard: int | None = None  # the read in progress is not wanted any more
        self._cursor = 0
        self._error: BaseException | None = None
        self._stopped = False
        self._stats = DiskStats()
        self._thread = threading.Thread(target=self._run, name="diffusers-offload disk reader", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    @property
    def staging_bytes(self) -> int:
        return sum(slab.nbytes for slab in self.staging)

    @property
    def stats(self) -> DiskStats:
        with self._cond:
            return self._stats

    def _count(self, **added: float) -> None:
        values = {k: getattr(self._stats, k) + v for k, v in added.items()}
        self._stats = DiskStats(**{**self._stats.__dict__, **values})

    def _next_to_read(self) -> int | None:
        """The next group to read, or None (no free buffer, or every group read). The cursor moves past
        groups already read: after a restart it may point at one."""
        if self._error is not None:
            return None
        for _ in range(len(self.order)):
            position = self.order[self._cursor]
            if position not in self._ready and position != self._reading:
                return position if self._free else None
            self._cursor = (self._cursor + 1) % len(self.order)
        return None

    def _restart_at(self, index: int) -> None:
        """Restarts the read-ahead at `order[index]`: groups read (or being read) for outside the window
        that starts there are dropped, those inside it kept."""
        window = {self.order[(index + i) % len(self.order)] for i in range(len(self.staging))}
        for position in [p for p in self._ready if p not in window]:
            self._free.append(self._ready.pop(position))
        if self._reading is not None and self._reading not in window:
            self._discard = self._reading
        self._cursor = index
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._next_to_read() is None:
                    self._cond.wait()
                if self._stopped:
                    return
                position = self._next_to_read()
                self._cursor = (self._cursor + 1) % len(self.order)
                buffer = self._free.pop()
                fence, self._fences[buffer] = self._fences[buffer], None
                self._reading = position
            try:
                if fence is not None:
                    fence.synchronize()  # the copy out of this buffer must be done before we overwrite it
                read = self.groups[position].read_into(self.staging[buffer].data, self._files)
            except BaseException as error:  # handed to the compute thread by `take`
                with self._cond:
                    self._error, self._reading = error, None
                    self._free.append(buffer)
                    self._cond.notify_all()
                return
            with self._cond:
                self._reading = None
                if self._discard == position:
                    self._discard = None
                    self._free.append(buffer)
                else:
                    self._ready[position] = buffer
                self._count(reads=1, bytes_read=read)
                self._cond.notify_all()

    def take(self, position: int) -> torch.Tensor:
        """The staging buffer holding group `position`'s bytes (blocks until they are read)."""
        with self._cond:
            waited, started = False, 0.0
            while position not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._stopped:
                    raise RuntimeError("The disk reader was closed: offloading was removed.")
                if position != self._reading and self._next_to_read() != position:
                    # Asked out of order (a cache skipped blocks): restart the read-ahead here.
                    self._restart_at(self._index[position])
                    self._count(restarts=1)
                elif position == self._reading and self._discard == position:
                    self._discard = None  # dropped by a restart, but wanted after all
                if not waited:
                    waited, started = True, time.perf_counter()
                self._cond.wait()
            if waited:
                self._count(waits=1, wait_seconds=time.perf_counter() - started)
            self._count(takes=1)
            # Exactly the group's bytes: the copy into its slot is of its size, not the largest group's.
            return self.staging[self._ready[position]].data[: self.groups[position].nbytes]

    def release(self, position: int, fence: Any = None) -> None:
        """Gives back group `position`'s staging buffer; `fence` orders its reuse after the copy."""
        with self._cond:
            buffer = self._ready.pop(position)
            self._fences[buffer] = fence
            self._free.append(buffer)
            self._cond.notify_all()

    def rewind(self) -> None:
        """Restarts the read-ahead at the first group (the ring gave its slots back: its next pass starts
        at its first block); groups already read that the restart would read first are kept."""
        with self._cond:
            self._restart_at(0)

    def close(self) -> None:
        """Stops the thread (after the read in progress), closes the files, frees the buffers."""
        _RUNNING.discard(self)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()
        self._files.close()
        for slab in self.staging:
            slab.release()
