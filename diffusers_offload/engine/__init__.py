"""The mechanism: weight groups in host slabs, copiers, the prefetch ring, the swap set, hooks, placement.
May use torch and diffusers' hook registry only; it knows no model, no budget and no pipeline.
"""

from .handle import OffloadHandle
from .placement import Placement, apply_placements
from .standalone import apply_layerwise_offload, apply_model_offload

__all__ = ["OffloadHandle", "Placement", "apply_layerwise_offload", "apply_model_offload", "apply_placements"]
