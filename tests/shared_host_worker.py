"""Processes of the shared-host-memory tests, forked from one that imported everything once.

    python shared_host_worker.py

reads one JSON job per line from stdin, `{"name", "folder", "outdir", "shm", "prompt", "seed",
"flags"}`, forks a process for it and prints `NAME PID`. Each process loads the pipeline saved in
FOLDER offloaded to the CPU, with its shared segments in the directory SHM (`share_host_memory=True`
unless flag "private"), writes OUTDIR/NAME.loaded.json (role, seconds to load, pid), generates one
image into OUTDIR/NAME.pt, writes OUTDIR/NAME.done.json, and exits (detaching as any process does at
exit) once OUTDIR/release exists. Flags: "slow-read" (every tensor read sleeps 20 ms: to be killed
while packing), "pause-running" (stops after the first denoising step and writes OUTDIR/NAME.running:
to be killed while running).

Forking saves each process the seconds of importing torch, diffusers and transformers; the forked
processes share nothing of the offload (the parent never loads a pipeline), only imported code.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from diffusers.utils import logging  # noqa: E402

import diffusers_offload as dof  # noqa: E402
from diffusers_offload.engine.loading import pread_into  # noqa: E402

CALL = dict(num_inference_steps=2, height=64, width=64, guidance_scale=4.0, max_sequence_length=32)


def slow_reader(fd: int, offset: int, out: memoryview) -> None:
    time.sleep(0.02)
    pread_into(fd, offset, out)


def run(job: dict) -> None:
    name, flags, folder, outdir = job["name"], set(job.get("flags", ())), job["folder"], Path(job["outdir"])
    os.environ["DIFFUSERS_OFFLOAD_SHM_DIR"] = job["shm"]
    started = time.perf_counter()
    pipe = dof.OffloadPipeline.from_pretrained(
        folder,
        offload="layerwise",
        device="cpu",
        share_host_memory="private" not in flags,
        reader=slow_reader if "slow-read" in flags else None,
    )
    handle = pipe.offload_handle
    segment = handle.shared_segment
    report = dict(
        pid=os.getpid(),
        role=segment.role if segment is not None else "private",
        seconds=time.perf_counter() - started,
        host_bytes=handle.host_bytes,
        shared_groups=sum(group.shared for group in handle.groups),
        groups=len(handle.groups),
    )
    (outdir / f"{name}.loaded.json").write_text(json.dumps(report))

    def pause(pipe, step, timestep, kwargs):
        if "pause-running" in flags:
            (outdir / f"{name}.running").touch()
            time.sleep(3600)  # until killed
        return kwargs

    generator = torch.Generator().manual_seed(job["seed"])
    image = pipe(job["prompt"], generator=generator, output_type="pt", callback_on_step_end=pause, **CALL)
    torch.save(image.images, outdir / f"{name}.pt")
    # glibc keeps a varying amount of freed memory in its heap (up to ~15 MB here, at random): given
    # back in every process alike, so that PSS compares what the processes use.
    ctypes.CDLL(None).malloc_trim(0)
    (outdir / f"{name}.done.json").write_text(json.dumps(report))
    while not (outdir / "release").exists():
        time.sleep(0.02)


def main() -> None:
    logging.disable_progress_bar()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run(job)
            except BaseException as error:
                (Path(job["outdir"]) / f"{job['name']}.error").write_text(repr(error))
                raise
            sys.exit(0)  # through the interpreter's exit: atexit handlers detach
        print(job["name"], pid, flush=True)


if __name__ == "__main__":
    main()
