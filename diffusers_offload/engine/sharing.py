"""Which shared segment an offload uses: a key that fingerprints the weights and their packing layout.

Two processes share host slabs only when the key is equal, so the key holds everything that decides
the slabs' bytes and layout: this package's version and alignment; per component, its name, class and
`Placement`; per tensor (in module order), its name, kind, dtype and shape; and the weights themselves:

* read from a checkpoint (`OffloadPipeline.from_pretrained(..., offload=...)`): the identity of its
  files (path, size, mtime, a hash of each header) and each tensor's file entry. Costs a stat and a
  header read per file (milliseconds), whatever the model's size;
* in memory (a pipeline loaded as usual, then `enable_*_offload`): a hash of every tensor's bytes
  (BLAKE2b, tensors hashed on several threads); costs a pass over the weights, see docs/scale-out.md.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .packing import ALIGNMENT, WeightSource, storage_leaves
from .shared_memory import SharedSegment


def _package_version() -> str:
    try:
        return importlib.metadata.version("diffusers-offload")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _bytes_digest(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().view(torch.uint8)
    # hashlib releases the GIL on large buffers: the threads hash in parallel.
    return hashlib.blake2b(memoryview(flat.numpy()), digest_size=32).digest()


def sharing_key(
    named: Mapping[str, torch.nn.Module], placements: Mapping[str, object], source: WeightSource | None
) -> str:
    """The key of the shared segment for offloading `named` with `placements` (see the module docstring)."""
    describe = hashlib.sha256()
    describe.update(f"diffusers-offload {_package_version()} alignment {ALIGNMENT}\n".encode())
    if source is not None:
        describe.update(f"checkpoint {source.fingerprint()}\n".encode())
    to_hash: list[torch.Tensor] = []
    seen: set[int] = set()
    for name, module in named.items():
        describe.update(f"component {name} {type(module).__qualname__} {placements[name]!r}\n".encode())
        for key, tensor in (*module.named_parameters(), *module.named_buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            for leaf in storage_leaves(tensor):
                describe.update(f"{key} {type(tensor).__name__} {leaf.dtype} {tuple(leaf.shape)}\n".encode())
                if source is not None and source.covers(leaf):
                    describe.update(f"  from {source.identity(leaf)}\n".encode())
                else:
                    to_hash.append(leaf)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for digest in pool.map(_bytes_digest, to_hash):
            describe.update(digest)
    return describe.hexdigest()[:40]


def open_segment(
    named: Mapping[str, torch.nn.Module], placements: Mapping[str, object], source: WeightSource | None
) -> SharedSegment | None:
    """The shared segment to pack into or attach to, or None (with a warning) where shared memory cannot
    be used at all: the offload then keeps a private copy."""
    key = sharing_key(named, placements, source)
    try:
        return SharedSegment.open(key)
    except OSError as error:
        warnings.warn(
            f"Shared host memory is not available ({error}); this process keeps a private copy of the "
            "weights. Check that /dev/shm is mounted and writable, or set DIFFUSERS_OFFLOAD_SHM_DIR.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
