"""What the benchmark measures besides step time: the floors, host-to-device bytes, memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..engine.devices import is_accelerator
from ..engine.transfer import make_copier


def synchronize(device: torch.device) -> None:
    if is_accelerator(device):
        torch.accelerator.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    """Seconds `work()` took, device work included."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux: /proc; elsewhere psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process (Linux): its private pages plus its share of every page it
    maps with others (a page mapped by N processes counts 1/N to each), so summing it over processes
    counts shared memory once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line.")


def reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS counter of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process since the last reset (Linux's VmHWM), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a copy from page-locked host memory to `device` (the CPU: host memcpy)."""
    pin = is_accelerator(device)
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    source.fill_(1)
    target.copy_(source, non_blocking=pin)  # warm-up: page faults, driver set-up
    seconds = timed(device, lambda: [target.copy_(source, non_blocking=pin) for _ in range(repeats)])
    return nbytes * repeats / seconds


class H2DCounter(TorchDispatchMode):
    """Counts the bytes every op copies from host memory to an accelerator while active.

    Sees copies issued on any stream, by us, by diffusers' group offloading or by accelerate's hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if src.device.type == "cpu" and is_accelerator(dst.device):
                self.bytes += src.numel() * src.element_size()
        elif func is torch.ops.aten._to_copy.default:
            src, target = args[0], kwargs.get("device")
            if src.device.type == "cpu" and target is not None and is_accelerator(torch.device(target)):
                self.bytes += src.numel() * src.element_size()
        return func(*args, **kwargs)


@contextmanager
def block_compute_times(blocks: list[torch.nn.Module], device: torch.device) -> Iterator[list[float]]:
    """Collects, per call, the milliseconds each block computed (events on an accelerator)."""
    copier = make_copier(device)
    spans: list[tuple[Any, Any]] = []
    open_stamps: dict[int, Any] = {}
    handles = []

    def before(module: torch.nn.Module, args: Any) -> None:
        open_stamps[id(module)] = copier.stamp()

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        spans.append((open_stamps.pop(id(module)), copier.stamp()))

    for block in blocks:
        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    times: list[float] = []
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()
        times.extend(copier.elapsed_ms(start, end) for start, end in spans)


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]
