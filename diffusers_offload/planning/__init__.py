"""The policy: budgets, component sizes, the planner and models built on `meta`; pure, no hooks or copies.
May use the engine's rules (`engine.blocks`) and model_registry's declarations; never the surface.
"""

from .budget import format_bytes, parse_bytes
from .planner import DEFAULT_RESERVE, Plan, plan_offload
from .sizing import ComponentSizes, measure_components

__all__ = [
    "DEFAULT_RESERVE",
    "ComponentSizes",
    "Plan",
    "format_bytes",
    "measure_components",
    "parse_bytes",
    "plan_offload",
]
