"""Re-linking a diffusers `HookRegistry` chain: a hook placed innermost, and a removal that keeps the rest.

A registry chains its hooks through `HookFunctionReference`s: each hook calls the forward below it,
held in `fn_ref.original_forward` for hooks with a `new_forward` (caches, our block hook) and in
`fn_ref.forward` for the others. `HookRegistry.remove_hook` of a hook that is not the last one writes
the forward below it into the next hook's `fn_ref.forward` whatever that hook is, so a `new_forward`
hook above it is bypassed (a cache silently off, or our block hook skipped: the block then runs on
placeholders) and keeps a stale pointer to the removed hook. The functions here re-link the whole chain
from the forwards each hook presents to the one above it, which is correct for both kinds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry


def _below(fn_ref: Any) -> Callable[..., Any]:
    """The forward a hook calls beneath itself."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_below(fn_ref: Any, forward: Callable[..., Any]) -> None:
    if fn_ref.original_forward is not None:
        fn_ref.original_forward = forward
    else:
        fn_ref.forward = forward


def _chain(registry: HookRegistry) -> tuple[Callable[..., Any], list[Callable[..., Any]]]:
    """The module's own forward under all hooks, and the forward each hook presents above itself."""
    refs = registry._fn_refs
    above = [_below(refs[i + 1]) for i in range(len(refs) - 1)]
    above.append(registry._module_ref.forward)
    return _below(refs[0]), above


def _link(registry: HookRegistry, base: Callable[..., Any], above: list[Callable[..., Any]]) -> None:
    below = base
    for fn_ref, forward in zip(registry._fn_refs, above, strict=True):
        _set_below(fn_ref, below)
        below = forward
    registry._module_ref.forward = below


def move_innermost(registry: HookRegistry, name: str) -> None:
    """Moves hook `name` to the bottom of the chain: it runs right around the module's own forward,
    inside every other hook (a cache that skips the module then skips it too)."""
    index = registry._hook_order.index(name)
    if index == 0:
        return
    base, above = _chain(registry)
    for items in (registry._hook_order, registry._fn_refs, above):
        items.insert(0, items.pop(index))
    _link(registry, base, above)


def remove_relinked(registry: HookRegistry, name: str, recurse: bool = True) -> None:
    """`HookRegistry.remove_hook` that leaves every other hook of the chain in place and working."""
    if name in registry.hooks:
        base, above = _chain(registry)
        index = registry._hook_order.index(name)
        hook = registry.hooks.pop(name)
        registry._module_ref = hook.deinitalize_hook(registry._module_ref)
        for items in (registry._hook_order, registry._fn_refs, above):
            items.pop(index)
        if registry._fn_refs:
            _link(registry, base, above)
        else:
            registry._module_ref.forward = base
    if recurse:
        # The hook is gone here: this only walks the submodules, each with its own registry's method.
        HookRegistry.remove_hook(registry, name, recurse=True)


def install_relinked_removal(registry: HookRegistry) -> None:
    """Makes `registry.remove_hook` (also when diffusers calls it, e.g. `disable_cache()`) re-link
    correctly, for as long as the registry holds a hook of ours."""
    if "remove_hook" not in registry.__dict__:
        registry.remove_hook = functools.partial(remove_relinked, registry)


def uninstall_relinked_removal(registry: HookRegistry, prefix: str) -> None:
    """Undoes `install_relinked_removal` once no hook named `prefix...` is left in the registry."""
    if not any(name.startswith(prefix) for name in registry.hooks):
        registry.__dict__.pop("remove_hook", None)
