"""Best-effort adapter for pipelines nobody declared.

Rules, in order: the DiT is ``pipe.transformer``, else ``pipe.unet``, else the largest module component
that is neither a ``text_encoder*`` nor the VAE. Its blocks are the outermost ModuleLists whose entries are
all of a class named in the DiT class's ``_repeated_blocks``, else in ``_no_split_modules``, else the largest
ModuleList of identical-class entries. Block lists are taken in registration order, which the generic rules
assume to be the execution order. Encoders are the ``text_encoder*`` components, each streamed through its
largest ModuleList of identical-class entries (one list only: a VLM's vision tower is often not run at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .adapter import ModelAdapter, describe_module_lists, find_module_lists, pipeline_modules


def _numel(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _uniform_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of at least two entries that all share one class."""
    return [
        (name, ml)
        for name, ml in find_module_lists(module)
        if len(ml) >= 2 and len({type(m) for m in ml}) == 1
    ]


def _lists_of_classes(module: nn.Module, class_names: Iterable[str]) -> list[str]:
    """Outermost ModuleLists whose entries are all instances of the named classes, in registration order."""
    wanted = set(class_names)
    picked: list[str] = []
    for name, ml in find_module_lists(module):
        if any(name.startswith(p + ".") for p in picked):
            continue  # nested inside a list we already stream as whole blocks
        if all(type(m).__name__ in wanted for m in ml):
            picked.append(name)
    return picked


def _largest_uniform_list(module: nn.Module) -> str | None:
    lists = _uniform_lists(module)
    if not lists:
        return None
    return max(lists, key=lambda item: _numel(item[1]))[0]


def denoiser_block_lists(denoiser: nn.Module) -> tuple[tuple[str, ...], str]:
    """Block-list paths for a DiT/UNet and the rule that produced them (``()`` if none fits)."""
    for attr in ("_repeated_blocks", "_no_split_modules"):
        names = getattr(denoiser, attr, None) or ()
        paths = _lists_of_classes(denoiser, names) if names else []
        if paths:
            return tuple(paths), attr
    largest = _largest_uniform_list(denoiser)
    if largest is not None:
        return (largest,), "largest ModuleList of identical blocks"
    return (), "no rule matched"


def _pick_denoiser(modules: dict[str, nn.Module], vae: str | None) -> str | None:
    for attr in ("transformer", "unet"):
        if attr in modules:
            return attr
    candidates = {k: m for k, m in modules.items() if not k.startswith("text_encoder") and k != vae}
    if not candidates:
        return None
    return max(candidates, key=lambda k: _numel(candidates[k]))


def _example(
    pipeline_class: str, denoiser: str | None, encoders: list[str], vae: str | None, hint: str
) -> str:
    encoder_lines = "".join(f'        "{e}": (),  # or the dotted path of its layer list\n' for e in encoders)
    return (
        "Register an adapter for it, e.g.:\n\n"
        "    from diffusers_offload.model_registry import ModelAdapter, register_adapter\n\n"
        "    register_adapter(ModelAdapter(\n"
        f'        name="{pipeline_class.lower()}",\n'
        f'        pipeline_classes=("{pipeline_class}",),\n'
        f'        denoiser="{denoiser or "transformer"}",\n'
        f'        block_lists=("{hint}",),  # nn.ModuleList paths in the denoiser, in execution order\n'
        "        encoders={\n"
        f"{encoder_lines}"
        "        },\n"
        f"        vae={vae!r},\n"
        "    ))\n"
    )


def generic_adapter(pipe: Any, *, pipeline_class: str | None = None) -> ModelAdapter:
    """Derive an adapter for an undeclared pipeline (or ``{attr: module}`` dict) from its modules.

    Raises:
        ValueError: when no denoiser or no block list is found; the message shows a minimal
            ``register_adapter(ModelAdapter(...))`` example for this pipeline class.
    """
    if pipeline_class is None:
        pipeline_class = "UnknownPipeline" if isinstance(pipe, Mapping) else type(pipe).__name__
    modules = pipeline_modules(pipe)
    vae = "vae" if "vae" in modules else None
    encoder_attrs = sorted(k for k in modules if k.startswith("text_encoder"))
    denoiser = _pick_denoiser(modules, vae)
    if denoiser is None:
        raise ValueError(
            f"{pipeline_class}: no adapter registered and no denoiser found (module components: "
            f"{sorted(modules) or 'none'}).\n" + _example(pipeline_class, None, encoder_attrs, vae, "blocks")
        )
    block_lists, rule = denoiser_block_lists(modules[denoiser])
    if not block_lists:
        found = describe_module_lists(modules[denoiser])
        raise ValueError(
            f"{pipeline_class}: no adapter registered and the generic rules found no block list in "
            f"{denoiser} ({type(modules[denoiser]).__name__}: no _repeated_blocks or _no_split_modules "
            f"match, no ModuleList of identical blocks; ModuleLists: {found}).\n"
            + _example(pipeline_class, denoiser, encoder_attrs, vae, "blocks")
        )
    encoders = {}
    for attr in encoder_attrs:
        largest = _largest_uniform_list(modules[attr])
        encoders[attr] = (largest,) if largest else ()
    return ModelAdapter(
        name=f"generic:{pipeline_class}",
        pipeline_classes=(pipeline_class,),
        denoiser=denoiser,
        block_lists=block_lists,
        encoders=encoders,
        vae=vae,
        entry_methods={vae: ("encode", "decode")} if vae else {},
        notes=f"derived by generic_adapter: blocks from {rule}; execution order assumed = registration order",
    )
