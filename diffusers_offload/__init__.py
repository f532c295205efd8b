"""diffusers-offload: run large diffusion pipelines on small accelerators.

Model-level swap and layer-wise weight streaming, attached through diffusers' hook registry; a memory
budget planner chooses between them.

Layout (a lower layer never imports a higher one): `engine/` is the mechanism (host slabs, the prefetch
ring, the swap set, hooks, `apply_placements`); `planning/` the policy (budgets, sizes, the planner);
`diffusers_offload.model_registry` (the repository's top-level `model_registry/` folder, installed inside
this package) declares each model's layout; this top level is the surface that composes them:
`pipeline.py` (the `OffloadMixin`), `report.py`, `cli.py`, `demo.py`.

The public names are imported on first use (PEP 562), so `import diffusers_offload` and the CLI's
`--help` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# In a source checkout the adapters live in the repository's top-level `model_registry/` folder; the
# wheel installs that folder as this package's `model_registry` subpackage (pyproject's package-dir), so
# it cannot collide with another distribution's top-level `model_registry`. Search the checkout's root
# too, so `diffusers_offload.model_registry` resolves the same way before and after installing.
_here = Path(__file__).resolve().parent
if not (_here / "model_registry").is_dir() and (_here.parent / "model_registry" / "adapter.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' notice that an image processor falls back to PIL because torchvision is absent.

    Importing diffusers' pipelines touches the CLIP/Siglip image processors, so without torchvision every
    run printed two such notices; nothing here uses those processors, and the PIL fallback is what we want.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_import_logger = logging.getLogger("transformers.utils.import_utils")  # transformers' own logger name
if not any(isinstance(f, _TorchvisionFallbackFilter) for f in _import_logger.filters):
    _import_logger.addFilter(_TorchvisionFallbackFilter())

# Public name -> the submodule that defines it.
_EXPORTS = {
    "OffloadHandle": ".engine",
    "Placement": ".engine",
    "apply_layerwise_offload": ".engine",
    "apply_model_offload": ".engine",
    "apply_placements": ".engine",
    "OffloadMixin": ".pipeline",
    "OffloadPipeline": ".pipeline",
    "attach": ".pipeline",
    "Plan": ".planning",
    "format_bytes": ".planning",
    "parse_bytes": ".planning",
    "plan_offload": ".planning",
    "OffloadReport": ".report",
}

__all__ = [
    "OffloadHandle",
    "OffloadMixin",
    "OffloadPipeline",
    "OffloadReport",
    "Placement",
    "Plan",
    "apply_layerwise_offload",
    "apply_model_offload",
    "apply_placements",
    "attach",
    "format_bytes",
    "parse_bytes",
    "plan_offload",
]

if TYPE_CHECKING:
    from .engine import (
        OffloadHandle,
        Placement,
        apply_layerwise_offload,
        apply_model_offload,
        apply_placements,
    )
    from .pipeline import OffloadMixin, OffloadPipeline, attach
    from .planning import Plan, format_bytes, parse_bytes, plan_offload
    from .report import OffloadReport


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
