"""One pipeline per process, one host copy of the weights per node: run under torchrun.

    torchrun --nproc-per-node 2 scripts/scale_out.py PIPELINE_FOLDER --prompt "a cat" --prompt "a dog"

Every rank loads the pipeline with `share_host_memory=True` and offloads it to its own device
(`cuda:LOCAL_RANK`, else the CPU): the first rank on the node reads the weights into shared memory,
the others attach to that copy. Replicas (the default): rank r generates prompts r, r + N, ... with
seed `--seed + index`. `--context-parallel ulysses|ring`: every rank runs every block on its part of
the sequence (diffusers' `ContextParallelConfig`, for models that declare a context-parallel plan),
on the first prompt; rank 0 saves the image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import diffusers_offload as dof


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="a diffusers pipeline folder (or hub id)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--out", type=Path, default=Path("scale-out-images"))
    parser.add_argument("--offload", choices=("layerwise", "model", "auto"), default="layerwise")
    parser.add_argument("--vram-budget", default=None, help='e.g. "8GiB" (offload=auto or layerwise)')
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-parallel", choices=("ulysses", "ring"), default=None)
    parser.add_argument("--no-share", action="store_true", help="a private host copy per rank")
    parser.add_argument("--save-tensors", action="store_true", help="also save each image as a .pt tensor")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # Within a budget, the planner sizes the activation reserve from the image size.
    sizes = dict(height=args.height, width=args.width) if args.vram_budget else {}
    started = time.perf_counter()
    pipe = dof.OffloadPipeline.from_pretrained(
        args.pipeline,
        offload=args.offload,
        device=device,
        vram_budget=args.vram_budget,
        dtype=getattr(torch, args.dtype),
        share_host_memory=not args.no_share,
        **sizes,
    )
    loaded = time.perf_counter() - started
    handle = pipe.offload_handle
    segment = handle.shared_segment
    how = f"{segment.role} shared host memory" if segment is not None else "private host memory"
    print(f"rank {rank}: {how}, {handle.host_bytes / 2**20:.0f} MiB, loaded in {loaded:.1f} s", flush=True)

    call = dict(num_inference_steps=args.steps, output_type="pt")
    call.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
    if args.context_parallel:
        from diffusers import ContextParallelConfig

        degree = {f"{args.context_parallel}_degree": world}
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
        jobs = [(0, args.prompt[0])]
    else:
        jobs = [(i, p) for i, p in enumerate(args.prompt) if i % world == rank]

    args.out.mkdir(parents=True, exist_ok=True)
    for index, prompt in jobs:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed + index)
        image = pipe(prompt, generator=generator, **call).images[0].cpu()
        seconds = time.perf_counter() - started
        if args.context_parallel and rank != 0:
            continue
        stem = args.out / f"{index:03d}"
        pipe.numpy_to_pil(pipe.image_processor.pt_to_numpy(image[None]))[0].save(f"{stem}.png")
        if args.save_tensors:
            torch.save(image, f"{stem}.pt")
        print(f"rank {rank}: image {index} ({prompt!r}) in {seconds:.1f} s -> {stem}.png", flush=True)
    if world > 1:
        # Every rank stays until all are done: the shared copy is there for a rank that starts late.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
