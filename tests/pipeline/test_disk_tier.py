"""`ram_budget`: streamed blocks that do not fit the host budget stay in the checkpoint files and are read
ahead by a thread; the output is bitwise the same, the planner's disk reads are what the run reads, a
slow disk is reported as the bottleneck, and a file truncated while streaming fails naming it."""

import os
import shutil
import time

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

import diffusers_offload as dof
from diffusers_offload.engine.loading import CheckpointError, pread_into
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline, build_tiny_sd3_transformer

MiB = 1 << 20
BUDGET = 7_500_000  # below the model (~11 MB): most transformer blocks stay on disk


@pytest.fixture(autouse=True)
def _quiet():
    diffusers_logging.disable_progress_bar()
    yield
    diffusers_logging.enable_progress_bar()


def build_pipeline(num_layers: int = 8, width_heads: int = 4):
    """The tiny SD3 pipeline with a transformer of `num_layers` blocks of ~1.2 MB (bf16)."""
    pipe = build_tiny_sd3_pipeline(0, torch.bfloat16)
    pipe.transformer = build_tiny_sd3_transformer(
        1, torch.bfloat16, num_layers, heads=width_heads, head_dim=32
    )
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_disk_tier")
    build_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(saved):
    """Two calls of the pipeline loaded by diffusers, no offload."""
    pipe = DiffusionPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    return [generate(pipe, seed) for seed in (0, 1)]


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a cat on a laptop", **TINY_SD3_CALL, generator=generator, output_type="pt").images


class Reader:
    """Reads like `pread_into`; counts the bytes, and sleeps `delay` seconds per read once set."""

    def __init__(self):
        self.bytes = 0
        self.delay = 0.0

    def __call__(self, fd, offset, out):
        if self.delay:
            time.sleep(self.delay)
        self.bytes += len(out)
        pread_into(fd, offset, out)


def load(folder, reader=None, **kwargs):
    return dof.OffloadPipeline.from_pretrained(
        folder, offload="layerwise", device="cpu", dtype=torch.bfloat16, reader=reader, **kwargs
    )


# 7.5 MB: 7 of the 8 blocks on disk; 6.4 MB: all 8, the last (smaller) one too.
@pytest.mark.parametrize("budget", [BUDGET, 6_400_000])
def test_below_model_size_runs_bitwise_over_consecutive_calls(saved, expected, budget):
    pipe = load(saved, ram_budget=budget)
    handle = pipe.offload_handle
    ring = handle.rings[0]
    on_disk = [group for group in ring.groups if group.on_disk]
    assert on_disk and handle.disk_bytes == sum(g.disk_bytes for g in on_disk)
    # Host slabs, staging and the CPU device's copies (host memory too) within the budget.
    assert handle.host_plan.host_bytes <= budget
    assert handle.host_bytes < handle.offloaded_bytes  # the disk blocks hold no host slab
    assert all(g.slab.nbytes == 0 for g in on_disk)
    for seed, image in zip((0, 1), expected):
        assert torch.equal(generate(pipe, seed), image)
    report = pipe.offload_report()
    assert "transformer disk tier" in str(report)
    # Removal reads the disk blocks back: the weights are bitwise diffusers' again.
    pipe.disable_offload()
    assert torch.equal(generate(pipe, 0), expected[0])


def test_planner_decisions_and_disk_bytes_per_step_match_the_run(saved, expected):
    reader = Reader()
    pipe = load(saved, reader=reader, ram_budget=BUDGET)
    handle, plan = pipe.offload_handle, pipe.offload_handle.host_plan
    ring = handle.rings[0]
    # The three-tier decision: the blocks the plan leaves on disk are the ring's disk groups.
    assert [i for i, g in enumerate(ring.groups) if g.on_disk] == list(plan.disk_blocks("transformer"))
    assert 0 < len(plan.disk_blocks("transformer")) < len(ring.groups)
    assert plan.disk_blocks("text_encoder_3") == ()
    assert plan.disk_bytes == handle.disk_bytes
    # Host bytes as planned (slabs are aligned: a little padding per tensor).
    device_copies = plan.device_bytes_on_host
    assert abs(handle.host_bytes - (plan.host_bytes - device_copies)) <= 64 * 1024
    steps = TINY_SD3_CALL["num_inference_steps"]
    assert torch.equal(generate(pipe), expected[0])
    wait_until_idle(handle.readers[0])  # the first call's tail: read-ahead for the next call
    reader.bytes = 0
    stats_before = handle.readers[0].stats
    assert torch.equal(generate(pipe), expected[0])
    read = reader.bytes
    predicted = steps * plan.disk_bytes_per_step + plan.disk_bytes_per_call
    largest = max(g.disk_bytes for g in ring.groups if g.on_disk)
    # What the plan predicts, plus what the read-ahead reads for a step that does not come (the ring's
    # own last prefetch, and up to read_ahead more blocks): never less, never more than that.
    assert predicted <= read <= predicted + (plan.read_ahead + 1) * largest, (read, predicted)
    stats = handle.readers[0].stats
    taken = stats.takes - stats_before.takes
    assert taken * largest >= steps * plan.disk_bytes_per_step


def wait_until_idle(disk_reader, timeout=10.0):
    """Until the reader thread has read all it may read ahead (its read counter stops moving)."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        reads = disk_reader.stats.reads
        if reads == last:
            return
        last = reads
        time.sleep(0.05)
    raise AssertionError("the disk reader kept reading")


def test_a_slow_disk_still_gives_the_same_output_and_is_reported_as_the_bottleneck(saved, expected):
    reader = Reader()
    pipe = load(saved, reader=reader, ram_budget=BUDGET)
    reader.delay = 0.004  # per tensor read: a block takes far longer to read than to compute
    assert torch.equal(generate(pipe), expected[0])
    report = pipe.offload_report()
    assert report.disk_bound
    assert "the disk is the bottleneck" in str(report)
    stats = handle_stats(pipe)
    assert stats.waits >= stats.takes // 2 and stats.wait_seconds > 0


def test_a_disk_faster_than_compute_is_not_the_bottleneck(saved, expected):
    pipe = load(saved, ram_budget=BUDGET)
    # Slow compute: every block sleeps, so the reader has time to read ahead.
    hooks = [
        block.register_forward_pre_hook(lambda *_: time.sleep(0.03))
        for block in pipe.transformer.transformer_blocks
    ]
    assert torch.equal(generate(pipe), expected[0])
    for hook in hooks:
        hook.remove()
    report = pipe.offload_report()
    assert not report.disk_bound
    assert "read ahead in time" in str(report)
    stats = handle_stats(pipe)
    assert stats.takes > 0 and stats.waits < stats.takes // 2


def handle_stats(pipe):
    return pipe.offload_handle.readers[0].stats


def test_a_shard_truncated_while_streaming_fails_naming_the_file(saved, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    pipe = load(folder, ram_budget=BUDGET)
    weights = next((folder / "transformer").glob("*.safetensors"))
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=str(weights)) as error:
        generate(pipe)
    assert "truncated" in str(error.value)
    with pytest.raises(CheckpointError, match=str(weights)):  # not a hang, nor garbage, the next time
        generate(pipe)


def test_too_small_a_ram_budget_names_the_minimum(saved):
    with pytest.raises(ValueError, match=r"ram_budget .* needs at least .*raise ram_budget to at least"):
        load(saved, ram_budget="2MB")


def test_ram_budget_after_a_plain_load_names_from_pretrained(saved):
    pipe = dof.attach(DiffusionPipeline.from_pretrained(saved, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"OffloadPipeline\.from_pretrained\(.*ram_budget"):
        pipe.enable_layerwise_offload("cpu", ram_budget="8MB")
    assert pipe.offload_handle is None


def test_weights_on_disk_refuse_edits(saved):
    pipe = load(saved, ram_budget=BUDGET)
    with pytest.raises(RuntimeError, match="disk tier"):
        with pipe.offload_handle.edit_weights():
            pass


def test_a_percentage_of_host_memory(saved):
    # 100% of this machine holds the tiny pipeline: nothing on disk.
    pipe = load(saved, ram_budget="100%")
    assert pipe.offload_handle.disk_bytes == 0 and pipe.offload_handle.readers == []


@pytest.fixture(scope="module")
def saved_large_t5(tmp_path_factory):
    """The pipeline with a 6-layer T5 of ~14 MB: larger than the budget can hold whole."""
    from transformers import T5EncoderModel

    pipe = build_pipeline()
    config = pipe.text_encoder_3.config
    config.num_layers, config.d_ff = 6, 4096
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        pipe.text_encoder_3 = T5EncoderModel(config).to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("sd3_large_t5")
    pipe.save_pretrained(folder)
    return folder


def test_a_swapped_encoder_that_does_not_fit_streams_from_disk(saved_large_t5):
    reference = DiffusionPipeline.from_pretrained(saved_large_t5, dtype=torch.bfloat16)
    expected = [generate(reference, seed) for seed in (0, 1)]
    pipe = load(saved_large_t5, ram_budget=20_000_000)
    handle = pipe.offload_handle
    assert handle.host_plan.streamed_instead == ("text_encoder_3",)
    record = handle.components["text_encoder_3"]
    assert record.placement.strategy == "streamed" and record.ring.reader is not None
    assert any(group.on_disk for group in record.ring.groups)
    for seed, image in zip((0, 1), expected):
        assert torch.equal(generate(pipe, seed), image)
    assert "text_encoder_3 disk tier" in str(pipe.offload_report())


def test_auto_with_both_budgets(saved, expected):
    pipe = dof.OffloadPipeline.from_pretrained(
        saved,
        offload="auto",
        vram_budget="4MB",
        reserve=0,
        ram_budget=9_500_000,
        device="cpu",
        dtype=torch.bfloat16,
    )
    handle = pipe.offload_handle
    assert handle.plan is not None and handle.host_plan.disk_blocks("transformer")
    assert torch.equal(generate(pipe), expected[0])


def test_model_offload_holds_every_component_whole(saved):
    with pytest.raises(ValueError, match=r"Swapped components .* are held whole on the host"):
        dof.OffloadPipeline.from_pretrained(
            saved, offload="model", ram_budget=BUDGET, device="cpu", dtype=torch.bfloat16
        )


def test_with_shared_host_memory_the_host_blocks_are_shared_and_the_disk_blocks_read_from_the_file(
    saved, expected, tmp_path, monkeypatch
):
    from diffusers_offload.engine.shared_memory import DIRECTORY_ENV

    monkeypatch.setenv(DIRECTORY_ENV, str(tmp_path))
    first = load(saved, ram_budget=BUDGET, share_host_memory=True)
    second = load(saved, ram_budget=BUDGET, share_host_memory=True)
    handles = first.offload_handle, second.offload_handle
    assert handles[0].shared_segment is not None and handles[1].shared_segment is not None
    (data,) = tmp_path.glob("*.data")
    for handle in handles:
        on_disk = [group for group in handle.groups if group.on_disk]
        assert on_disk and all(group.slab.nbytes == 0 for group in on_disk)
        # The segment is the host tier's slabs (page-aligned each), not the disk blocks.
        slabs = [group.slab.nbytes for group in handle.groups if not group.on_disk]
        assert sum(slabs) <= data.stat().st_size <= sum(slabs) + 4096 * len(slabs)
        assert data.stat().st_size < handle.offloaded_bytes
    for pipe in (first, second):
        assert torch.equal(generate(pipe), expected[0])
    first.disable_offload()
    second.disable_offload()
    assert not list(tmp_path.glob("*.data"))
