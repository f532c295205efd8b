"""Pipeline integration: `OffloadMixin`, `attach` and `OffloadPipeline.from_pretrained`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .engine import OffloadHandle, Placement, apply_placements
from .engine.devices import is_accelerator, resolve_device
from .engine.hooks import wrap_weight_editor
from .engine.loading import CheckpointWeights, ReadInto, pread_into
from .engine.transfer import Copier
from .host_budget import apply_ram_budget
from .model_registry import ModelAdapter, get_adapter, pipeline_modules
from .planning import Plan, measure_components, parse_bytes, plan_offload
from .planning.activations import estimate_for_components
from .report import OffloadReport, build_report
from .traffic import CallTracker, CallTraffic

# Left free when no budget is given: the CUDA context, other processes' allocations, fragmentation.
FREE_MEMORY_MARGIN = 0.9

# Raised by enable_*_offload(ram_budget=...) on a pipeline whose weights are already in memory.
RAM_BUDGET_NEEDS_FILES = (
    "ram_budget applies to offload loading: the weights it leaves on disk are read from the checkpoint "
    "files, but this pipeline's weights are already in memory (DiffusionPipeline.from_pretrained loaded "
    "them). Load with OffloadPipeline.from_pretrained(path, offload='layerwise', ram_budget=...) instead."
)

ENCODER_POLICIES = ("swap", "stream")
OFFLOAD_KINDS = ("auto", "model", "layerwise")

# Pipeline methods (diffusers' LoRA loader mixins, fused projections) that change component weights.
# Some reach the weights without a component method (text-encoder LoRA fuse/unload), so the whole call
# runs as one edit of the host copy.
PIPELINE_WEIGHT_EDITORS = (
    "load_lora_weights",
    "fuse_lora",
    "unfuse_lora",
    "set_adapters",
    "delete_adapters",
    "unload_lora_weights",
    "enable_lora",
    "disable_lora",
    "set_lora_device",
    "fuse_qkv_projections",
    "unfuse_qkv_projections",
)


def _adapter_for(pipe: Any, adapter: ModelAdapter | None) -> ModelAdapter:
    return adapter if adapter is not None else get_adapter(pipe)


def _declared(adapter: ModelAdapter, name: str) -> dict[str, tuple[str, ...]]:
    """The placement fields an adapter declares for component `name`, whatever its strategy."""
    return dict(
        entry_methods=tuple(adapter.entry_methods.get(name, ())),
        host_only=tuple(adapter.host_only.get(name, ())),
        resident_tensors=tuple(adapter.resident_tensors.get(name, ())),
    )


def placements_for(
    adapter: ModelAdapter,
    modules: dict[str, torch.nn.Module],
    *,
    denoiser: str,
    prefetch: int = 1,
    resident_blocks: int | Sequence[int] = 0,
    encoders: str = "swap",
) -> dict[str, Placement]:
    """Placements from an adapter: the denoiser and its experts `denoiser` ("streamed"/"swapped"), encoders
    per `encoders` ("swap"/"stream"), everything else swapped."""
    if encoders not in ENCODER_POLICIES:
        raise ValueError(f"encoders must be one of {ENCODER_POLICIES}, got {encoders!r}.")
    if adapter.denoiser not in modules:
        raise ValueError(
            f"The pipeline has no component {adapter.denoiser!r} (components: {sorted(modules)}). "
            "Declare an adapter for it: see docs/adding-a-model.md."
        )
    placements = {}
    # Experts taking turns hand over to each other: the next one's head is prefetched at the switch.
    experts = sum(adapter.role(name) == "denoiser" for name in modules) > 1
    for name in modules:
        common = _declared(adapter, name)
        blocks = tuple(adapter.block_paths(name))
        is_denoiser = adapter.role(name) == "denoiser"  # the denoiser or one of its experts
        if is_denoiser and denoiser == "streamed":
            placements[name] = Placement(
                "streamed", blocks, resident_blocks, prefetch, hand_over=experts, rest_ahead=experts, **common
            )
        elif not is_denoiser and encoders == "stream" and blocks:
            placements[name] = Placement("streamed", blocks, 0, prefetch, **common)
        else:
            placements[name] = Placement("swapped", **common)
    return placements


def placements_from_plan(
    adapter: ModelAdapter, modules: dict[str, torch.nn.Module], plan: Plan
) -> dict[str, Placement]:
    """Placements that carry out a planner's `Plan` (block indices refer to the adapter's block lists)."""
    placements = {}
    # Streamed experts hand over to each other; the plan says whether the next one's rest fits ahead.
    experts = {c.name for c in plan.components if c.role == "denoiser" and c.strategy == "streamed"}
    for name in modules:
        chosen = plan.component(name)
        common = _declared(adapter, name)
        if chosen.strategy == "streamed":
            placements[name] = Placement(
                "streamed",
                tuple(adapter.block_paths(name)),
                tuple(chosen.resident_blocks),
                chosen.prefetch,
                hand_over=len(experts) > 1 and name in experts,
                rest_ahead=chosen.rest_ahead,
                **common,
            )
        else:
            placements[name] = Placement(chosen.strategy, **common)
    return placements


def plan_for_pipeline(
    pipe: Any,
    vram_budget: int | str | None,
    device: torch.device,
    *,
    strategy: str,
    prefetch: int = 1,
    reserve: int | str | None = None,
    adapter: ModelAdapter | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    batch: int | None = None,
) -> Plan:
    """Plans `pipe`'s placement on `device` within `vram_budget` (None: the device's free memory).

    `reserve=None` is estimated from the call's `height`, `width`, `frames` and `batch` (the pipeline's
    defaults where None; see `planning.activations`).
    """
    adapter = _adapter_for(pipe, adapter)
    total = None
    if is_accelerator(device):
        free, total = torch.accelerator.get_memory_info(device)
        if vram_budget is None:
            vram_budget = int(free * FREE_MEMORY_MARGIN)
    elif vram_budget is None or (isinstance(vram_budget, str) and vram_budget.strip().endswith("%")):
        raise ValueError(
            f"The execution device is {device}, which reports no memory size: pass vram_budget as bytes or a "
            'string such as "8GiB".'
        )
    budget = parse_bytes(vram_budget, total=total)
    components = adapter.components(pipe)
    sizes = measure_components(components, adapter)
    activations = estimate_for_components(
        adapter,
        components,
        pipeline_class=type(pipe).__name__,
        pipeline_config=config if isinstance(config := getattr(pipe, "config", None), Mapping) else {},
        height=height,
        width=width,
        frames=frames,
        batch=batch,
    )
    # With the call's defaults (a guider's state is read from the pipeline): the traffic the plan reports.
    calls = adapter.calls.per_step(pipe=pipe)
    return plan_offload(
        sizes,
        budget,
        reserve=reserve,
        prefetch=prefetch,
        strategy=strategy,
        calls_per_step=calls,
        step_unit=adapter.step_unit,
        activations=activations,
    )


class OffloadMixin:
    """Adds `enable_model_offload`, `enable_layerwise_offload` and `disable_offload` to a pipeline."""

    _offload_handle: OffloadHandle | None = None
    # Set by offload loading: the checkpoint that the next enable_*_offload() reads the weights of
    # components built without them from (then closes).
    _weights_source: CheckpointWeights | None = None
    _last_call: CallTraffic | None = None  # what the last pipeline call moved, for offload_report()
    _offload_adapter: ModelAdapter | None = None  # the adapter offloading was enabled with

    @property
    def offload_handle(self) -> OffloadHandle | None:
        """The active offload handle, or None when offloading is disabled."""
        return self._offload_handle

    def _enable(
        self,
        kind: str,
        placements: dict[str, Placement],
        device: str | torch.device | None,
        pin_memory: bool | None,
        copier: Copier | None,
        plan: Plan | None = None,
        timing: bool = False,
        share_host_memory: bool = False,
        *,
        ram_budget: int | str | None = None,
        adapter: ModelAdapter | None = None,
    ) -> OffloadHandle:
        modules = pipeline_modules(self)
        host_plan = None
        if ram_budget is not None:
            if self._weights_source is None:
                raise ValueError(RAM_BUDGET_NEEDS_FILES)
            placements, host_plan = apply_ram_budget(
                self, _adapter_for(self, adapter), placements, ram_budget, resolve_device(device)
            )
        source, self._weights_source = self._weights_source, None
        try:
            handle = apply_placements(
                modules,
                placements,
                device,
                pin_memory,
                kind=kind,
                copier=copier,
                timing=timing,
                source=source,
                share_host_memory=share_host_memory,
            )
            unread = source.unread() if source is not None else []
            if unread:
                handle.remove()
                raise RuntimeError(
                    f"{len(unread)} tensors of the checkpoint were not placed (e.g. {unread[:3]}): a model "
                    "of the pipeline is not among its offloaded components. Load it with "
                    "DiffusionPipeline.from_pretrained and call enable_*_offload() instead."
                )
        finally:
            if source is not None:
                source.close()
        handle.plan = plan
        self._last_call = None
        handle.host_plan = host_plan
        for method in PIPELINE_WEIGHT_EDITORS:
            if callable(getattr(self, method, None)):
                undo = wrap_weight_editor(self, method, handle.edit_weights)
                handle.on_remove(lambda _target, undo=undo: undo())
        self._offload_handle = handle
        return handle

    def _check_not_enabled(self) -> None:
        if self._offload_handle is not None:
            raise RuntimeError(
                f"Offloading ({self._offload_handle.kind}) is already enabled on this pipeline. "
                "Call pipe.disable_offload() first to switch strategy."
            )

    def enable_offload(
        self,
        vram_budget: int | str | None = None,
        device: str | torch.device | None = None,
        *,
        prefetch: int = 1,
        reserve: int | str | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        batch: int | None = None,
        pin_memory: bool | None = None,
        timing: bool = False,
        ram_budget: int | str | None = None,
        adapter: ModelAdapter | None = None,
        copier: Copier | None = None,
        share_host_memory: bool = False,
    ) -> OffloadHandle:
        """Picks the fastest placement that fits `vram_budget`: everything resident if it fits, else model
        swap, else layer-wise streaming with as many blocks resident as fit.

        `vram_budget`: bytes, or a string such as "8GiB", "7.5GB" or "75%" (of the device's memory);
        `None` takes the device's free memory less a margin. `reserve` is kept free for activations;
        `None` estimates it from the calls you will make: `height`, `width`, `frames` (video) and `batch`
        (images or videos per call), the pipeline's defaults where None. Raises ValueError naming the
        minimum when the budget cannot hold it. `timing=True` stamps each
        streamed block's copy and compute for the timeline in `offload_report()` (off by default).
        `share_host_memory=True`: processes on this node that offload the same weights the same way
        share one host copy of them (docs/scale-out.md). `ram_budget` (offload loading only, see
        `OffloadPipeline.from_pretrained`): the streamed blocks that do not fit it stay on disk (swapped
        components and resident blocks keep a host copy).
        """
        self._check_not_enabled()
        adapter = self._offload_adapter = _adapter_for(self, adapter)
        device = resolve_device(device)
        plan = plan_for_pipeline(
            self,
            vram_budget,
            device,
            strategy="auto",
            prefetch=prefetch,
            reserve=reserve,
            adapter=adapter,
            height=height,
            width=width,
            frames=frames,
            batch=batch,
        )
        placements = placements_from_plan(adapter, pipeline_modules(self), plan)
        return self._enable(
            "auto",
            placements,
            device,
            pin_memory,
            copier,
            plan,
            timing,
            share_host_memory,
            ram_budget=ram_budget,
            adapter=adapter,
        )

    def offload_report(self) -> OffloadReport:
        """What is where and what has moved so far, and the last call's bytes per denoising step and per
        image or video next to the plan's; `print()` it, or show it in a notebook."""
        if self._offload_handle is None:
            raise RuntimeError("Offloading is not enabled on this pipeline; there is nothing to report.")
        return build_report(self._offload_handle, last_call=self._last_call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self._offload_handle
        if handle is None:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        # Counted per pipeline call (a forward hook per denoiser call, never per block).
        tracker = CallTracker(self, handle, self._offload_adapter or get_adapter(self), args, kwargs)
        with tracker:
            output = super().__call__(*args, **kwargs)  # type: ignore[misc]
        self._last_call = tracker.result
        return output

    def enable_model_offload(
        self,
        device: str | torch.device | None = None,
        *,
        pin_memory: bool | None = None,
        ram_budget: int | str | None = None,
        adapter: ModelAdapter | None = None,
        copier: Copier | None = None,
        share_host_memory: bool = False,
    ) -> OffloadHandle:
        """Components (DiT, encoders, VAE) take turns on `device`: each is loaded just before it runs.

        `device=None` is the current accelerator (else the CPU, with a warning); `pin_memory=None` pins
        the host copies when the device is an accelerator. `share_host_memory=True`: one host copy for
        every process on this node that offloads the same weights the same way (docs/scale-out.md).
        `ram_budget` (offload loading only) is checked, but a swapped component is held whole on the
        host: nothing of it can stay on disk.
        """
        self._check_not_enabled()
        adapter = self._offload_adapter = _adapter_for(self, adapter)
        placements = placements_for(adapter, pipeline_modules(self), denoiser="swapped")
        return self._enable(
            "model",
            placements,
            device,
            pin_memory,
            copier,
            share_host_memory=share_host_memory,
            ram_budget=ram_budget,
            adapter=adapter,
        )

    def enable_layerwise_offload(
        self,
        device: str | torch.device | None = None,
        *,
        prefetch: int = 1,
        resident_blocks: int | Sequence[int] = 0,
        encoders: str = "swap",
        vram_budget: int | str | None = None,
        reserve: int | str | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        batch: int | None = None,
        pin_memory: bool | None = None,
        timing: bool = False,
        ram_budget: int | str | None = None,
        adapter: ModelAdapter | None = None,
        copier: Copier | None = None,
        share_host_memory: bool = False,
    ) -> OffloadHandle:
        """Streams the DiT's blocks to `device` block by block, `prefetch` blocks ahead.

        The DiT's other parts are on the device while it runs; encoders and VAE take turns with it
        whole (`encoders="swap"`) or stream their layers too (`encoders="stream"`, for encoders larger
        than the device). `resident_blocks`: how many blocks (spread evenly), or which, never stream.
        With `vram_budget` ("8GiB", ...) the planner chooses the resident blocks (and streams encoders
        that cannot fit whole) instead, keeping `reserve` free (None: estimated from `height`, `width`,
        `frames` and `batch`, as for `enable_offload`). `timing=True` stamps each block's copy and compute
        for the timeline in `offload_report()` (a few events per block; off by default).
        `share_host_memory=True`: one host copy for every process on this node that offloads the same
        weights the same way, e.g. the ranks of `torchrun` (docs/scale-out.md). `ram_budget` (offload
        loading only, see `OffloadPipeline.from_pretrained`): streamed blocks that do not fit it stay on
        disk and are read ahead from the checkpoint files.
        """
        self._check_not_enabled()
        adapter = self._offload_adapter = _adapter_for(self, adapter)
        if vram_budget is not None:
            if resident_blocks != 0 or encoders != "swap":
                raise ValueError(
                    "Pass either vram_budget or resident_blocks/encoders, not both: the planner picks them."
                )
            device = resolve_device(device)
            plan = plan_for_pipeline(
                self,
                vram_budget,
                device,
                strategy="layerwise",
                prefetch=prefetch,
                reserve=reserve,
                adapter=adapter,
                height=height,
                width=width,
                frames=frames,
                batch=batch,
            )
            placements = placements_from_plan(adapter, pipeline_modules(self), plan)
            return self._enable(
                "layerwise",
                placements,
                device,
                pin_memory,
                copier,
                plan,
                timing,
                share_host_memory,
                ram_budget=ram_budget,
                adapter=adapter,
            )
        planned = dict(reserve=reserve, height=height, width=width, frames=frames, batch=batch)
        given = [name for name, value in planned.items() if value is not None]
        if given:
            raise ValueError(f"{given} apply to planning within a budget: pass vram_budget too.")
        placements = placements_for(
            adapter,
            pipeline_modules(self),
            denoiser="streamed",
            prefetch=prefetch,
            resident_blocks=resident_blocks,
            encoders=encoders,
        )
        return self._enable(
            "layerwise",
            placements,
            device,
            pin_memory,
            copier,
            timing=timing,
            share_host_memory=share_host_memory,
            ram_budget=ram_budget,
            adapter=adapter,
        )

    def disable_offload(self, device: str | torch.device | None = None) -> None:
        """Removes all offload hooks; weights become ordinary tensors again, bitwise as before.

        `device=None` puts each weight back where it was before offloading was enabled.
        """
        if self._offload_handle is None:
            raise RuntimeError(
                "Offloading is not enabled on this pipeline; call pipe.enable_model_offload() or "
                "pipe.enable_layerwise_offload() first."
            )
        self._offload_handle.remove(device)
        self._offload_handle = None

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

    def _refuse_other_offload(self, method: str) -> None:
        if self._offload_handle is not None:
            raise RuntimeError(
                f"diffusers-offload ({self._offload_handle.kind}) is enabled on this pipeline; {method}() "
                "would stack a second offloading scheme on its placeholders. Call pipe.disable_offload() "
                "first, or keep diffusers-offload alone."
            )

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_other_offload("enable_model_cpu_offload")
        return super().enable_model_cpu_offload(*args, **kwargs)  # type: ignore[misc]

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_other_offload("enable_sequential_cpu_offload")
        return super().enable_sequential_cpu_offload(*args, **kwargs)  # type: ignore[misc]

    def enable_group_offload(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_other_offload("enable_group_offload")
        return super().enable_group_offload(*args, **kwargs)  # type: ignore[misc]

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        if self._offload_handle is not None:
            raise RuntimeError(
                "Offloaded weights are placeholders and cannot be saved. Call pipe.disable_offload() "
                "first, then save_pretrained()."
            )
        return super().save_pretrained(*args, **kwargs)  # type: ignore[misc]


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
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        offload: str | None = None,
        vram_budget: int | str | None = None,
        device: str | torch.device | None = None,
        prefetch: int = 1,
        reserve: int | str | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        batch: int | None = None,
        pin_memory: bool | None = None,
        share_host_memory: bool = False,
        ram_budget: int | str | None = None,
        reader: ReadInto | None = None,
        **kwargs: Any,
    ) -> Any:
        """Loads a diffusers pipeline with the offloading methods; with `offload`, already offloaded.

        `offload=None`: `DiffusionPipeline.from_pretrained(...)` followed by `attach`. `offload="auto"`
        (the planner, within `vram_budget`), `"model"` (model swap) or `"layerwise"` (streaming; with
        `vram_budget`, the planner picks the resident blocks, keeping `reserve` free: None estimates it
        from `height`, `width`, `frames` and `batch`, see `enable_offload`): each diffusers/transformers
        model is built from its config without weights and every tensor is read once from its safetensors
        file straight into its host slab (resident ones onto `device`), so host memory never holds a second
        copy; a progress bar shows the bytes read. Other keywords (`dtype`, `variant`, components, ...) are
        `DiffusionPipeline.from_pretrained`'s. A missing or truncated file, or a checkpoint that does not
        match its config, raises `ValueError` naming the file before any weight byte is read.
        `share_host_memory=True`: the first process on this node to load these weights this way reads
        them into named shared memory; the others (torchrun ranks, serving workers) attach to that one
        copy instead of reading (docs/scale-out.md). `ram_budget` ("24GiB", "60%" of the machine's RAM)
        caps the host memory held for weights: the streamed blocks that do not fit stay in the checkpoint
        files and a background thread reads them ahead into two staging buffers while the blocks before
        them compute (`offload_report()` says whether the disk kept up). `reader`: advanced, reads the
        bytes (tests).
        """
        from diffusers import DiffusionPipeline
        from diffusers.utils.logging import tqdm

        planned = dict(reserve=reserve, height=height, width=width, frames=frames, batch=batch)
        if offload is None:
            extra = dict(
                vram_budget=vram_budget,
                device=device,
                pin_memory=pin_memory,
                ram_budget=ram_budget,
                reader=reader,
                share_host_memory=share_host_memory or None,
            )
            extra.update(planned)
            given = [name for name, value in extra.items() if value is not None]
            if given:
                raise ValueError(
                    f"{given} apply to offload loading: pass offload='auto', 'model' or 'layerwise'."
                )
            return attach(DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs))
        if offload not in OFFLOAD_KINDS:
            raise ValueError(f"offload must be one of {OFFLOAD_KINDS} or None, got {offload!r}.")
        if offload == "model" and vram_budget is not None:
            raise ValueError("offload='model' takes no vram_budget; use offload='auto' to plan within one.")
        given = [name for name, value in planned.items() if value is not None]
        if given and (offload == "model" or (offload == "layerwise" and vram_budget is None)):
            raise ValueError(
                f"{given} apply to planning within a budget: pass offload='auto', or 'layerwise' with a "
                "vram_budget."
            )
        from .loader import build_pipeline_without_weights

        pipe, weights = build_pipeline_without_weights(
            pretrained_model_name_or_path, reader or pread_into, **kwargs
        )
        pipe = attach(pipe)
        pipe._weights_source = weights  # read by the enable_*_offload() call below
        try:
            # diffusers' progress bar (diffusers.utils.logging.disable_progress_bar() turns it off).
            with tqdm(total=weights.total_bytes, unit="B", unit_scale=True, desc="Loading weights") as bar:
                weights.progress = bar.update
                if offload == "auto":
                    pipe.enable_offload(
                        vram_budget,
                        device,
                        prefetch=prefetch,
                        pin_memory=pin_memory,
                        share_host_memory=share_host_memory,
                        ram_budget=ram_budget,
                        **planned,
                    )
                elif offload == "model":
                    pipe.enable_model_offload(
                        device,
                        pin_memory=pin_memory,
                        share_host_memory=share_host_memory,
                        ram_budget=ram_budget,
                    )
                else:
                    pipe.enable_layerwise_offload(
                        device,
                        prefetch=prefetch,
                        vram_budget=vram_budget,
                        pin_memory=pin_memory,
                        share_host_memory=share_host_memory,
                        ram_budget=ram_budget,
                        **(planned if vram_budget is not None else {}),
                    )
        finally:
            pipe._weights_source = None
            weights.close()
        return pipe
