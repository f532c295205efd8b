"""Pipeline integration: `OffloadMixin`, `attach` and `OffloadPipeline.from_pretrained`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .handle import OffloadHandle
from .placement import Placement, apply_placements
from .transfer import Copier

ENCODER_POLICIES = ("swap", "stream")


def _adapter_for(pipe: Any, adapter: Any | None) -> Any:
    if adapter is not None:
        return adapter
    from model_registry import get_adapter

    return get_adapter(pipe)


def placements_for(
    adapter: Any,
    modules: dict[str, torch.nn.Module],
    *,
    denoiser: str,
    prefetch: int = 1,
    resident_blocks: int | Sequence[int] = 0,
    encoders: str = "swap",
) -> dict[str, Placement]:
    """Placements from an adapter: the denoiser `denoiser` ("streamed"/"swapped"), encoders per
    `encoders` ("swap"/"stream"), everything else swapped."""
    if encoders not in ENCODER_POLICIES:
        raise ValueError(f"encoders must be one of {ENCODER_POLICIES}, got {encoders!r}.")
    if adapter.denoiser not in modules:
        raise ValueError(
            f"The pipeline has no component {adapter.denoiser!r} (components: {sorted(modules)}). "
            "Declare an adapter for it: see docs/adding-a-model.md."
        )
    placements = {}
    for name in modules:
        common = dict(
            entry_methods=tuple(adapter.entry_methods.get(name, ())),
            host_only=tuple(adapter.host_only.get(name, ())),
            resident_tensors=tuple(adapter.resident_tensors.get(name, ())),
        )
        blocks = tuple(adapter.block_paths(name))
        if name == adapter.denoiser and denoiser == "streamed":
            placements[name] = Placement("streamed", blocks, _as_tuple(resident_blocks), prefetch, **common)
        elif name != adapter.denoiser and encoders == "stream" and blocks:
            placements[name] = Placement("streamed", blocks, 0, prefetch, **common)
        else:
            placements[name] = Placement("swapped", **common)
    return placements


def _as_tuple(resident_blocks: int | Sequence[int]) -> int | tuple[int, ...]:
    return resident_blocks if isinstance(resident_blocks, int) else tuple(resident_blocks)


class OffloadMixin:
    """Adds `enable_model_offload`, `enable_layerwise_offload` and `disable_offload` to a pipeline."""

    _offload_handle: OffloadHandle | None = None

    @property
    def offload_handle(self) -> OffloadHandle | None:
        """The active offload handle, or None when offloading is disabled."""
        return self._offload_handle

    def _enable(self, kind: str, placements: dict[str, Placement], device: Any, pin_memory: Any, copier: Any):
        if self._offload_handle is not None:
            raise RuntimeError(
                f"Offloading ({self._offload_handle.kind}) is already enabled on this pipeline. "
                "Call pipe.disable_offload() first to switch strategy."
            )
        modules = _modules(self)
        self._offload_handle = apply_placements(
            modules, placements, device, pin_memory, kind=kind, copier=copier
        )
        return self._offload_handle

    def enable_model_offload(
        self,
        device: str | torch.device | None = None,
        *,
        pin_memory: bool | None = None,
        adapter: Any | None = None,
        copier: Copier | None = None,
    ) -> OffloadHandle:
        """Components (DiT, encoders, VAE) take turns on `device`: each is loaded just before it runs.

        `device=None` is the current accelerator (else the CPU, with a warning); `pin_memory=None` pins
        the host copies when the device is an accelerator.
        """
        adapter = _adapter_for(self, adapter)
        placements = placements_for(adapter, _modules(self), denoiser="swapped")
        return self._enable("model", placements, device, pin_memory, copier)

    def enable_layerwise_offload(
        self,
        device: str | torch.device | None = None,
        *,
        prefetch: int = 1,
        resident_blocks: int | Sequence[int] = 0,
        encoders: str = "swap",
        pin_memory: bool | None = None,
        adapter: Any | None = None,
        copier: Copier | None = None,
    ) -> OffloadHandle:
        """Streams the DiT's blocks to `device` block by block, `prefetch` blocks ahead.

        The DiT's other parts are on the device while it runs; encoders and VAE take turns with it
        whole (`encoders="swap"`) or stream their layers too (`encoders="stream"`, for encoders larger
        than the device). `resident_blocks`: how many blocks (spread evenly), or which, never stream.
        """
        adapter = _adapter_for(self, adapter)
        placements = placements_for(
            adapter,
            _modules(self),
            denoiser="streamed",
            prefetch=prefetch,
            resident_blocks=resident_blocks,
            encoders=encoders,
        )
        return self._enable("layerwise", placements, device, pin_memory, copier)

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


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    from model_registry import pipeline_modules

    return pipeline_modules(pipe)


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
