"""Per-model adapters, declarations only: the DiT, encoders and VAE of a pipeline and their block lists.
May use torch only; never diffusers_offload. Importing the package registers the shipped adapters.
"""

from . import (  # noqa: F401  (register on import)
    flux,
    flux2,
    hunyuan_video15,
    longcat_image,
    nextstep,
    ovis_image,
    qwen_image,
    sd3,
    wan,
    z_image,
)
from .adapter import ModelAdapter, find_module_lists, pipeline_modules, resolve_path
from .calls import DenoiserCalls
from .generic import generic_adapter
from .registry import get_adapter, list_adapters, lookup_adapter, register_adapter, unregister_adapter

__all__ = [
    "DenoiserCalls",
    "ModelAdapter",
    "find_module_lists",
    "generic_adapter",
    "get_adapter",
    "list_adapters",
    "lookup_adapter",
    "pipeline_modules",
    "register_adapter",
    "resolve_path",
    "unregister_adapter",
]
