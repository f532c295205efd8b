"""Host slabs in named shared memory: one copy of the weights for every process on a node.

A `SharedSegment` is three files in a directory on a RAM file system (`/dev/shm` by default), named
after a key that fingerprints the weights and their packing layout:

* `<key>.lock`, the guard: held exclusively (flock) while a process creates, attaches to or removes
  the segment, so that N processes starting at once see one creator and N - 1 attachers;
* `<key>.data`, the slabs, each at a page-aligned offset; every process that maps it holds a shared
  flock on it for as long as it uses it, which the kernel drops when the process dies (kill -9 too);
* `<key>.json`, the manifest (each slab's name, offset, size and layout), written last and renamed into
  place: its presence is the "complete" marker. Data without a manifest is an incomplete segment whose
  creator died; it is removed and created again, never attached to.

The creator fills each slab through a writable mapping, then maps it read-only like every attacher
does; nobody writes into the segment after that (edits go to private copies, see `SharedSlab`).
A segment is removed by the last process that detaches, or, when that process was killed, by the next
process that opens any segment in the directory (a segment nobody holds a flock on is unused).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import time
import warnings
from pathlib import Path

import torch

from .host_memory import HostSlab

logger = logging.getLogger(__name__)

PREFIX = "diffusers-offload-"
DEFAULT_DIRECTORY = "/dev/shm"
# How long a process waits for another one to finish packing the segment it wants.
DEFAULT_TIMEOUT_S = 600.0
DIRECTORY_ENV = "DIFFUSERS_OFFLOAD_SHM_DIR"
TIMEOUT_ENV = "DIFFUSERS_OFFLOAD_SHM_TIMEOUT"
_POLL_S = 0.05
_PAGE = mmap.ALLOCATIONGRANULARITY

# cudaHostRegister flags: usable from every device's context; the pages are only read by the device
# (needed to page-lock a mapping that is not writable).
_CUDA_PORTABLE = 0x1
_CUDA_READ_ONLY = 0x8


def layout_digest(layout: object) -> str:
    """A short digest of a group's layout (offsets, dtypes, shapes), stored with each shared slab."""
    return hashlib.sha256(repr(layout).encode()).hexdigest()[:32]


def _quiet_frombuffer(buffer: mmap.mmap) -> torch.Tensor:
    # A read-only mapping makes torch warn that the tensor is writable: writing to it would fault,
    # which is what we want (nothing of ours writes into a shared slab).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8)


class SharedSlab:
    """One slab of a `SharedSegment`: `data` is a uint8 tensor over a read-only mapping of its region.

    The mapping lives as long as a tensor views it (it is never closed under a view). `editable()` is
    a private copy-on-write mapping of the same bytes: writes through it allocate private pages and
    never reach the segment, so an edit costs only the pages it touches.
    """

    shared = True
    __slots__ = ("data", "nbytes", "_fd", "_offset", "_registered", "_writable")

    def __init__(self, fd: int, offset: int, nbytes: int, *, writable: bool) -> None:
        self.nbytes = nbytes
        self._fd = fd
        self._offset = offset
        self._registered = False
        self._writable = writable
        self.data = self._map(mmap.PROT_READ | mmap.PROT_WRITE if writable else mmap.PROT_READ)

    def _map(self, prot: int, flags: int = mmap.MAP_SHARED) -> torch.Tensor:
        if self.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return _quiet_frombuffer(mmap.mmap(self._fd, self.nbytes, flags, prot, offset=self._offset))

    def seal(self, *, pin: bool, device_type: str) -> None:
        """After filling: maps the region read-only (the writable mapping goes with its last view) and
        page-locks it in place for `device_type` when `pin`."""
        if self._writable:
            self.data = self._map(mmap.PROT_READ)
            self._writable = False
        if pin and self.nbytes:
            self._pin(device_type)

    def _pin(self, device_type: str) -> None:
        if device_type != "cuda" or not torch.cuda.is_available():
            logger.warning(
                "Shared host memory cannot be page-locked for %s; it streams from pageable memory.",
                device_type,
            )
            return
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.data.data_ptr(), self.nbytes, _CUDA_PORTABLE | _CUDA_READ_ONLY)
        if int(err) != 0:
            # Devices without read-only registration: a writable shared mapping, registered as usual
            # (still never written: edits go to private copies).
            self.data = self._map(mmap.PROT_READ | mmap.PROT_WRITE)
            err = cudart.cudaHostRegister(self.data.data_ptr(), self.nbytes, _CUDA_PORTABLE)
            if int(err) != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {self.nbytes} bytes of shared host memory failed ({err}). "
                    "Pass pin_memory=False to stream from pageable memory (slower)."
                )
        self._registered = True

    def editable(self) -> torch.Tensor:
        """A private, writable copy-on-write view of the slab's bytes (see the class docstring)."""
        return self._map(mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)

    def release(self) -> None:
        """Unregisters and drops the mapping; views into it must no longer be used."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered = False
        self.data = torch.empty(0, dtype=torch.uint8)


def _directory() -> Path:
    return Path(os.environ.get(DIRECTORY_ENV, DEFAULT_DIRECTORY))


def _timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def _try_lock(path: Path, operation: int) -> int | None:
    """An fd of `path` (created if missing) holding a non-blocking flock `operation`, or None if busy.

    A lock taken on a file that another process unlinked in between would guard nothing: the fd must
    still be the file at `path`.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return _try_lock(path, operation)
    return fd


def _unlink(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def reclaim_unused(directory: Path | None = None) -> list[str]:
    """Removes every segment in `directory` that no process uses (its users exited or were killed, or
    its creator died while packing); returns their keys. Segments in use or being created are skipped."""
    directory = directory or _directory()
    removed = []
    for lock_path in sorted(directory.glob(f"{PREFIX}*.lock")):
        key = lock_path.name[len(PREFIX) : -len(".lock")]
        segment = SharedSegment(key, directory)
        try:
            guard = _try_lock(lock_path, fcntl.LOCK_EX)
        except PermissionError:
            continue  # another user's segment
        if guard is None:
            continue  # being created, attached to or removed right now
        try:
            if segment._unused():
                _unlink(segment.data_path, segment.manifest_path, lock_path)
                removed.append(key)
        finally:
            os.close(guard)
    return removed


class SharedSegment:
    """The named shared slabs of one offload (see the module docstring); `open()` makes one."""

    def __init__(self, key: str, directory: Path) -> None:
        self.key = key
        self.directory = directory
        base = directory / f"{PREFIX}{key}"
        self.lock_path = base.with_name(base.name + ".lock")
        self.data_path = base.with_name(base.name + ".data")
        self.manifest_path = base.with_name(base.name + ".json")
        self.role = ""  # "created" or "attached"
        self.entries: list[dict] = []
        self.size = 0
        self.private_slabs = 0  # slabs that fell back to a private copy
        self._guard: int | None = None
        self._fd: int | None = None
        self._next = 0
        self._no_space = False

    @classmethod
    def open(
        cls, key: str, directory: str | Path | None = None, timeout: float | None = None
    ) -> SharedSegment:
        """Attaches to the complete segment `key`, or creates it (then the caller fills every slab and
        calls `finish`). Waits up to `timeout` seconds while another process creates it. Raises OSError
        when the directory cannot hold files at all (the caller falls back to private slabs)."""
        directory = Path(directory) if directory is not None else _directory()
        timeout = _timeout() if timeout is None else timeout
        reclaim_unused(directory)
        segment = cls(key, directory)
        deadline = time.monotonic() + timeout
        while (guard := _try_lock(segment.lock_path, fcntl.LOCK_EX)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Timed out after {timeout:.0f} s waiting for another process ({segment._creator()}) to "
                    f"pack the shared host memory {segment.data_path}. Set {TIMEOUT_ENV} to wait longer, "
                    "or pass share_host_memory=False."
                )
            time.sleep(_POLL_S)
        segment._guard = guard
        try:
            if segment.manifest_path.exists() and segment.data_path.exists():
                segment._attach()
            else:
                segment._create()
        except BaseException:
            segment._release_guard()
            raise
        return segment

    def _creator(self) -> str:
        try:
            return f"pid {self.lock_path.read_text().strip() or '?'}"
        except OSError:
            return "pid ?"

    def _unused(self) -> bool:
        if not self.data_path.exists():
            return True
        probe = _try_lock(self.data_path, fcntl.LOCK_EX)
        if probe is None:
            return False
        os.close(probe)
        return True

    def _attach(self) -> None:
        manifest = json.loads(self.manifest_path.read_text())
        self.entries = manifest["slabs"]
        self.size = manifest["size"]
        self._fd = os.open(self.data_path, os.O_RDWR)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        self.role = "attached"
        self._release_guard()
        self._register_exit()

    def _create(self) -> None:
        # Data without a manifest: its creator died while packing. Never attached to: made again.
        _unlink(self.data_path)
        os.ftruncate(self._guard, 0)
        os.write(self._guard, str(os.getpid()).encode())
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        self.role = "created"
        self._register_exit()

    def _register_exit(self) -> None:
        # A process that exits without removing its offload still detaches (a killed one cannot: the
        # kernel drops its flock, and the next `open` in the directory reclaims the segment).
        atexit.register(self.detach)

    def _release_guard(self) -> None:
        if self._guard is not None:
            os.close(self._guard)
            self._guard = None

    def slab(self, name: str, nbytes: int, layout: object, pin: bool, device_type: str) -> tuple:
        """The next slab, in packing order: `(slab, filled)`. Attached: the creator's bytes (`filled`);
        created: a writable region to fill, then `slab.seal(...)`. A slab the segment cannot hold (no
        space left, or a layout other than the creator's) is a private `HostSlab`, with a warning."""
        index, self._next = self._next, self._next + 1
        digest = layout_digest(layout)
        if self.role == "attached":
            entry = self.entries[index] if index < len(self.entries) else None
            if entry is not None and (entry["name"], entry["nbytes"], entry["layout"]) == (
                name,
                nbytes,
                digest,
            ):
                slab = SharedSlab(self._fd, entry["offset"], nbytes, writable=False)
                slab.seal(pin=pin, device_type=device_type)
                return slab, True
            reason = (
                "the creator kept it private" if entry is None else "its layout differs from the creator's"
            )
            return self._private(name, nbytes, pin, device_type, reason), False
        offset = (self.size + _PAGE - 1) // _PAGE * _PAGE
        if not self._no_space:
            try:
                # Reserved now: writing into a mapping of a full tmpfs would kill the process (SIGBUS).
                if nbytes:
                    os.posix_fallocate(self._fd, offset, nbytes)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
                self._no_space = True
                os.ftruncate(self._fd, self.size)  # give back a partial reservation
        if self._no_space:
            return self._private(name, nbytes, pin, device_type, f"no space left in {self.directory}"), False
        self.size = offset + nbytes
        self.entries.append(dict(name=name, offset=offset, nbytes=nbytes, layout=digest))
        return SharedSlab(self._fd, offset, nbytes, writable=True), False

    def _private(self, name: str, nbytes: int, pin: bool, device_type: str, reason: str) -> HostSlab:
        if not self.private_slabs:
            logger.warning(
                "Shared host memory %s: %s; %s and later slabs are private copies.",
                self.data_path,
                reason,
                name,
            )
            warnings.warn(
                f"Shared host memory: {reason}; {name} (and slabs after it) use a private copy in this "
                "process. Free space in the directory (df -h /dev/shm) or set "
                f"{DIRECTORY_ENV} to a larger RAM file system.",
                RuntimeWarning,
                stacklevel=4,
            )
        self.private_slabs += 1
        return HostSlab(nbytes, pin=pin, device_type=device_type)

    def finish(self) -> None:
        """Created: writes the manifest (the segment is complete from now on) and lets waiters attach."""
        if self.role != "created" or self._guard is None:
            return
        manifest = dict(key=self.key, size=self.size, slabs=self.entries, creator=os.getpid())
        staging = self.manifest_path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(manifest))
        os.replace(staging, self.manifest_path)
        self._release_guard()

    def detach(self) -> None:
        """Stops using the segment; the last process removes it. A creator that did not finish removes
        its incomplete data. Idempotent."""
        if self._fd is None:
            return
        atexit.unregister(self.detach)
        incomplete = self._guard is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if incomplete:
            _unlink(self.data_path)
            self._release_guard()
            return
        guard = _try_lock(self.lock_path, fcntl.LOCK_EX)
        if guard is None:
            return  # another process is attaching: it uses the segment now
        try:
            if self._unused():
                _unlink(self.data_path, self.manifest_path, self.lock_path)
        finally:
            os.close(guard)
