"""Reading safetensors checkpoints straight into the buffers that will hold the weights.

A `CheckpointWeights` binds the tensors of modules built without weights (host stand-ins of the right
shape and dtype) to the entries of their safetensors files. Packing then reads each tensor's bytes
from the file directly into its view of the host slab (or into a device tensor for resident weights):
one read, no state dict, no memory map left alive. Every file's header is read and checked before any
byte is: a missing or truncated file, an entry of the wrong shape or kind, or a tensor the checkpoint
lacks raise naming the file, before any memory is allocated.

The safetensors header is parsed here (8-byte little-endian length, then JSON) because the safetensors
library reads tensors into memory it allocates itself; we need them in memory we allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# The dtype names of the safetensors format.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

# Reads are issued in pieces of at most this size (Linux caps one read() at just under 2 GiB).
READ_CHUNK = 64 << 20

ReadInto = Callable[[int, int, memoryview], None]  # (fd, file offset, destination) -> fills destination


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as the model asks; the message names the file."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they are."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, Entry]:
    """The entries of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header).")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise CheckpointError(
                    f"{path}: truncated (its header claims {length} bytes, the file has {size}). "
                    "Download or save it again."
                )
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the checkpoint file is missing. Download or save it again.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON).") from None
    data_start = 8 + length
    entries: dict[str, Entry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, which we cannot read."
            )
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        expected = dtype.itemsize
        for dim in shape:
            expected *= dim
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {key!r} spans {end - begin} bytes, but {shape} of {dtype} needs {expected}."
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {data_start + end}, the file has {size}. "
                "Download or save it again."
            )
        entries[key] = Entry(path, key, dtype, shape, data_start + begin, end - begin)
    return entries


def read_checkpoint(files: Iterable[Path]) -> dict[str, Entry]:
    """The entries of every file (the shards of one checkpoint), by key."""
    entries: dict[str, Entry] = {}
    for path in files:
        entries.update(read_header(Path(path)))
    return entries


def pread_into(fd: int, offset: int, out: memoryview) -> None:
    """Fills `out` with the file's bytes from `offset`, in pieces; a short file raises."""
    done = 0
    while done < len(out):
        count = os.preadv(fd, [out[done : done + READ_CHUNK]], offset + done)
        if count == 0:
            raise CheckpointError(f"file descriptor {fd}: ended {len(out) - done} bytes early.")
        done += count


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "integer"


class CheckpointWeights:
    """The source of the bytes of tensors built without them: each bound to one checkpoint entry.

    `bind(tensors_by_name, entries)` binds the tensors of one module (names as in its `state_dict`,
    aliases of tied weights included) and checks them all; `read_into(tensor, out)` fills a CPU tensor,
    `load(tensor, device)` makes a new one. `reader` reads bytes (tests pass a slow one).
    """

    def __init__(self, reader: ReadInto = pread_into, progress: Callable[[int], None] | None = None) -> None:
        self._entries: dict[int, Entry] = {}
        self.reader = reader
        self.progress = progress  # called with the bytes of each tensor read
        self._fds: dict[Path, int] = {}
        self._read: set[int] = set()
        self.bytes_read = 0

    def bind(self, where: str, tensors: Mapping[str, torch.Tensor], entries: Mapping[str, Entry]) -> None:
        """Binds every tensor of `tensors` to the entry of its name; raises naming the files when a tensor
        is missing or does not match (shape, or a float read as an integer)."""
        files = sorted({str(e.path) for e in entries.values()}) or ["(no files)"]
        missing = []
        for name, tensor in tensors.items():
            entry = entries.get(name)
            if entry is None:
                if id(tensor) not in self._entries:
                    missing.append(name)
                continue
            if entry.shape != tuple(tensor.shape):
                raise CheckpointError(
                    f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, but {where}'s config "
                    f"makes it {list(tensor.shape)}. The checkpoint does not match the config next to it."
                )
            if _kind(entry.dtype) != _kind(tensor.dtype):
                raise CheckpointError(
                    f"{entry.path}: tensor {name!r} is stored as {entry.dtype}, but {where} holds it as "
                    f"{tensor.dtype}: a {_kind(entry.dtype)} tensor cannot become a "
                    f"{_kind(tensor.dtype)} one. The checkpoint does not match the model."
                )
            self._entries.setdefault(id(tensor), entry)
        # A tied weight may be stored under any one of its names: missing only if no alias bound it.
        missing = [name for name in missing if id(tensors[name]) not in self._entries]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(
                f"{', '.join(files)}: {where}'s checkpoint lacks {len(missing)} tensors its config needs "
                f"({shown}). The checkpoint does not match the config next to it."
            )

    def covers(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._entries

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: the checkpoint file disappeared while loading.") from None
        return fd

    def read_into(self, tensor: torch.Tensor, out: torch.Tensor) -> None:
        """Reads `tensor`'s bytes into `out` (contiguous, on the CPU, `tensor`'s shape and dtype); a
        stored dtype other than `out`'s is converted through one temporary tensor."""
        entry = self._entries[id(tensor)]
        target = out if entry.dtype == out.dtype else torch.empty(entry.shape, dtype=entry.dtype)
        try:
            self.reader(self._fd(entry.path), entry.start, byte_view(target))
        except CheckpointError as error:
            raise CheckpointError(f"{entry.path}: reading {entry.key!r} failed: {error}") from None
        if target is not out:
            out.copy_(target)
        self._read.add(id(tensor))
        self.bytes_read += entry.nbytes
        if self.progress is not None:
            self.progress(entry.nbytes)

    def locate(self, tensor: torch.Tensor) -> Entry | None:
        """Where `tensor`'s bytes are in its file (None if it is not bound), for a reader that reads
        them later itself (the disk tier); the tensor counts as placed."""
        entry = self._entries.get(id(tensor))
        if entry is not None and id(tensor) not in self._read:
            self._read.add(id(tensor))
            if self.progress is not None:
                self.progress(entry.nbytes)  # placed: a progress bar of the load completes
        return entry

    def load(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A new tensor on `device` with `tensor`'s bytes (read on the host, then copied)."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        self.read_into(tensor, host)
        return host if device.type == "cpu" else host.to(device)

    def provided_elsewhere(self, tensor: torch.Tensor) -> None:
        """Counts `tensor` as placed without reading it (its bytes came from a shared copy)."""
        self._read.add(id(tensor))
        if self.progress is not None:
            self.progress(self._entries[id(tensor)].nbytes)

    def identity(self, tensor: torch.Tensor) -> str:
        """Where `tensor`'s bytes come from: its file and key (see `fingerprint` for the files)."""
        entry = self._entries[id(tensor)]
        # Resolved, so a relative path, another cwd or a symlink to the same file gives the same identity.
        return f"{entry.path.resolve()}:{entry.key}:{entry.dtype}"

    def fingerprint(self) -> str:
        """A digest of the identity of every bound file: resolved path, size, modification time and a
        hash of its header (names, dtypes, shapes, offsets). The tensors' bytes are not read: hashing
        them would cost as much as loading them; a file rewritten in place changes its mtime."""
        digest = hashlib.sha256()
        for path in sorted({e.path for e in self._entries.values()}):
            stat = path.stat()
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = hashlib.sha256(f.read(length)).hexdigest()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{header}\n".encode())
        return digest.hexdigest()

    def unread(self) -> list[str]:
        """Keys of the bound tensors not read yet."""
        return [e.key for i, e in self._entries.items() if i not in self._read]

    def close(self) -> None:
        """Closes the files; nothing of them stays open or mapped."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._entries.clear()


def release_views(modules: Iterable[torch.nn.Module], keep: Callable[[torch.Tensor], bool]) -> None:
    """Gives every buffer that is a view its own storage, in each module that holds it.

    `tensor.data = ...` keeps a view's `_base`, so a buffer made by `unsqueeze` of a tensor that lives
    in a memory-mapped checkpoint would keep the whole file mapped for as long as the module lives.
    Buffers for which `keep` is true (stand-ins a checkpoint will fill) are left alone.
    """
    replaced: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for name, buffer in module._buffers.items():
                if buffer is None or buffer._base is None or buffer.device.type == "meta" or keep(buffer):
                    continue
                own = replaced.get(id(buffer))
                if own is None:
                    own = replaced[id(buffer)] = buffer.detach().clone()
                module._buffers[name] = own
