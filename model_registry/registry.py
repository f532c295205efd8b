"""Registry of :class:`ModelAdapter` declarations, looked up by pipeline class name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .adapter import ModelAdapter
from .generic import generic_adapter

_BY_NAME: dict[str, ModelAdapter] = {}
_BY_CLASS: dict[str, str] = {}  # pipeline class name -> adapter name


def register_adapter(adapter: ModelAdapter, *, overwrite: bool = False) -> ModelAdapter:
    """Register ``adapter`` for each of its ``pipeline_classes`` and return it.

    Registering an equal adapter again is a no-op. With ``overwrite=True`` an adapter of the same name is
    replaced, and pipeline classes served by other adapters are taken over.

    Raises:
        ValueError: if the name or one of the pipeline classes is taken and ``overwrite`` is false.
    """
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"register_adapter expects a ModelAdapter, got {type(adapter).__name__}")
    old = _BY_NAME.get(adapter.name)
    if old == adapter:
        return old
    if not overwrite:
        if old is not None:
            raise ValueError(
                f"an adapter named {adapter.name!r} is already registered "
                f"(serving {', '.join(old.pipeline_classes)}); pass overwrite=True to replace it"
            )
        taken = {cls: _BY_CLASS[cls] for cls in adapter.pipeline_classes if cls in _BY_CLASS}
        if taken:
            owners = ", ".join(f"{cls} -> {owner!r}" for cls, owner in taken.items())
            raise ValueError(
                f"pipeline classes already served: {owners}; pass overwrite=True to take them over"
            )
    if old is not None:
        for cls in old.pipeline_classes:
            if _BY_CLASS.get(cls) == old.name:
                del _BY_CLASS[cls]
    _BY_NAME[adapter.name] = adapter
    for cls in adapter.pipeline_classes:
        _BY_CLASS[cls] = adapter.name
    return adapter


def unregister_adapter(name: str) -> ModelAdapter:
    """Remove the adapter called ``name`` (and its class mappings); return it. ``KeyError`` if unknown."""
    adapter = _BY_NAME.pop(name)
    for cls in adapter.pipeline_classes:
        if _BY_CLASS.get(cls) == name:
            del _BY_CLASS[cls]
    return adapter


def list_adapters() -> list[ModelAdapter]:
    """Registered adapters, in registration order."""
    return list(_BY_NAME.values())


def _class_names(pipe: Any) -> list[str]:
    if isinstance(pipe, str):
        return [pipe]
    cls = pipe if isinstance(pipe, type) else type(pipe)
    return [klass.__name__ for klass in cls.__mro__]


def lookup_adapter(pipe: Any) -> ModelAdapter | None:
    """The registered adapter for a pipeline (instance, class or class name), walking the MRO; else None."""
    for name in _class_names(pipe):
        if name in _BY_CLASS:
            return _BY_NAME[_BY_CLASS[name]]
    return None


def get_adapter(pipe: Any, *, components: Mapping[str, nn.Module] | None = None) -> ModelAdapter:
    """The adapter for ``pipe``: by ``type(pipe).__name__`` walking the MRO, else :func:`generic_adapter`.

    ``pipe`` may also be a pipeline class or class name (as returned by ``build_meta_components``); the
    generic fallback then needs ``components``.

    Raises:
        ValueError: when nothing is registered and the generic rules do not fit (the message shows a
            ``register_adapter`` example).
    """
    found = lookup_adapter(pipe)
    if found is not None:
        return found
    class_name = _class_names(pipe)[0]
    if components is not None:
        return generic_adapter(components, pipeline_class=class_name)
    if isinstance(pipe, (str, type)):
        raise ValueError(
            f"no adapter is registered for {class_name}; pass the pipeline instance or components= for the "
            f"generic fallback, or register one (registered: {', '.join(sorted(_BY_CLASS)) or 'none'})"
        )
    return generic_adapter(pipe)
