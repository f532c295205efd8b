"""Host-to-device bytes of one pipeline call, per denoising step and per generated image or video.

While an offloaded pipeline runs, a forward hook on each denoiser (Wan 2.2's experts too) reads the
streamed bytes its rings have moved so far at the end of every denoiser call. The end of a call is the
same point of every call (its last block has run, the next call's first blocks are prefetched), so the
difference between the ends of consecutive steps is exactly what a step streams, CFG's second call
included. A step is ``calls_per_step`` denoiser calls, as the adapter declares for this call's arguments.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .engine import OffloadHandle
from .model_registry import ModelAdapter
from .planning import Plan, format_bytes


@dataclass(frozen=True)
class CallTraffic:
    """What one pipeline call moved, next to what its plan predicted (None without a plan)."""

    steps: int  # denoising steps: denoiser calls / calls_per_step
    calls_per_step: int  # denoiser calls per step for this call's arguments
    images: int  # images or videos the call generated
    bytes_per_step: int | None  # streamed denoiser bytes of one step (median over the steps; None < 2)
    bytes_moved: int  # every host-to-device byte of the call, all components
    planned_per_step: int | None = None
    planned_per_image: int | None = None
    step_unit: str = "denoising step"

    @property
    def bytes_per_image(self) -> int:
        """The call's bytes divided by the images or videos it made."""
        return self.bytes_moved // max(self.images, 1)

    def summary(self) -> str:
        def planned(value: int | None) -> str:
            return f" (plan {format_bytes(value)})" if value is not None else ""

        per_step = format_bytes(self.bytes_per_step) if self.bytes_per_step is not None else "-"
        calls = f" x {self.calls_per_step} denoiser calls" if self.calls_per_step != 1 else ""
        return (
            f"last call: {self.steps} {self.step_unit}s{calls}: {per_step} moved per {self.step_unit}"
            f"{planned(self.planned_per_step)}, {format_bytes(self.bytes_per_image)} per image/video"
            f"{planned(self.planned_per_image)}"
        )


def _images(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    prompt = kwargs.get("prompt", args[0] if args and isinstance(args[0], (str, list)) else None)
    prompts = len(prompt) if isinstance(prompt, list) else 1
    per_prompt = kwargs.get("num_images_per_prompt") or kwargs.get("num_videos_per_prompt") or 1
    return prompts * int(per_prompt)


class CallTracker:
    """``with CallTracker(pipe, handle, adapter, args, kwargs) as tracker: pipe(...)``, then
    ``tracker.result``."""

    def __init__(
        self,
        pipe: Any,
        handle: OffloadHandle,
        adapter: ModelAdapter,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        self._handle = handle
        self._adapter = adapter
        try:
            self._calls_per_step = adapter.calls.per_step(kwargs, pipe)
        except (TypeError, ValueError):  # an argument the rule cannot read: count every call as a step
            self._calls_per_step = 1
        self._images = _images(args, kwargs)
        self._rings = [
            record.ring
            for name, record in handle.components.items()
            if name in adapter.denoisers and record.ring is not None
        ]
        self._denoisers = [
            module for name in adapter.denoisers if (module := getattr(pipe, name, None)) is not None
        ]
        self._ends: list[int] = []
        self._hooks: list[Any] = []
        self.result: CallTraffic | None = None

    def _moved(self) -> int:
        total = 0
        for record in self._handle.components.values():
            for member in (record.member, *(m for own in record.host_only for m in own.members)):
                if member is not None:
                    total += member.bytes_moved
            if record.ring is not None:
                total += record.ring.bytes_moved
        return total

    def _streamed(self, *_: Any) -> None:
        self._ends.append(sum(ring.bytes_moved for ring in self._rings))

    def __enter__(self) -> CallTracker:
        self._before = self._moved()
        self._hooks = [module.register_forward_hook(self._streamed) for module in self._denoisers]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        if exc[0] is not None:
            return
        per = self._calls_per_step
        steps = len(self._ends) // per
        step_ends = self._ends[per - 1 :: per][:steps]
        differences = [b - a for a, b in zip(step_ends, step_ends[1:])]
        per_step = int(statistics.median(differences)) if differences else None
        plan: Plan | None = self._handle.plan
        planned_step = planned_image = None
        if plan is not None:
            # The plan was made for the pipeline's default guidance; this call may make more or fewer calls.
            planned_step = plan.bytes_moved_per_step // plan.calls_per_step * per
            planned_image = (steps * planned_step + plan.bytes_loaded_per_image) // max(self._images, 1)
        self.result = CallTraffic(
            steps=steps,
            calls_per_step=per,
            images=self._images,
            bytes_per_step=per_step,
            bytes_moved=self._moved() - self._before,
            planned_per_step=planned_step,
            planned_per_image=planned_image,
            step_unit=self._adapter.step_unit,
        )
