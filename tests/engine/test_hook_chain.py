"""Re-linking diffusers' HookRegistry chains: every removal order keeps the other hooks working."""

import itertools

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_offload.engine.hooks import register_hook


class AddAfter(ModelHook):
    """A `new_forward` hook (like a cache's): adds `amount` to the output."""

    def __init__(self, amount: float) -> None:
        super().__init__()
        self.amount = amount

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) + self.amount


class ScaleInput(ModelHook):
    """A `pre_forward` hook: scales the input."""

    def pre_forward(self, module, x):
        return (x * 3,), {}


class Record(ModelHook):
    """Ours: a `new_forward` hook that records each call (innermost: it sees the raw input)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def new_forward(self, module, x):
        self.seen.append(x.item())
        return self.fn_ref.original_forward(x)


def expected(x: float, present: set[str]) -> float:
    # The hooks commute except for where `ours` sees the input: innermost, after the scaling.
    return (x * (3 if "scale" in present else 1)) * 2 + (5 if "add" in present else 0)


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("order", list(itertools.permutations(["add", "scale", "ours"])))
@pytest.mark.parametrize("removal", list(itertools.permutations(["add", "scale", "ours"])))
def test_any_registration_and_removal_order(order, removal):
    module = Double()
    ours = Record()
    removers = {}
    for name in order:
        if name == "ours":
            removers[name] = register_hook(module, ours, "diffusers_offload.test", innermost=True)
        else:
            hook = AddAfter(5) if name == "add" else ScaleInput()
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            registry = module._diffusers_hook
            removers[name] = lambda name=name, registry=registry: registry.remove_hook(name)
    present = set(order)
    x = torch.tensor(1.0)
    assert module(x).item() == expected(1.0, present)
    assert ours.seen == [3.0]
    # Checked up to and including our own removal; after it, removals are diffusers' alone (its
    # re-linking of its own hooks is as without offload).
    for name in removal[: removal.index("ours") + 1]:
        removers[name]()
        present.discard(name)
        assert module(x).item() == expected(1.0, present), (name, present)
        if "ours" in present:
            assert ours.seen[-1] == (3.0 if "scale" in present else 1.0)
    registry = getattr(module, "_diffusers_hook", None)
    assert registry is None or "remove_hook" not in registry.__dict__
