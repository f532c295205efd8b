"""Which blocks of a module stream: resolving block lists and choosing the blocks that stay resident."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def resolve_block_list(module: torch.nn.Module, path: str) -> torch.nn.ModuleList:
    """The `nn.ModuleList` at dotted `path` inside `module`, with an error that lists what exists."""
    target: object = module
    for part in path.split("."):
        target = getattr(target, part, None)
    if isinstance(target, (torch.nn.ModuleList, torch.nn.Sequential)) and len(target) > 0:
        return target  # type: ignore[return-value]
    lists = [
        name for name, sub in module.named_modules() if isinstance(sub, torch.nn.ModuleList) and len(sub)
    ]
    raise ValueError(
        f"{type(module).__name__} has no non-empty ModuleList at {path!r}. "
        f"Block lists it has: {lists or 'none'}. Pass block_lists=[...] with some of these "
        "(in execution order), or declare an adapter in model_registry."
    )


def resolve_blocks(module: torch.nn.Module, block_lists: str | Sequence[str]) -> list[torch.nn.Module]:
    """All blocks of `block_lists` in execution order; each block once."""
    if isinstance(block_lists, str):
        block_lists = (block_lists,)
    blocks = [block for path in block_lists for block in resolve_block_list(module, path)]
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError(
            f"block_lists {list(block_lists)} name the same block twice; list each ModuleList once."
        )
    return blocks


def check_prefetch(prefetch: int) -> None:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0 (blocks copied ahead), got {prefetch!r}.")


def spread_indices(n: int, k: int) -> tuple[int, ...]:
    """k of n indices spread evenly, starting at 0: gaps (and the tail to n) differ by at most 1."""
    return tuple(j * n // k for j in range(min(k, n)))


def resident_indices(resident_blocks: int | Sequence[int], total: int) -> set[int]:
    """Block indices to keep on the device: a count (spread evenly) or explicit indices."""
    if isinstance(resident_blocks, int):
        if not 0 <= resident_blocks <= total:
            raise ValueError(
                f"resident_blocks must be in [0, {total}] (the number of blocks), got {resident_blocks}."
            )
        return set(spread_indices(total, resident_blocks))
    chosen = set(resident_blocks)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < total)]
    if bad:
        raise ValueError(f"resident_blocks indices {bad} are out of range for {total} blocks.")
    return chosen
