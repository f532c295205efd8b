"""Several processes share one host copy of the weights (`share_host_memory=True`).

Real processes (`tests/shared_host_worker.py`) load a saved ~80 MB pipeline offloaded to the CPU into
one shared segment in a private directory of /dev/shm; the host memory they hold together is the sum
of their PSS (a page mapped by N processes counts 1/N to each), read after every one has generated, so
every weight page has been touched. Outputs are compared bitwise with an unshared run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers.utils import logging

import diffusers_offload as dof
from diffusers_offload.bench.measure import pss_bytes
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline, build_tiny_sd3_transformer

ROOT = Path(__file__).parents[2]
WORKER = ROOT / "tests" / "shared_host_worker.py"
CALL = dict(num_inference_steps=2, height=64, width=64, guidance_scale=4.0, max_sequence_length=32)
PROMPTS = ("a red cube", "a blue sphere", "a green cone", "a yellow torus")
SHM = Path("/dev/shm")

pytestmark = pytest.mark.skipif(
    not (SHM.is_dir() and Path("/proc/self/smaps_rollup").exists()), reason="needs Linux /dev/shm and PSS"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD3 pipeline with a ~80 MB transformer (4 blocks of width 384), saved in float32."""
    target = tmp_path_factory.mktemp("sd3_80mb")
    pipe = build_tiny_sd3_pipeline(0)
    pipe.transformer = build_tiny_sd3_transformer(1, num_layers=4, heads=6, head_dim=64)
    pipe.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def references(folder):
    """Each prompt's image from one unshared process (this one), with the workers' seed and call."""
    logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = dof.OffloadPipeline.from_pretrained(folder, offload="layerwise", device="cpu")
    images = {
        (prompt, seed): pipe(
            prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **CALL
        ).images
        for seed, prompt in enumerate(PROMPTS)
    }
    torch.set_num_threads(threads)
    return images


@pytest.fixture
def shm_dir():
    """A directory of its own on /dev/shm, removed afterwards."""
    path = SHM / f"diffusers-offload-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    for leftover in path.iterdir():
        leftover.unlink()
    path.rmdir()


class Zygote:
    """One `shared_host_worker.py` that forks the test processes (imports are paid once)."""

    def __init__(self, log: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
        }
        self.log_path = log
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def fork(self, job: dict) -> int:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline().split()
        assert line and line[0] == job["name"], self.log_path.read_text()[-3000:]
        return int(line[1])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    running = Zygote(tmp_path_factory.mktemp("zygote") / "workers.log")
    yield running
    running.close()


class Workers:
    """Processes forked by the zygote, with their report files in `outdir`, segments in `shm_dir`."""

    def __init__(self, zygote: Zygote, folder: Path, outdir: Path, shm_dir: Path) -> None:
        self.zygote, self.folder, self.outdir, self.shm_dir = zygote, folder, outdir, shm_dir
        self.pids: dict[str, int] = {}

    def start(self, name: str, seed: int, *flags: str) -> None:
        job = dict(name=name, prompt=PROMPTS[seed], seed=seed, flags=flags)
        job.update(folder=str(self.folder), outdir=str(self.outdir), shm=str(self.shm_dir))
        self.pids[name] = self.zygote.fork(job)

    def alive(self, name: str) -> bool:
        try:
            os.kill(self.pids[name], 0)
        except ProcessLookupError:
            return False
        return True

    def wait_for(self, name: str, suffix: str, timeout: float = 120.0) -> dict:
        path = self.outdir / f"{name}{suffix}"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.alive(name) or time.monotonic() > deadline:
                error = self.outdir / f"{name}.error"
                pytest.fail(
                    f"worker {name} ended or timed out before {suffix}: "
                    f"{error.read_text() if error.exists() else ''}\n"
                    + self.zygote.log_path.read_text()[-3000:]
                )
            time.sleep(0.02)
        return json.loads(path.read_text()) if suffix.endswith(".json") else {}

    def kill(self, name: str) -> None:
        os.kill(self.pids[name], signal.SIGKILL)
        self._gone(name)

    def _gone(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alive(name):
            assert time.monotonic() < deadline, f"worker {name} did not exit"
            time.sleep(0.02)
        del self.pids[name]

    def release(self) -> None:
        (self.outdir / "release").touch()
        for name in list(self.pids):
            self._gone(name)
        for name in [p.stem for p in self.outdir.glob("*.error")]:
            pytest.fail(f"worker {name}: {(self.outdir / f'{name}.error').read_text()}")
        (self.outdir / "release").unlink()

    def image(self, name: str) -> torch.Tensor:
        return torch.load(self.outdir / f"{name}.pt")

    def close(self) -> None:
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def workers(zygote, folder, tmp_path, shm_dir):
    running = Workers(zygote, folder, tmp_path, shm_dir)
    yield running
    running.close()


def segment_files(shm_dir: Path) -> list[str]:
    return sorted(path.suffix for path in shm_dir.iterdir())


@pytest.fixture(scope="module")
def measured_four(zygote, folder, references, tmp_path_factory):
    """Four sharing processes and one private one, alive together: reports, PSS and images."""
    path = SHM / f"diffusers-offload-test-{os.getpid()}-four"
    path.mkdir()
    running = Workers(zygote, folder, tmp_path_factory.mktemp("four"), path)
    try:
        for seed in range(4):
            running.start(f"shared{seed}", seed)
        running.start("private", 0, "private")
        names = [f"shared{seed}" for seed in range(4)] + ["private"]
        loaded = {name: running.wait_for(name, ".done.json") for name in names}
        pss = {name: pss_bytes(loaded[name]["pid"]) for name in names}
        files_while_running = segment_files(path)
        images = {name: running.image(name) for name in names}
        running.release()
        return dict(
            loaded=loaded, pss=pss, images=images, files=files_while_running, left=segment_files(path)
        )
    finally:
        running.close()
        for leftover in path.iterdir():
            leftover.unlink()
        path.rmdir()


def pss_target(model_bytes: int, baseline: int, processes: int) -> float:
    return 1.10 * model_bytes + processes * baseline


def test_four_processes_share_one_host_copy(measured_four, references):
    loaded, pss = measured_four["loaded"], measured_four["pss"]
    roles = sorted(loaded[f"shared{seed}"]["role"] for seed in range(4))
    assert roles == ["attached", "attached", "attached", "created"], loaded
    assert all(loaded[f"shared{seed}"]["shared_groups"] == loaded["shared0"]["groups"] for seed in range(4))
    assert measured_four["files"] == [".data", ".json", ".lock"]
    model = loaded["private"]["host_bytes"]
    assert model > 75 << 20
    # What one unshared process holds beside its slabs: the interpreter, libraries, ring slots.
    baseline = pss["private"] - model
    shared_total = sum(pss[f"shared{seed}"] for seed in range(4))
    assert shared_total <= pss_target(model, baseline, 4), (shared_total, model, baseline, pss)
    # Unshared, four processes would hold four copies.
    assert shared_total < 4 * pss["private"] - 2.5 * model, pss
    for seed in range(4):
        assert torch.equal(measured_four["images"][f"shared{seed}"], references[(PROMPTS[seed], seed)])
    assert torch.equal(measured_four["images"]["private"], references[(PROMPTS[0], 0)])
    # The last process to exit removed the segment.
    assert measured_four["left"] == []


def test_killed_processes_leave_nothing_that_is_reused_wrongly(workers, shm_dir, references):
    # Killed while packing: its incomplete data is left behind (no manifest), and never attached to.
    workers.start("packing", 0, "slow-read")
    deadline = time.monotonic() + 120
    while not any(path.suffix == ".data" for path in shm_dir.iterdir()):
        assert time.monotonic() < deadline and workers.alive("packing")
        time.sleep(0.02)
    workers.kill("packing")
    assert segment_files(shm_dir) == [".data", ".lock"]

    # Two start together: one packs anew, the other attaches; one is killed in the middle of its run.
    workers.start("first", 0)
    workers.start("running", 1, "pause-running")
    roles = {workers.wait_for(name, ".loaded.json")["role"] for name in ("first", "running")}
    assert roles == {"created", "attached"}
    workers.wait_for("running", ".running")
    workers.kill("running")
    first = workers.wait_for("first", ".done.json")
    assert torch.equal(workers.image("first"), references[(PROMPTS[0], 0)])

    # Started again: it attaches to the copy the surviving process uses, and generates the same image.
    # (With an unshared process beside them, for the per-process baseline of N = 2.)
    workers.start("again", 1)
    workers.start("private", 1, "private")
    again = workers.wait_for("again", ".done.json")
    private = workers.wait_for("private", ".done.json")
    assert again["role"] == "attached"
    assert torch.equal(workers.image("again"), references[(PROMPTS[1], 1)])
    total = pss_bytes(first["pid"]) + pss_bytes(again["pid"])
    baseline = pss_bytes(private["pid"]) - private["host_bytes"]
    assert total <= pss_target(first["host_bytes"], baseline, 2), (total, baseline)
    workers.kill("private")

    # Everyone killed: the complete segment stays behind, unused; the next process reclaims it and
    # packs again, and removes it when it exits.
    workers.kill("first")
    workers.kill("again")
    assert segment_files(shm_dir) == [".data", ".json", ".lock"]
    workers.start("after", 2)
    assert workers.wait_for("after", ".done.json")["role"] == "created"
    assert torch.equal(workers.image("after"), references[(PROMPTS[2], 2)])
    workers.release()
    assert segment_files(shm_dir) == []
