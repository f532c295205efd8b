"""diffusers-offload: run large diffusion pipelines on small accelerators.

Model-level swap and layer-wise weight streaming, attached through diffusers' hook registry.
"""

from .handle import OffloadHandle
from .layerwise import apply_layerwise_offload
from .model_swap import apply_model_offload
from .pipeline import OffloadMixin, OffloadPipeline, attach

__version__ = "0.1.0"

__all__ = [
    "OffloadHandle",
    "OffloadMixin",
    "OffloadPipeline",
    "apply_layerwise_offload",
    "apply_model_offload",
    "attach",
]
