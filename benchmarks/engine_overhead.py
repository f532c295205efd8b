"""Hook overhead per block call: no hooks vs diffusers-offload vs diffusers' group offloading.

Runs on the CPU in well under a minute. A tiny SD3 transformer with many blocks is cloned three times;
the clones are called in turn (so machine noise hits all three alike) and the median forward time of
each gives the time added per block call. Copies are included: with device="cpu" our engine still
copies every streamed block from its host slab into a ring slot.

    python benchmarks/engine_overhead.py [--blocks 48] [--runs 40]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from diffusers.hooks.group_offloading import apply_group_offloading

import diffusers_offload as dof
from diffusers_offload.tiny.sd3 import build_tiny_sd3_transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--prefetch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = build_tiny_sd3_transformer(num_layers=args.blocks)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    model_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    block_bytes = sum(
        t.numel() * t.element_size() for b in base.transformer_blocks for t in [*b.parameters(), *b.buffers()]
    )
    handle = dof.apply_layerwise_offload(ours, device="cpu", prefetch=args.prefetch)
    apply_group_offloading(
        theirs, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )

    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, 4, 96, generator=gen),
        pooled_projections=torch.randn(1, 80, generator=gen),
        timestep=torch.tensor([500.0]),
    )
    models = {"no hooks": base, "diffusers-offload": ours, "diffusers group offload": theirs}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        reference = base(**inputs).sample
        for name, model in models.items():  # warm-up, and a correctness check
            assert torch.equal(model(**inputs).sample, reference), name
        for _ in range(args.runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.blocks} blocks, {args.runs} runs, prefetch={args.prefetch}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, 1 thread"
    )
    print(f"{'configuration':<26}{'forward (median)':>18}{'added per block call':>24}")
    for name, median in medians.items():
        added = (median - medians["no hooks"]) / args.blocks * 1e6
        print(f"{name:<26}{median * 1e3:>15.2f} ms{added:>21.1f} us")
    print(f"host bytes held by diffusers-offload / bytes it offloads: {handle.host_bytes / block_bytes:.4f}")
    print(f"host bytes held by diffusers-offload / model bytes:       {handle.host_bytes / model_bytes:.4f}")
    print(f"on-demand loads: {handle.rings[0].stats.on_demand_loads} of {handle.rings[0].stats.loads}")


if __name__ == "__main__":
    main()
