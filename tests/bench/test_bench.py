"""`diffusers-offload bench` on the CPU: the harness that every GPU figure is measured with."""

import json
import os
from pathlib import Path

import pytest
import torch

from diffusers_offload import cli
from diffusers_offload.bench import MODELS, ROWS, BenchConfig, RowResult, format_results, run_bench, run_row
from diffusers_offload.bench.measure import block_compute_times, h2d_bandwidth
from diffusers_offload.bench.models import TINY_BLOCKS, build_pipeline, get_model
from diffusers_offload.bench.rows import parse_rows

OURS = ["model", "layerwise-p1", "layerwise-p2"]


@pytest.fixture(scope="module")
def tiny_sd3_run(tmp_path_factory):
    """Every row on tiny-sd3, in this process (the isolated path is tested once, below)."""
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    argv = [
        "bench",
        "--model",
        "tiny-sd3",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--in-process",
        "--json",
        str(out),
    ]
    return cli.main(argv), json.loads(out.read_text())


def test_every_row_runs_or_reports_its_error(tiny_sd3_run):
    code, data = tiny_sd3_run
    assert code == 0
    rows = {row["row"]: row for row in data["rows"]}
    # Every row but the loading ones, which compare loading a saved checkpoint (tested below).
    assert list(rows) == [name for name, row in ROWS.items() if row.in_default]
    for name in ["none", *OURS]:
        row = rows[name]
        assert row["error"] is None, (name, row["error"])
        assert row["step_s"] > 0 and len(row["steps_s"]) == 2
        assert row["matches_none"] is True  # offloading changed no bit of the DiT's output
        assert row["enable_s"] >= 0 and row["model_bytes"] > 0
    # Half of a tiny DiT cannot hold the tiny T5's embeddings: the planner says so and what would fit.
    assert "To fit: raise the budget" in rows["budget-50"]["error"]
    # diffusers' streamed group offloading needs a device with streams: those rows fail, with the reason,
    # and the rows after them still ran.
    assert "streams" in rows["diffusers-group-block"]["error"]
    assert rows["diffusers-model"]["error"] is None and rows["diffusers-model"]["matches_none"] is True


def test_streamed_rows_measure_traffic_and_floors(tiny_sd3_run):
    _, data = tiny_sd3_run
    rows = {row["row"]: row for row in data["rows"]}
    none = rows["none"]
    assert none["bandwidth"] > 0 and none["block_compute_ms"] > 0
    dit_blocks = MODELS["tiny-sd3"].tiny_builder().transformer.transformer_blocks
    block_bytes = sum(t.numel() * t.element_size() for t in dit_blocks[0].parameters())
    for name in ["layerwise-p1", "layerwise-p2"]:
        row = rows[name]
        # Every block but the ones left in the ring's slots from the previous step is copied again.
        slots = int(name[-1]) + 1
        assert row["h2d_bytes_per_step"] >= (TINY_BLOCKS - slots) * block_bytes / 2  # tiny: bf16 halves
        assert row["hidden_fraction"] == 0  # the CPU copies synchronously: nothing is hidden
        assert row["floor_s"] == max(none["step_s"], row["h2d_bytes_per_step"] / none["bandwidth"])
        assert row["ratio"] == pytest.approx(row["step_s"] / none["step_s"])
        assert row["block_calls_per_step"] == TINY_BLOCKS  # one call per step, every block once
        added = (row["step_s"] - none["step_s"]) / TINY_BLOCKS * 1e6
        assert row["added_per_block_us"] == pytest.approx(added)  # the engine's overhead per block call
    assert rows["model"]["h2d_bytes_per_step"] == 0  # the DiT stays on the device once swapped in


def test_table_has_every_row_and_lists_failures(tiny_sd3_run, capsys):
    _, data = tiny_sd3_run
    config = BenchConfig(**data["run"]["config"])
    text = format_results(config, [RowResult(**row) for row in data["rows"]])
    lines = text.splitlines()
    assert lines[0].startswith("tiny-sd3 on cpu, bfloat16, 64x64, 1 call(s) of batch 2 per step")
    assert "floors: H2D" in lines[0] and "ms/block" in lines[0]
    for name in parse_rows(None):
        assert any(line.startswith(name + " ") for line in lines), name
    assert "failed rows:" in text and "diffusers-group-leaf: ValueError" in text


def test_cli_default_runs_each_row_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "--model", "tiny-sd3", "--device", "cpu", "--steps", "1", "--rows", "none"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["row"] == "none" and row["error"] is None and row["step_s"] > 0
    # Its own process: the RSS it reports is above that process's baseline, not this test session's.
    assert 0 <= row["host_rss"] < 1 << 30 and row["bandwidth"] > 0
    assert "none" in capsys.readouterr().out


def test_a_crashing_row_process_is_reported_and_the_rest_run(monkeypatch):
    from dataclasses import asdict

    from diffusers_offload.bench import harness

    real = harness.subprocess.run
    fake_row = {"none": RowResult("none", step_s=2.0, bandwidth=1e9), "model": RowResult("model", step_s=3.0)}

    package_root = str(Path(harness.__file__).resolve().parents[2])

    def child(command, **kwargs):
        # The child imports the package this process runs, wherever the current directory is.
        assert kwargs["env"]["PYTHONPATH"].split(os.pathsep)[0] == package_root
        name = command[-1]
        if name == "layerwise-p1":  # stands in for a row killed for memory
            script = "import sys; sys.stderr.write('Killed\\n'); sys.exit(137)"
        else:  # a child that reports its row the way the harness's own children do
            script = f"print({harness.ROW_MARK!r} + {json.dumps(asdict(fake_row[name]))!r})"
        return real([command[0], "-c", script], **kwargs)

    monkeypatch.setattr(harness.subprocess, "run", child)
    saved = []  # what a run stopped half-way would have kept
    config = BenchConfig("tiny-sd3", "cpu", steps=1)
    results = run_bench(
        config, "layerwise-p1,model", after_row=lambda done: saved.append([r.row for r in done])
    )
    assert saved == [["none"], ["none", "layerwise-p1"], ["none", "layerwise-p1", "model"]]
    assert [r.row for r in results] == ["none", "layerwise-p1", "model"]
    assert results[1].error == "process exited with 137: Killed"
    assert results[2].error is None and results[2].ratio == 1.5


def test_budget_row_streams_part_of_the_dit():
    results = run_bench(BenchConfig("tiny-sd3", "cpu", steps=1, dit_only=True), "budget-50", isolate=False)
    budget = results[1]
    assert budget.error is None and budget.matches_none
    assert 0 < budget.h2d_bytes_per_step < budget.model_bytes  # some blocks resident, the rest streamed


def test_steps_zero_measures_memory_and_enable_only():
    result = run_row(BenchConfig("tiny-sd3", "cpu", steps=0, warmup=0, dit_only=True), "layerwise-p1")
    assert result.error is None and result.step_s is None and result.h2d_bytes_per_step is None
    assert result.enable_s > 0 and result.host_rss is not None


def test_checkpoint_is_saved_once_and_loaded_in_each_row(tmp_path):
    checkpoint = tmp_path / "dit"
    config = BenchConfig("tiny-sd3", "cpu", steps=1, checkpoint=str(checkpoint))
    first = run_row(config, "layerwise-p1")
    assert first.error is None and first.load_s > 0
    saved = (checkpoint / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = run_row(config, "none")
    assert again.error is None and again.load_s > 0
    assert (checkpoint / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == saved  # not re-saved
    assert first.output_digest == again.output_digest  # the same weights, loaded back
    # Offload loading reads the same checkpoint straight into the slabs: the same output.
    loaded = run_row(config, "load-layerwise-p1")
    assert loaded.error is None and loaded.output_digest == first.output_digest
    assert loaded.model_bytes == first.model_bytes
    read = run_row(config, "read-all")  # the cold-start reference: every page read, nothing offloaded
    assert read.error is None and read.output_digest == first.output_digest
    assert "--checkpoint" in run_row(BenchConfig("tiny-sd3", "cpu", steps=1), "load-model").error
    pipe, _ = build_pipeline(
        get_model("tiny-sd3"), torch.device("cpu"), torch.bfloat16, checkpoint=checkpoint
    )
    assert [name for name in ("text_encoder", "vae") if getattr(pipe, name) is not None] == []
    assert len(pipe.transformer.transformer_blocks) == TINY_BLOCKS


def test_bad_input_is_refused_before_any_row_runs(capsys):
    assert cli.main(["bench", "--model", "nope", "--device", "cpu"]) == 2
    assert "unknown benchmark model 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "tiny-sd3", "--device", "cpu", "--rows", "none,fast"]) == 2
    assert "unknown rows ['fast']" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "tiny-sd3", "--device", "cpu", "--steps", "-1"]) == 2
    assert parse_rows("model,none,model") == ["none", "model"]


def test_cli_names_the_same_models_and_rows_as_the_harness():
    assert cli.BENCH_MODELS == tuple(MODELS) and cli.BENCH_ROWS == tuple(ROWS)


def test_floors_are_measured():
    assert h2d_bandwidth(torch.device("cpu"), 1 << 20, repeats=2) > 1e8
    blocks = [torch.nn.Linear(64, 64) for _ in range(3)]
    with block_compute_times(blocks, torch.device("cpu")) as times:
        x = torch.randn(8, 64)
        for block in blocks:
            x = block(x)
    assert len(times) == 3 and all(t > 0 for t in times)


@pytest.mark.parametrize("name", [name for name, spec in MODELS.items() if spec.source != "tiny"])
def test_real_size_steps_have_the_shapes_their_transformers_take(name):
    # The step of every real-size model, run on the meta device: the inputs fit the published config and
    # the sequence is as long as the docs say, without a byte of memory.
    from diffusers_offload.planning.meta import build_components

    spec = MODELS[name]
    _, components = build_components(spec.source, only=("transformer",))
    dit = components["transformer"]
    calls = spec.make_inputs(dit, spec.height, spec.width, spec, torch.device("meta"), torch.bfloat16)
    assert len(calls) == spec.calls_per_step
    with torch.inference_mode():
        for kwargs in calls:
            (sample,) = dit(**kwargs)[:1]
            latents = kwargs.get("hidden_states", kwargs.get("x"))
            if isinstance(latents, list):  # Z-Image takes and returns one tensor per image
                assert [s.shape for s in sample] == [x.shape for x in latents]
            else:
                assert sample.shape == latents.shape
