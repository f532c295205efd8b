"""How many times one denoising step runs the denoiser, from a pipeline call's guidance arguments.

Pipelines differ: SD3 batches the conditional and unconditional predictions into one call of batch 2, while
Wan, Qwen-Image, FLUX.1's true CFG and HunyuanVideo-1.5's guider run them as two separate calls, so the
streamed blocks cross the bus twice per step. A declaration only; it is evaluated by the planner's callers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DenoiserCalls:
    """Denoiser calls per denoising step: 1, or 2 while classifier-free guidance runs as a separate call.

    Exactly one rule applies: ``guidance_argument`` (a ``__call__`` argument whose value above 1 turns the
    second call on, ``default`` being its default there, and ``needs_one_of`` arguments of which one must
    also be given, e.g. FLUX.1's negative prompt), or ``guider`` (a pipeline attribute holding a diffusers
    guider whose ``num_conditions`` decides; ``guider_calls`` is assumed when no pipeline is at hand).
    With neither, every step makes one call.
    """

    guidance_argument: str | None = None
    default: float = 1.0
    needs_one_of: tuple[str, ...] = ()
    guider: str | None = None
    guider_calls: int = 2

    def __post_init__(self) -> None:
        if self.guidance_argument is not None and self.guider is not None:
            raise ValueError("DenoiserCalls takes guidance_argument or guider, not both")
        if isinstance(self.needs_one_of, str):
            raise TypeError(f"needs_one_of must be a tuple of argument names; write ({self.needs_one_of!r},)")
        object.__setattr__(self, "needs_one_of", tuple(self.needs_one_of))
        if self.guider_calls < 1:
            raise ValueError(f"guider_calls must be at least 1, got {self.guider_calls}")

    def per_step(self, call: Mapping[str, Any] | None = None, pipe: Any = None) -> int:
        """Calls per step for a pipeline call with keyword arguments ``call`` (defaults where absent).

        ``pipe`` is only read for a guider rule; without it the guider's published default is assumed.
        """
        call = call or {}
        if self.guider is not None:
            guider = getattr(pipe, self.guider, None) if pipe is not None else None
            if guider is None:
                return self.guider_calls
            return int(guider.num_conditions) if getattr(guider, "_enabled", True) else 1
        if self.guidance_argument is None:
            return 1
        scale = call.get(self.guidance_argument)
        scale = self.default if scale is None else float(scale)
        if not scale > 1 or math.isnan(scale):
            return 1
        if self.needs_one_of and all(call.get(name) is None for name in self.needs_one_of):
            return 1
        return 2


ONE_CALL = DenoiserCalls()
