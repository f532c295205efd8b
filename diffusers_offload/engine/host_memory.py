"""Exact-size host slabs, optionally page-locked in place.

`torch.empty(..., pin_memory=True)` goes through the caching host allocator, which rounds every
request up to a power of two: a 40 GB model could hold 64 GB of pinned memory. We allocate an
ordinary tensor of exactly the bytes needed and register its pages with the driver instead.
"""

from __future__ import annotations

import torch


class HostSlab:
    """One contiguous uint8 host buffer of exactly `nbytes`, page-locked when `pin` is true."""

    __slots__ = ("data", "nbytes", "_registered_with")

    def __init__(self, nbytes: int, *, pin: bool, device_type: str = "cuda") -> None:
        self.nbytes = nbytes
        self.data = torch.empty(nbytes, dtype=torch.uint8)
        self._registered_with: str | None = None
        if pin and nbytes > 0:
            self._pin(device_type)

    def _pin(self, device_type: str) -> None:
        if device_type == "cuda" and torch.cuda.is_available():
            # cudaHostRegister page-locks the existing allocation: no rounding, no second copy.
            # Portable: page-locked for every device's context, not only the current one (cuda:1, ...).
            flags = 1  # cudaHostRegisterPortable
            err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.nbytes, flags)
            if int(err) != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {self.nbytes} bytes failed ({err}). "
                    "Pass pin_memory=False to stream from pageable memory (slower)."
                )
            self._registered_with = "cuda"
        else:
            # Other backends: fall back to the caching host allocator (rounded, but pinned).
            self.data = self.data.pin_memory()

    def release(self) -> None:
        """Unregister and drop the buffer; views into it must no longer be used."""
        if self._registered_with == "cuda":
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered_with = None
        self.data = torch.empty(0, dtype=torch.uint8)
