"""diffusers-offload: run large diffusion pipelines on small accelerators.

Model-level swap and layer-wise weight streaming, attached through diffusers' hook registry; a memory
budget planner chooses between them.

Layout (a lower layer never imports a higher one): `engine/` is the mechanism (host slabs, the prefetch
ring, the swap set, hooks, `apply_placements`); `planning/` the policy (budgets, sizes, the planner);
`model_registry` (a package of its own) declares each model's layout; this top level is the surface
that composes them: `pipeline.py` (the `OffloadMixin`), `report.py`, `cli.py`, `demo.py`.
"""

from .engine import OffloadHandle, Placement, apply_layerwise_offload, apply_model_offload, apply_placements
from .pipeline import OffloadMixin, OffloadPipeline, attach
from .planning import Plan, format_bytes, parse_bytes, plan_offload
from .report import OffloadReport

__version__ = "0.1.0"

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
