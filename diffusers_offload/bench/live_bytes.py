"""Peak bytes of the tensors a piece of code creates, counted by a dispatch mode (works on the CPU).

The CPU allocator keeps no peak counter, so the activation estimates are checked by counting: every tensor
an operator returns is registered by its storage, and released when the last Python tensor over that
storage dies. Tensors that existed before (weights, inputs) are not counted; views add nothing. What a
kernel allocates internally and frees before returning (a workspace) is not seen either.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(exclude=model.parameters()) as live: model(x)``; then ``live.peak``.

    ``peak`` is the largest sum of live storages created inside the block, ``live`` what is still alive.
    ``exclude``: tensors whose storage is never counted (weights and inputs that in-place ops return).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._excluded = {_key(t) for t in exclude}
        self._storages: dict[int, list[int]] = {}  # storage key -> [bytes, live tensors over it]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        key = _key(tensor)
        if key in self._excluded or key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            nbytes = tensor.untyped_storage().nbytes()
            self._storages[key] = [nbytes, 1]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
