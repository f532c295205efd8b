"""`apply_model_offload`: whole components take turns on the execution device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .handle import OffloadHandle
from .placement import Placement, apply_placements
from .transfer import Copier


def apply_model_offload(
    components: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
    *,
    entry_methods: Mapping[str, Sequence[str]] | None = None,
    copier: Copier | None = None,
) -> OffloadHandle:
    """Keeps `components` in host memory and loads each one onto `device` just before it runs,
    evicting the others first (a model-level swap).

    Args:
        components: the models that take turns, as a list or a name -> module mapping.
        device: execution device; `None` is the current accelerator (else the CPU, with a warning).
        pin_memory: page-lock the host copies; `None` pins when `device` is an accelerator.
        entry_methods: name -> methods other than `forward` that enter that component, e.g.
            `{"vae": ("encode", "decode")}` (keys are indices as strings when a list is given).
        copier: advanced: how copies are issued.
    """
    named = (
        dict(components) if isinstance(components, Mapping) else {str(i): m for i, m in enumerate(components)}
    )
    entry_methods = dict(entry_methods or {})
    unknown = sorted(set(entry_methods) - set(named))
    if unknown:
        raise ValueError(f"entry_methods names unknown components {unknown}; components are {sorted(named)}.")
    placements = {
        name: Placement("swapped", entry_methods=tuple(entry_methods.get(name, ()))) for name in named
    }
    return apply_placements(named, placements, device, pin_memory, kind="model", copier=copier)
