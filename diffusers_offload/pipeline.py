"""Pipeline integration: `OffloadMixin`, `attach` and `OffloadPipeline.from_pretrained`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .devices import resolve_device, resolve_pin_memory
from .handle import OffloadHandle, ensure_not_offloaded
from .layerwise import apply_layerwise_offload, resolve_block_list
from .model_swap import apply_model_offload, attach_swap_entry
from .swap import SwapMember
from .transfer import Copier


def pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's `nn.Module` components by attribute name (diffusers' `components`, else attributes)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = vars(pipe)
    return {name: module for name, module in components.items() if isinstance(module, torch.nn.Module)}


def _adapter_for(pipe: Any, adapter: Any | None) -> Any:
    if adapter is not None:
        return adapter
    from model_registry import get_adapter

    return get_adapter(pipe)


class OffloadMixin:
    """Adds `enable_model_offload`, `enable_layerwise_offload` and `disable_offload` to a pipeline."""

    _offload_handle: OffloadHandle | None = None

    @property
    def offload_handle(self) -> OffloadHandle | None:
        """The active offload handle, or None when offloading is disabled."""
        return self._offload_handle

    def _check_can_enable(self) -> None:
        if self._offload_handle is not None:
            raise RuntimeError(
                f"Offloading ({self._offload_handle.kind}) is already enabled on this pipeline. "
                "Call pipe.disable_offload() first to switch strategy."
            )

    def enable_model_offload(
        self,
        device: str | torch.device | None = None,
        *,
        pin_memory: bool | None = None,
        adapter: Any | None = None,
        copier: Copier | None = None,
    ) -> OffloadHandle:
        """Components (DiT, encoders, VAE) take turns on `device`: each is loaded just before it runs."""
        self._check_can_enable()
        adapter = _adapter_for(self, adapter)
        modules = pipeline_modules(self)
        self._offload_handle = apply_model_offload(
            modules,
            device,
            pin_memory,
            entry_methods=_entry_methods(adapter, modules),
            copier=copier,
        )
        return self._offload_handle

    def enable_layerwise_offload(
        self,
        device: str | torch.device | None = None,
        *,
        prefetch: int = 1,
        resident_blocks: int | Sequence[int] = 0,
        pin_memory: bool | None = None,
        adapter: Any | None = None,
        copier: Copier | None = None,
    ) -> OffloadHandle:
        """Streams the DiT's blocks to `device` block by block; the other components take turns whole."""
        self._check_can_enable()
        adapter = _adapter_for(self, adapter)
        modules = pipeline_modules(self)
        denoiser = modules.get(adapter.denoiser)
        if denoiser is None:
            raise ValueError(
                f"{type(self).__name__} has no component {adapter.denoiser!r} to stream "
                f"(components: {sorted(modules)}). Declare an adapter (see docs/adding-a-model.md)."
            )
        # Validate everything before touching any weight: nothing is half-applied after an error.
        ensure_not_offloaded(modules.values())
        for path in adapter.block_lists:
            resolve_block_list(denoiser, path)
        device = resolve_device(device)
        pin = resolve_pin_memory(pin_memory, device)
        entry_methods = _entry_methods(adapter, modules)
        others = {name: module for name, module in modules.items() if module is not denoiser}

        handle = OffloadHandle("layerwise", device, pin)
        try:
            handle.children.append(
                apply_layerwise_offload(
                    denoiser, adapter.block_lists, device, prefetch, resident_blocks, pin, copier=copier
                )
            )
            if others:
                swap = apply_model_offload(
                    others,
                    device,
                    pin,
                    entry_methods={k: v for k, v in entry_methods.items() if k in others},
                    copier=copier,
                )
                handle.children.append(swap)
                # The DiT joins the swap set without weights: entering it pushes the encoders out.
                swap_set = swap.swap_sets[0]
                member = swap_set.add(SwapMember(adapter.denoiser, None))
                attach_swap_entry(handle, denoiser, swap_set, member, entry_methods.get(adapter.denoiser, ()))
        except BaseException:
            handle.remove()
            raise
        self._offload_handle = handle
        return handle

    def disable_offload(self, device: str | torch.device | None = None) -> None:
        """Removes all offload hooks; weights become ordinary tensors again, bitwise as before.

        `device=None` puts each weight back where it was before offloading was enabled.
        """
        if self._offload_handle is None:
            raise RuntimeError(
                "Offloading is not enabled on this pipeline; call pipe.enable_model_offload() or "
                "pipe.enable_layerwise_offload() first."
            )
        handle, self._offload_handle = self._offload_handle, None
        handle.remove(device)

    @property
    def _execution_device(self) -> torch.device:
        if self._offload_handle is not None:
            return self._offload_handle.device
        return super()._execution_device  # type: ignore[misc]

    def to(self, *args: Any, **kwargs: Any) -> Any:
        if self._offload_handle is not None:
            raise RuntimeError(
                "pipe.to() would move offloaded weights behind the offload hooks' back. "
                "Call pipe.disable_offload() first, or pass device= to enable_*_offload()."
            )
        return super().to(*args, **kwargs)  # type: ignore[misc]

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        if self._offload_handle is not None:
            raise RuntimeError(
                "Offloaded weights are placeholders and cannot be saved. Call pipe.disable_offload() "
                "first, then save_pretrained()."
            )
        return super().save_pretrained(*args, **kwargs)  # type: ignore[misc]


def _entry_methods(adapter: Any, modules: dict[str, torch.nn.Module]) -> dict[str, tuple[str, ...]]:
    """The adapter's entry methods for the components this pipeline actually has."""
    return {name: tuple(methods) for name, methods in adapter.entry_methods.items() if name in modules}


_MIXED_CLASSES: dict[type, type] = {}


def attach(pipe: Any) -> Any:
    """Mixes `OffloadMixin` into an existing pipeline instance (in place) and returns it."""
    if isinstance(pipe, OffloadMixin):
        return pipe
    base = type(pipe)
    mixed = _MIXED_CLASSES.get(base)
    if mixed is None:
        # Same name and module as the base class, so save_pretrained records the original class.
        mixed = type(base.__name__, (OffloadMixin, base), {"__module__": base.__module__})
        mixed.__qualname__ = base.__qualname__
        _MIXED_CLASSES[base] = mixed
    pipe.__class__ = mixed
    return pipe


class OffloadPipeline:
    """Loads a diffusers pipeline with offloading methods: `OffloadPipeline.from_pretrained(...)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "OffloadPipeline is not instantiated directly: use OffloadPipeline.from_pretrained(path, ...) "
            "or diffusers_offload.attach(pipe)."
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> Any:
        """`DiffusionPipeline.from_pretrained(...)` followed by `attach`."""
        from diffusers import DiffusionPipeline

        return attach(DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs))
