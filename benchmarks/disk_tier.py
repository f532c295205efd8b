"""Seconds per transformer forward with its streamed blocks on the host vs on the disk tier (CPU).

The transformer saved in CHECKPOINT (config.json + safetensors) is loaded twice by offload loading, both
streamed layer-wise on the CPU: once with every block in host slabs, once with the blocks given by
--disk-fraction left in the file and read ahead by the disk reader. The two are called in turn (so
machine noise hits both alike) on the same inputs; the outputs must be bitwise equal. Prints the median
seconds per forward of each, host RSS, and what the disk reader counted (reads, waits on disk).

    python benchmarks/disk_tier.py /tmp/sd35m [--tokens 256] [--runs 3] [--disk-fraction 0.75]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from diffusers_offload.bench.measure import host_rss_bytes
from diffusers_offload.engine import Placement, apply_placements
from diffusers_offload.engine.blocks import spread_indices
from diffusers_offload.engine.loading import CheckpointWeights
from diffusers_offload.loader import build_model_without_weights
from diffusers_offload.planning import format_bytes


def load(folder: Path, disk_fraction: float) -> tuple[torch.nn.Module, object, float]:
    started = time.perf_counter()
    model, stand_ins, entries = build_model_without_weights(SD3Transformer2DModel, folder, torch.bfloat16)
    weights = CheckpointWeights()
    weights.bind("transformer", stand_ins, entries)
    count = len(model.transformer_blocks)
    disk = spread_indices(count, round(disk_fraction * count)) if disk_fraction else ()
    placement = Placement("streamed", ("transformer_blocks",), 0, 1, rest_resident=True, disk_blocks=disk)
    handle = apply_placements({"transformer": model}, {"transformer": placement}, "cpu", source=weights)
    weights.close()
    return model, handle, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (256: a 256x256 image)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--disk-fraction", type=float, default=0.75)
    args = parser.parse_args()
    base = host_rss_bytes()
    host_model, host_handle, host_load = load(args.checkpoint, 0.0)
    after_host = host_rss_bytes()
    disk_model, disk_handle, disk_load = load(args.checkpoint, args.disk_fraction)
    after_disk = host_rss_bytes()
    config = host_model.config
    side = int(args.tokens**0.5) * config.patch_size
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, side, side, generator=gen).bfloat16(),
        encoder_hidden_states=torch.randn(1, 333, config.joint_attention_dim, generator=gen).bfloat16(),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen).bfloat16(),
        timestep=torch.tensor([500.0]),
    )
    times: dict[str, list[float]] = {"host": [], "disk": []}
    with torch.no_grad():
        for _ in range(args.runs):
            outputs = {}
            for name, model in (("host", host_model), ("disk", disk_model)):
                start = time.perf_counter()
                outputs[name] = model(**inputs).sample
                times[name].append(time.perf_counter() - start)
            assert torch.equal(outputs["host"], outputs["disk"]), "the disk tier changed the output"
    stats = disk_handle.readers[0].stats
    print(
        f"{type(host_model).__name__} {format_bytes(host_handle.offloaded_bytes)} bf16, {args.tokens} image "
        f"tokens + 333 text tokens, batch 1, {args.runs} runs each, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; checkpoint in the page cache"
    )
    print(f"{'blocks':<28}{'s/forward (median)':>20}{'load s':>9}{'host RSS added':>16}")
    print(
        f"{'all on the host':<28}{statistics.median(times['host']):>20.2f}{host_load:>9.2f}"
        f"{format_bytes(after_host - base):>16}"
    )
    on_disk = sum(group.on_disk for group in disk_handle.rings[0].groups)
    label = f"{on_disk} of {len(disk_handle.rings[0].groups)} on disk"
    print(
        f"{label:<28}{statistics.median(times['disk']):>20.2f}{disk_load:>9.2f}"
        f"{format_bytes(after_disk - after_host):>16}"
    )
    print(
        f"disk reader: {stats.reads} reads, {format_bytes(stats.bytes_read)}; {stats.waits} of {stats.takes} "
        f"block loads waited for the disk ({stats.wait_seconds:.2f} s); disk bound: {stats.disk_bound}"
    )


if __name__ == "__main__":
    main()
