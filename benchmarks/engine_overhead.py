"""Hook overhead per block call: no hooks vs diffusers-offload vs diffusers' group offloading.

Runs on the CPU in well under a minute. An SD3 transformer with many tiny blocks is cloned four times;
the clones are called in turn (so machine noise hits all of them alike) and the median forward time of
each gives the time added per block call (also with `timing=True`, which stamps every block's copy and
compute for the report's timeline). Copies are included: with device="cpu" our engine still
copies every streamed block from its host slab into a ring slot.

    python benchmarks/engine_overhead.py [--blocks 48] [--runs 100]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from diffusers import SD3Transformer2DModel
from diffusers.hooks.group_offloading import apply_group_offloading

import diffusers_offload as dof


def tiny_transformer(blocks: int) -> SD3Transformer2DModel:
    """An SD3 MMDiT whose blocks are tiny (about 10 KB each), so hook overhead is not hidden by compute."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=blocks,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = tiny_transformer(args.blocks)
    ours, theirs, timed = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    model_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    block_bytes = sum(
        t.numel() * t.element_size() for b in base.transformer_blocks for t in [*b.parameters(), *b.buffers()]
    )
    handle = dof.apply_layerwise_offload(ours, device="cpu", prefetch=args.prefetch)
    dof.apply_layerwise_offload(timed, device="cpu", prefetch=args.prefetch, timing=True)
    apply_group_offloading(
        theirs, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )

    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, 4, 16, generator=gen),
        pooled_projections=torch.randn(1, 16, generator=gen),
        timestep=torch.tensor([500.0]),
    )
    models = {
        "no hooks": base,
        "diffusers-offload": ours,
        "  with timing=True": timed,
        "diffusers group offload": theirs,
    }
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

    # Each run calls the three models back to back; the per-run difference to "no hooks" cancels most of
    # the machine's drift, and its median over runs is what we report.
    base_times = times["no hooks"]
    per_block = block_bytes / args.blocks / 1024
    print(
        f"{args.blocks} blocks of {per_block:.1f} KiB, {args.runs} runs, prefetch={args.prefetch}, "
        f"torch {torch.__version__}, {platform.machine()}, 1 thread"
    )
    print(f"{'configuration':<26}{'forward (median)':>18}{'added per block call (median, IQR)':>38}")
    for name, values in times.items():
        added = sorted((t - b) / args.blocks * 1e6 for t, b in zip(values, base_times, strict=True))
        q1, q3 = added[len(added) // 4], added[3 * len(added) // 4]
        spread = f"{statistics.median(added):8.1f} us  ({q1:.0f}..{q3:.0f})"
        print(f"{name:<26}{statistics.median(values) * 1e3:>15.2f} ms{spread:>38}")
    print(f"host bytes held by diffusers-offload / bytes it offloads: {handle.host_bytes / block_bytes:.4f}")
    print(f"host bytes held by diffusers-offload / model bytes:       {handle.host_bytes / model_bytes:.4f}")
    print(f"on-demand loads: {handle.rings[0].stats.on_demand_loads} of {handle.rings[0].stats.loads}")


if __name__ == "__main__":
    main()
