"""The hooks that drive the ring (a diffusers `ModelHook` per block) and the swap set (torch forward
pre-hooks), and wrappers for entry methods and for methods that read or edit weights.

Block hooks are attached through `diffusers.hooks.HookRegistry`, so they stack with diffusers' own hooks
(caches, layer skipping). The block hook is placed innermost whatever the order of enabling: a cache
that skips a block skips its load too (the ring tolerates the gap). Removal in any order is safe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .hook_chain import install_relinked_removal, move_innermost, uninstall_relinked_removal
from .ring import PrefetchRing
from .swap import SwapMember, SwapSet

HOOK_PREFIX = "diffusers_offload."
STREAMED_BLOCK_HOOK = HOOK_PREFIX + "streamed_block"
ARRIVING_BLOCK_HOOK = HOOK_PREFIX + "arriving_block"  # a resident block that may still be in flight

# Methods of torch, diffusers (PeftAdapterMixin, ModelMixin) and transformers models that read or change
# weights or add/remove layers. While offloaded they run on the host copy (`OffloadHandle.edit_weights`).
WEIGHT_EDITORS = (
    "state_dict",
    "save_pretrained",
    "num_parameters",
    "get_memory_footprint",
    "load_state_dict",
    "load_lora_adapter",
    "fuse_lora",
    "unfuse_lora",
    "unload_lora",
    "set_adapters",
    "set_adapter",
    "add_adapter",
    "load_adapter",
    "delete_adapters",
    "delete_adapter",
    "enable_lora",
    "disable_lora",
    "enable_adapters",
    "disable_adapters",
    "fuse_qkv_projections",
    "unfuse_qkv_projections",
)

# Component methods of diffusers that install another offloading or casting scheme on the weights.
CONFLICTING_METHODS = ("enable_group_offload", "enable_layerwise_casting")


class _NoBackward(torch.autograd.Function):
    """Passes a tensor through; its backward explains that offloaded weights cannot be trained."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "Offloaded weights are inference only: by backward time their device copies are gone (the "
            "weights point at other blocks' data or at placeholders). Run under torch.no_grad() or "
            "torch.inference_mode(), or call disable_offload() before training."
        )


def inference_only(output: Any) -> Any:
    """`output` with a backward that raises, when autograd records (it costs nothing under no_grad)."""
    if not torch.is_grad_enabled():
        return output
    if isinstance(output, torch.Tensor):
        return _NoBackward.apply(output) if output.requires_grad else output
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(inference_only(item) for item in output)
    if isinstance(output, dict):  # diffusers' BaseOutput, transformers' ModelOutput: items and attributes
        for key, value in list(output.items()):
            output[key] = inference_only(value)
    return output


class StreamedBlockHook(ModelHook):
    """Loads block `position` of `ring` before its forward and releases its slot afterwards.

    A block compiled on its own (`block.compile()`, `compile_repeated_blocks()`) is loaded around its
    compiled call instead (`load_around_compiled`): the ring's bookkeeping stays outside the graph, and
    the weights it re-points are the graph's inputs.
    """

    def __init__(self, ring: PrefetchRing, position: int) -> None:
        super().__init__()
        self.ring = ring
        self.position = position
        self.loaded_outside = False  # set while the block's compiled call loads it

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            if not self.loaded_outside:
                raise RuntimeError(
                    "Layer-wise offload streams each block's weights from Python between the blocks, "
                    "which cannot happen inside a compiled graph that spans several blocks. Compile the "
                    "repeated blocks instead: transformer.compile_repeated_blocks() or block.compile() "
                    "for each block (or use model offload, which compiles whole)."
                )
            return self.fn_ref.original_forward(*args, **kwargs)
        self.ring.acquire(self.position)
        try:
            return inference_only(self.fn_ref.original_forward(*args, **kwargs))
        finally:
            # Also on an exception, so that the slot's reuse stays ordered after the work queued so far.
            self.ring.release(self.position)


class LoadAroundCompiled:
    """Stands in for a streamed block's `_compiled_call_impl`: loads the block, then runs the compiled
    call (which reads the re-pointed weights as inputs), then releases the slot."""

    def __init__(self, compiled: Callable[..., Any], hook: StreamedBlockHook) -> None:
        self.compiled = compiled
        self.hook = hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ring, position = self.hook.ring, self.hook.position
        ring.acquire(position)
        try:
            return self.compiled(*args, **kwargs)
        finally:
            ring.release(position)


def load_around_compiled(block: torch.nn.Module, hook: StreamedBlockHook) -> Callable[[], None]:
    """Makes `block`'s compiled call, now or once `block.compile()` is called, load it outside the
    graph; returns the undo (the compiled call stays, unwrapped)."""

    def wrap() -> None:
        compiled = block._compiled_call_impl
        if compiled is not None and not isinstance(compiled, LoadAroundCompiled):
            block._compiled_call_impl = LoadAroundCompiled(compiled, hook)
            hook.loaded_outside = True

    def compile_and_wrap(*args: Any, **kwargs: Any) -> None:
        type(block).compile(block, *args, **kwargs)
        wrap()

    wrap()
    undo_compile = wrap_attribute(block, "compile", compile_and_wrap)

    def undo() -> None:
        undo_compile()
        compiled = block._compiled_call_impl
        if isinstance(compiled, LoadAroundCompiled):
            block._compiled_call_impl = compiled.compiled
        hook.loaded_outside = False

    return undo


def enter_on_forward(module: torch.nn.Module, swap_set: SwapSet, member: SwapMember) -> Callable[[], None]:
    """Before each forward of `module`, makes `member` the active one of `swap_set`; its outputs get a
    backward that says "inference only". Returns the undo.

    These are torch forward (pre-)hooks, not a diffusers hook: they run whatever `module.forward` is, so
    tools that replace a model's `forward` (cache-dit, accelerate) neither bypass nor capture them.
    """
    entered = module.register_forward_pre_hook(lambda _module, _args: swap_set.enter(member))
    guarded = module.register_forward_hook(lambda _module, _args, output: inference_only(output))

    def undo() -> None:
        entered.remove()
        guarded.remove()

    return undo


def register_hook(
    module: torch.nn.Module, hook: ModelHook, name: str, *, innermost: bool = False
) -> Callable[[], None]:
    """Registers `hook` on `module` (`innermost`: inside hooks registered before it, too); returns the
    function that removes it again.

    While it is registered, removing any hook of the registry re-links the chain correctly (see
    `hook_chain`), so ours and diffusers' hooks can be removed in any order.
    """
    created = not hasattr(module, "_diffusers_hook")
    had_own_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    install_relinked_removal(registry)
    if innermost:
        move_innermost(registry, name)

    def remove() -> None:
        registry.remove_hook(name, recurse=False)
        uninstall_relinked_removal(registry, HOOK_PREFIX)
        if not created or registry.hooks or getattr(module, "_diffusers_hook", None) is not registry:
            return
        # Leave no state behind that we introduced: the registry, and the bound `forward` the registry
        # sets on the instance when its last hook goes.
        del module._diffusers_hook
        forward = module.__dict__.get("forward")
        if not had_own_forward and getattr(forward, "__func__", None) is type(module).forward:
            del module.forward

    return remove


def wrap_entry_method(module: torch.nn.Module, method: str, before: Callable[[], None]) -> Callable[[], None]:
    """Runs `before()` whenever `module.<method>` is called (e.g. a VAE's `decode`); returns the undo."""
    if not callable(getattr(module, method, None)):
        raise ValueError(f"{type(module).__name__} has no method {method!r} to hook.")
    bound = getattr(module, method)

    @functools.wraps(bound)
    def entered(*args: Any, **kwargs: Any) -> Any:
        before()
        return bound(*args, **kwargs)

    return wrap_attribute(module, method, entered)


def wrap_weight_editor(
    owner: object, method: str, session: Callable[[], AbstractContextManager[None]]
) -> Callable[[], None]:
    """Runs `owner.<method>` inside `session()` (an edit of the host copy); returns the undo."""
    bound = getattr(owner, method)

    @functools.wraps(bound)
    def edited(*args: Any, **kwargs: Any) -> Any:
        with session():
            return bound(*args, **kwargs)

    return wrap_attribute(owner, method, edited)


def refuse_call(owner: object, method: str, name: str) -> Callable[[], None]:
    """Makes `owner.<method>` (another offloading scheme) raise while offloaded; returns the undo."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} is offloaded by diffusers-offload; {method}() would stack a second scheme on its "
            "placeholders. Call pipe.disable_offload() (or handle.remove()) first."
        )

    return wrap_attribute(owner, method, refused)


def refuse_moves(
    module: torch.nn.Module, name: str, allowed: Callable[[], bool] = lambda: False
) -> Callable[[], None]:
    """Makes `.to()`, `.cuda()`, `.half()`... on `module` raise while it is offloaded, unless `allowed()`
    (inside an edit of the host copy, which takes in whatever they did); returns the undo.

    They all go through `nn.Module._apply`, which would convert placeholders and device views behind
    the offload's back (a cast would be silently undone at the next load).
    """
    apply = module._apply

    def refused(*args: Any, **kwargs: Any) -> Any:
        if allowed():
            return apply(*args, **kwargs)
        raise RuntimeError(
            f"{name} is offloaded: moving or casting it (.to, .cuda, .half, ...) would act on offload "
            "placeholders. Call pipe.disable_offload() (or handle.remove()) first, then enable offloading "
            "again; to run in another dtype, load or cast the model before enabling offload."
        )

    return wrap_attribute(module, "_apply", refused)


def wrap_attribute(module: object, attribute: str, replacement: Callable[..., Any]) -> Callable[[], None]:
    """Sets an instance attribute shadowing a method; returns the undo (which restores any previous one)."""
    had_own = attribute in module.__dict__
    previous = module.__dict__.get(attribute)
    setattr(module, attribute, replacement)

    def undo() -> None:
        if had_own:
            setattr(module, attribute, previous)
        else:
            delattr(module, attribute)

    return undo
