"""Resolving the execution device and what it supports (streams, pinned host memory)."""

from __future__ import annotations

import warnings

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the execution device; `None` means the current accelerator, else the CPU with a warning."""
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            warnings.warn(
                "No accelerator found: offloading runs on the CPU and saves no memory. "
                "Pass device='cpu' to silence this warning.",
                stacklevel=3,
            )
            return torch.device("cpu")
        device = accelerator
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError(
            "device='meta' holds no data and cannot run a model: pass the execution device, e.g. "
            "'cuda' or 'cpu' (weights on 'meta' must be loaded before offloading)."
        )
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def is_accelerator(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def resolve_pin_memory(pin_memory: bool | None, device: torch.device) -> bool:
    """`None` pins host memory exactly when the execution device is an accelerator."""
    if pin_memory is None:
        return is_accelerator(device)
    if pin_memory and not is_accelerator(device):
        raise ValueError(
            f"pin_memory=True needs an accelerator as execution device, got {device}. "
            "Pass pin_memory=None or False."
        )
    return bool(pin_memory)
