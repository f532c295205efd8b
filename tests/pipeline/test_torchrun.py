"""scripts/scale_out.py under torchrun on the CPU (gloo): two ranks, one shared host copy.

(a) Replicas: each rank generates its own prompt; every image is bitwise the unshared single-process
one. (b) diffusers' context parallelism, Ulysses attention (`ContextParallelConfig(ulysses_degree=2)`)
on the tiny FLUX.1: both ranks run every block on half of the sequence, streaming it from the one
shared copy. diffusers 0.42.1 cannot set it up on a CPU-only build (`enable_parallelism` takes
`rank % torch.accelerator.device_count()`, which is 0): the test runs the script with that count
read as 1, and changes nothing else. Ulysses splits the attention heads across ranks, so the image
is compared within float32 rounding, not bitwise. Ring attention does not run on the CPU (its
native attention backend refuses `return_lse=True`) and is not tested.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.utils import logging

import diffusers_offload as dof
from diffusers_offload.tiny.flux import build_tiny_flux_pipeline
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "scale_out.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
CALL = dict(num_inference_steps=2, height=64, width=64)
ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--dtype", "float32", "--save-tensors"]
# diffusers' enable_parallelism on a CPU-only build: see the module docstring.
CPU_DEVICE_COUNT = "import runpy, sys, torch\ntorch.accelerator.device_count = lambda: 1\n" + (
    "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
)

pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not Path("/dev/shm").is_dir(), reason="needs torchrun and /dev/shm"
)


def torchrun(tmp_path: Path, *args: str, wrapper: str | None = None) -> str:
    shm = Path("/dev/shm") / f"diffusers-offload-test-{os.getpid()}-{tmp_path.name}"
    shm.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DIFFUSERS_OFFLOAD_SHM_DIR": str(shm),
        "OMP_NUM_THREADS": "1",
    }
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2"]
    if wrapper is not None:
        (tmp_path / "wrapper.py").write_text(wrapper)
        command.append(str(tmp_path / "wrapper.py"))
    try:
        # A session of its own: on a timeout, the ranks go with torchrun.
        process = subprocess.Popen(
            [*command, str(SCRIPT), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        # Both ranks exited: the last one removed the segment.
        assert list(shm.iterdir()) == []
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return stdout


def reference(folder: Path, prompt: str, seed: int) -> torch.Tensor:
    logging.disable_progress_bar()
    pipe = dof.OffloadPipeline.from_pretrained(folder, offload="layerwise", device="cpu")
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="pt", **CALL).images[0]


def test_torchrun_replicas_share_one_host_copy_and_match_a_single_process(tmp_path):
    folder = tmp_path / "sd3"
    build_tiny_sd3_pipeline(0).save_pretrained(folder)
    out = tmp_path / "images"
    stdout = torchrun(
        tmp_path, str(folder), "--prompt", "a red cube", "--prompt", "a blue sphere", "--out", str(out), *ARGS
    )
    assert stdout.count("created shared host memory") == 1, stdout
    assert stdout.count("attached shared host memory") == 1, stdout
    for index, prompt in enumerate(("a red cube", "a blue sphere")):
        image = torch.load(out / f"{index:03d}.pt")
        assert torch.equal(image, reference(folder, prompt, index)), prompt
        assert (out / f"{index:03d}.png").stat().st_size > 0


def test_torchrun_ulysses_context_parallelism_streams_from_one_shared_copy(tmp_path):
    folder = tmp_path / "flux"
    build_tiny_flux_pipeline(0).save_pretrained(folder)
    out = tmp_path / "images"
    stdout = torchrun(
        tmp_path,
        str(folder),
        "--prompt",
        "a red cube",
        "--context-parallel",
        "ulysses",
        "--out",
        str(out),
        *ARGS,
        wrapper=CPU_DEVICE_COUNT,
    )
    assert stdout.count("created shared host memory") == 1, stdout
    assert stdout.count("attached shared host memory") == 1, stdout
    image = torch.load(out / "000.pt")
    expected = reference(folder, "a red cube", 0)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
