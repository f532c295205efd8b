"""Loading a pipeline straight into its offload layout: models built without weights, read into slabs.

`OffloadPipeline.from_pretrained(path, offload=...)` comes here. Each diffusers or transformers model
of the pipeline is built from its config without weights, given the dtypes its own `from_pretrained`
would give it, its tensors replaced by host stand-ins bound to the entries of its safetensors files
(every header checked first); the other components (scheduler, tokenizers) load as usual. Enabling the
offload then reads every tensor once, from the file into its group's host slab or onto the device.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .engine.loading import CheckpointError, CheckpointWeights, Entry, ReadInto, pread_into, read_checkpoint

logger = logging.getLogger(__name__)

# from_pretrained keywords that `DiffusionPipeline.download` also takes (to fetch a hub id first).
DOWNLOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "revision",
    "variant",
    "use_safetensors",
    "custom_pipeline",
    "custom_revision",
)
# Keywords whose loading we cannot reproduce by reading bytes: these load as usual, then offload.
UNSUPPORTED_KWARGS = ("quantization_config", "device_map", "low_cpu_mem_usage", "use_onnx", "dduf_file")


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one model folder: the shards its index names, or its one file."""
    infix = f".{variant}" if variant else ""
    indexes = sorted(folder.glob(f"*.safetensors.index{infix}.json"))
    if indexes:
        with open(indexes[0]) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [folder / shard for shard in shards]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise CheckpointError(
                f"{', '.join(missing)}: missing shard(s) named by {indexes[0]}. "
                "Download or save the model again."
            )
        return files
    singles = sorted(
        path
        for path in folder.glob("*.safetensors")
        if (path.name.endswith(f"{infix}.safetensors") and path.name.count(".") == 1 + bool(variant))
    )
    if len(singles) == 1:
        return singles
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    what = f"{len(singles)} candidate files" if singles else "no safetensors file"
    raise CheckpointError(
        f"{folder}: {what} for variant {variant!r} (files: {found}). Offload loading reads safetensors "
        "checkpoints: save the model with safe_serialization=True, or load it with "
        "DiffusionPipeline.from_pretrained and call enable_*_offload() on it."
    )


def _in_modules(name: str, modules: Any) -> bool:
    return any(f".{m}." in f".{name}." for m in modules or ())


def _model_class(library: str, class_name: str) -> type | None:
    """The nn.Module class a model_index entry names, if it is a diffusers or transformers model."""
    if library not in ("diffusers", "transformers"):
        return None
    cls = getattr(importlib.import_module(library), class_name, None)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls
    return None


def _component_dtype(torch_dtype: Any, name: str) -> Any:
    if isinstance(torch_dtype, Mapping):
        return torch_dtype.get(name, torch_dtype.get("default"))
    return torch_dtype


def _transformers_renamed(model: torch.nn.Module, entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """Entries under the names transformers' own loading gives them (its checkpoint conversion mapping
    renames legacy layouts, e.g. Mistral3's `language_model.model.*`); a key that needs converting
    (merging or splitting tensors) cannot be read byte for byte and raises."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: keys as saved
        return dict(entries)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return dict(entries)
    meta_state = model.state_dict()
    renamed = {}
    for key, entry in entries.items():
        name, converter = rename_source_key(
            key, renamings, converters, getattr(model, "base_model_prefix", None), meta_state
        )
        if converter is not None:
            raise CheckpointError(
                f"{entry.path}: tensor {key!r} must be converted ({converter}) to load into "
                f"{type(model).__name__}, which offload loading cannot do byte for byte. Load with "
                "DiffusionPipeline.from_pretrained and call enable_*_offload() instead."
            )
        renamed[name] = entry
    return renamed


def _checkpoint_keys(model: torch.nn.Module, entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """Entries by the model's own tensor names (a checkpoint saved with or without the base prefix)."""
    if type(model).__module__.startswith("transformers"):
        entries = _transformers_renamed(model, entries)
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name in (*model.state_dict(keep_vars=True), *_all_names(model)):
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in entries:
                found[name] = entries[candidate]
                break
    return found


def _stand_in(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor of `tensor`'s shape in `dtype` that holds one element (its bytes come later)."""
    stand_in = torch.empty((), dtype=dtype).expand(tensor.shape)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(stand_in, requires_grad=tensor.requires_grad)
    return stand_in


def _all_names(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, _ in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
    ]


def build_model_without_weights(
    cls: type, folder: Path, torch_dtype: Any = None, variant: str | None = None
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Entry]]:
    """`cls` built from the config in `folder` without weights, with the dtypes its `from_pretrained`
    gives; the stand-ins whose bytes its checkpoint provides, by every name; and the checkpoint's
    entries by tensor name (headers read and checked, no weight read)."""
    from accelerate import init_empty_weights

    entries = read_checkpoint(weight_files(folder, variant))
    transformers_model = cls.__module__.startswith("transformers")
    if transformers_model:
        config = cls.config_class.from_pretrained(folder)
        if torch_dtype is None or torch_dtype == "auto":
            # transformers' "auto": the config's dtype, else the checkpoint's first floating one.
            torch_dtype = getattr(config, "dtype", None) or next(
                (e.dtype for e in entries.values() if e.dtype.is_floating_point), torch.float32
            )
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        with init_empty_weights():
            model = cls._from_config(config)
        model.tie_weights()  # as its from_pretrained does: tied weights are stored once
        # Kept in float32: the strict list under fp16 and bf16, the other one under fp16 only.
        keep: set[str] = set()
        if torch_dtype in (torch.float16, torch.bfloat16):
            keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        if torch_dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        cast_buffers = False
    else:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        cast_buffers = torch_dtype is not None and not keep
        torch_dtype = torch_dtype or torch.float32
    by_name = _checkpoint_keys(model, entries)

    def target_dtype(name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        return torch.float32 if _in_modules(name, keep) else torch_dtype

    # Meta tensors cannot be re-pointed at host memory (`.data = view`), so each tensor the checkpoint
    # provides becomes a host stand-in of its shape and dtype that holds one element (a zero-stride
    # expand); packing reads its real bytes into its slab. Tied weights stay one Parameter.
    replaced: dict[int, torch.Tensor] = {}
    stand_ins: dict[str, torch.Tensor] = {}  # every name of every stand-in (tied weights have several)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for slots in (module._parameters, module._buffers):
            for key, tensor in slots.items():
                name = f"{module_name}.{key}" if module_name else key
                if tensor is None:
                    continue
                if id(tensor) in replaced:
                    slots[key] = replaced[id(tensor)]
                elif tensor.device.type == "meta" or name in by_name:
                    slots[key] = replaced[id(tensor)] = _stand_in(tensor, target_dtype(name, tensor))
                elif cast_buffers and tensor.is_floating_point():
                    slots[key] = tensor.to(torch_dtype)
                    continue
                else:
                    continue
                stand_ins[name] = slots[key]
    unexpected = set(entries) - {e.key for e in by_name.values()}
    if unexpected:
        logger.warning(
            "%s: %d checkpoint tensors are not used by %s (e.g. %s).",
            folder,
            len(unexpected),
            cls.__name__,
            sorted(unexpected)[:3],
        )
    return model.eval(), stand_ins, by_name


def build_pipeline_without_weights(
    path: str | Path, reader: ReadInto = pread_into, **kwargs: Any
) -> tuple[Any, CheckpointWeights]:
    """The pipeline at `path` (a folder or hub id) with its models built without weights, their stand-ins
    bound to their files (every header checked); nothing of the weights is read yet."""
    from diffusers import DiffusionPipeline

    unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(
            f"Offload loading does not take {unsupported}: load with DiffusionPipeline.from_pretrained(...) "
            "and call enable_*_offload() on the result instead."
        )
    folder = Path(path)
    if not folder.is_dir():
        download = {k: kwargs[k] for k in DOWNLOAD_KWARGS if k in kwargs}
        folder = Path(DiffusionPipeline.download(str(path), **download))
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{index_file}: missing; {folder} is not a diffusers pipeline folder.")
    with open(index_file) as f:
        index = json.load(f)
    # diffusers takes `dtype` (and, deprecated, `torch_dtype`).
    torch_dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    variant = kwargs.get("variant")
    weights = CheckpointWeights(reader)
    components: dict[str, torch.nn.Module] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in kwargs:
            continue
        cls = _model_class(*spec)
        if cls is None:
            continue
        model, stand_ins, by_name = build_model_without_weights(
            cls, folder / name, _component_dtype(torch_dtype, name), variant
        )
        weights.bind(name, stand_ins, by_name)
        components[name] = model
    # The pipeline's own class: through DiffusionPipeline, diffusers ignores a passed component that the
    # class lists as optional (Wan's transformers) and loads it from disk again.
    import diffusers

    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, DiffusionPipeline)):
        pipeline_class = DiffusionPipeline
    pipe = pipeline_class.from_pretrained(str(folder), **kwargs, **components)
    replaced = [name for name, model in components.items() if getattr(pipe, name, None) is not model]
    if replaced:
        raise RuntimeError(
            f"{folder}: {pipeline_class.__name__}.from_pretrained did not take the components {replaced} "
            "as given. Load with DiffusionPipeline.from_pretrained and call enable_*_offload() instead."
        )
    return pipe, weights
