"""Offloading modules you hold yourself (no pipeline): thin calls of `apply_placements`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .handle import OffloadHandle
from .placement import Placement, apply_placements
from .transfer import Copier


def apply_layerwise_offload(
    module: torch.nn.Module,
    block_lists: str | Sequence[str] = ("transformer_blocks",),
    device: str | torch.device | None = None,
    prefetch: int = 1,
    resident_blocks: int | Sequence[int] = 0,
    pin_memory: bool | None = None,
    *,
    timing: bool = False,
    copier: Copier | None = None,
    share_host_memory: bool = False,
) -> OffloadHandle:
    """Streams the blocks of `module` from host memory to `device` one by one while it runs.

    Args:
        module: the model (e.g. a diffusers transformer).
        block_lists: dotted paths of the `nn.ModuleList`s whose blocks stream, in execution order.
        device: execution device; `None` is the current accelerator (else the CPU, with a warning).
        prefetch: how many blocks ahead to copy while a block computes (0 = load on demand).
        resident_blocks: how many blocks (spread evenly) or which block indices stay on the device.
        pin_memory: page-lock the host copy; `None` pins when `device` is an accelerator.
        timing: stamp each block's copy and compute, for the timeline in `build_report(handle)`
            (costs a few events per block; off by default).
        copier: advanced: how copies are issued (tests use it to prove ordering).
        share_host_memory: keep the host copy in named shared memory, one copy for every process on
            this node that offloads the same weights the same way (docs/scale-out.md).

    Everything outside the block lists is moved to `device` and stays there. Call `handle.remove()`
    to undo.
    """
    placement = Placement("streamed", block_lists, resident_blocks, prefetch, rest_resident=True)
    # Keyed by class name, so that errors name the module as the caller knows it.
    name = type(module).__name__
    return apply_placements(
        {name: module},
        {name: placement},
        device,
        pin_memory,
        kind="layerwise",
        copier=copier,
        timing=timing,
        share_host_memory=share_host_memory,
    )


def apply_model_offload(
    components: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
    *,
    entry_methods: Mapping[str, Sequence[str]] | None = None,
    copier: Copier | None = None,
    share_host_memory: bool = False,
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
        share_host_memory: one host copy for every process on this node that offloads the same
            weights the same way (docs/scale-out.md).
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
    return apply_placements(
        named,
        placements,
        device,
        pin_memory,
        kind="model",
        copier=copier,
        share_host_memory=share_host_memory,
    )
