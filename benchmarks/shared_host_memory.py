"""Host memory of N processes that offload the same pipeline, with and without `share_host_memory`.

    python benchmarks/shared_host_memory.py PIPELINE_FOLDER [--processes 1 2 4] [--private 1 2]

Each process is a fresh interpreter (as under torchrun) that loads the pipeline with
`OffloadPipeline.from_pretrained(..., offload="layerwise", device="cpu")`, then reads one byte of
every page of its slabs (what the first denoising step does when it streams them; a page nobody has
read counts in no process's PSS) and gives glibc's freed heap back (`malloc_trim`), and waits. With all
N alive, the table sums their PSS (/proc/PID/smaps_rollup: a page mapped by k processes counts 1/k to
each) and compares it with the target 1.10 x model bytes + N x the per-process baseline: the PSS, less
its slabs, of one unshared process alive beside them (so that it shares the libraries' pages with them
as they do with each other; started once they are loaded). Shared runs start the first process (it
packs), then the others together (they attach), and report both load times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_offload.bench.measure import pss_bytes  # noqa: E402

WORKER = r"""
import ctypes, json, os, sys, time
import torch
from diffusers.utils import logging
import diffusers_offload as dof

logging.disable_progress_bar()
folder, report, share, dtype = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
started = time.perf_counter()
pipe = dof.OffloadPipeline.from_pretrained(
    folder, offload="layerwise", device="cpu", dtype=getattr(torch, dtype), share_host_memory=share
)
seconds = time.perf_counter() - started
handle = pipe.offload_handle
for group in handle.groups:
    group.slab.data[:: os.sysconf("SC_PAGE_SIZE")].sum()  # touch every page once
ctypes.CDLL(None).malloc_trim(0)
segment = handle.shared_segment
role = segment.role if segment is not None else "private"
with open(report, "w") as f:
    json.dump(dict(pid=os.getpid(), role=role, seconds=seconds, host_bytes=handle.host_bytes), f)
while not os.path.exists(report + ".release"):
    time.sleep(0.05)
"""

GiB = 1 << 30


def start(folder: str, report: Path, share: bool, dtype: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, folder, str(report), "1" if share else "0", dtype],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_reports(processes: dict[Path, subprocess.Popen]) -> dict[Path, dict]:
    results = {}
    while len(results) < len(processes):
        for report, process in processes.items():
            if report in results:
                continue
            if report.exists() and report.stat().st_size:
                results[report] = json.loads(report.read_text())
            elif process.poll() is not None:
                raise RuntimeError(f"a worker failed:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    return results


def run(folder: str, count: int, share: bool, dtype: str, workdir: Path, shm: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["DIFFUSERS_OFFLOAD_SHM_DIR"] = str(shm)
    tag = f"{'shared' if share else 'private'}{count}"
    reports = [workdir / f"{tag}-{i}.json" for i in range(count)]
    processes = {reports[0]: start(folder, reports[0], share, dtype, env)}
    first = wait_reports(processes)
    # The others start together once the first has packed (shared: they attach).
    rest = {report: start(folder, report, share, dtype, env) for report in reports[1:]}
    processes.update(rest)
    results = {**first, **wait_reports(rest)}
    companion = workdir / f"{tag}-companion.json"
    if share:  # started last, so that its load does not slow theirs
        processes[companion] = start(folder, companion, False, dtype, env)
        results.update(wait_reports({companion: processes[companion]}))
    pss = [pss_bytes(results[r]["pid"]) for r in reports]
    baseline = pss_bytes(results[companion]["pid"]) - results[companion]["host_bytes"] if share else None
    segment_bytes = sum(p.stat().st_size for p in shm.glob("*.data"))
    for report in processes:
        Path(f"{report}.release").touch()
    for process in processes.values():
        process.wait()
    return dict(
        count=count,
        share=share,
        pss=sum(pss),
        model=results[reports[0]]["host_bytes"],
        roles=[results[r]["role"] for r in reports],
        first_s=results[reports[0]]["seconds"],
        others_s=[results[r]["seconds"] for r in reports[1:]],
        segment=segment_bytes,
        baseline=baseline,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--private", type=int, nargs="*", default=[1, 2], help="unshared runs (N)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        for count in sorted(set(args.private) | {1}):
            rows.append(run(args.pipeline, count, False, args.dtype, Path(work), Path(shm)))
        for count in args.processes:
            rows.append(run(args.pipeline, count, True, args.dtype, Path(work), Path(shm)))
    model = rows[0]["model"]
    print(f"model (slab bytes): {model / GiB:.2f} GiB")
    print(
        "| sharing | N | sum of PSS | N x model | baseline | target 1.10 M + N base | met | segment "
        "| first load | others load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        n = row["count"]
        others = f"{sum(row['others_s']) / len(row['others_s']):.1f} s" if row["others_s"] else "-"
        if row["share"]:
            target = 1.10 * model + n * row["baseline"]
            cells = [f"{row['baseline'] / GiB:.2f} GiB", f"{target / GiB:.2f} GiB"]
            cells += ["yes" if row["pss"] <= target else "no", f"{row['segment'] / GiB:.2f} GiB"]
        else:
            cells = ["-", "-", "-", "-"]
        print(
            f"| {'shared' if row['share'] else 'private'} | {n} | {row['pss'] / GiB:.2f} GiB | "
            f"{n * model / GiB:.2f} GiB | {' | '.join(cells)} | {row['first_s']:.1f} s | {others} |"
        )
    print(
        "roles: "
        + "; ".join(f"{'shared' if r['share'] else 'private'}{r['count']}: {r['roles']}" for r in rows)
    )


if __name__ == "__main__":
    main()
