"""The `diffusers-offload` command line: each verb's happy path and its bad-input path."""

import time

import pytest

from diffusers_offload.cli import main
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline

SHIPPED = [
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
    "Qwen/Qwen-Image",
    "Tongyi-MAI/Z-Image-Turbo",
    "meituan-longcat/LongCat-Image",
    "AIDC-AI/Ovis-Image-7B",
    "stepfun-ai/NextStep-1.1",
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.2-dev",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v",
]


def test_demo_runs_every_strategy(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0
    for strategy in ("none", "model", "layerwise"):
        line = next(line for line in printed.splitlines() if line.startswith(strategy))
        assert line.rstrip().endswith("True")


@pytest.mark.parametrize("model", SHIPPED)
def test_plan_every_shipped_model(model, capsys):
    start = time.perf_counter()
    # HunyuanVideo-1.5's 720p, 121-frame default needs a 16 GiB reserve (its VAE decodes every frame of a
    # tile at once): 12 GiB plans a shorter 480p clip.
    size = ["--height", "480", "--width", "848", "--frames", "61"] if "HunyuanVideo" in model else []
    assert main(["plan", model, "--budget", "12GiB", *size]) == 0
    assert time.perf_counter() - start < 20
    printed = capsys.readouterr().out
    assert "peak" in printed and "of 12.00 GiB budget" in printed
    assert "streamed" in printed or "swapped" in printed  # none of the six fits 12 GiB whole


def test_plan_bad_inputs(capsys):
    assert main(["plan", "no-such/model", "--budget", "12GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model" in err
    assert main(["plan", "sd35-medium", "--budget", "twelve"]) == 2
    assert "--budget twelve: not a size; write e.g. 12GiB" in capsys.readouterr().err
    assert main(["plan", "sd35-medium", "--budget", "1GiB"]) == 2
    assert "at least" in capsys.readouterr().err
    assert main(["plan", "sd35-medium"]) == 2  # --budget is required


@pytest.mark.parametrize("verb", ["demo", "plan", "generate"])
def test_help_for_each_verb(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert f"usage: diffusers-offload {verb}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("offload", ["none", "model", "layerwise", "auto"])
def test_generate_from_a_local_folder(saved_pipeline, tmp_path, capsys, monkeypatch, offload):
    import diffusers_offload.pipeline as pipeline_module

    read = []
    plain_read = pipeline_module.pread_into
    monkeypatch.setattr(pipeline_module, "pread_into", lambda *a: (read.append(a), plain_read(*a)))
    out = tmp_path / "image.png"
    args = ["generate", str(saved_pipeline), "--prompt", "a cat", "--offload", offload, "--device", "cpu"]
    args += ["--dtype", "float32", "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)]
    if offload == "auto":
        args += ["--budget", "64MiB", "--reserve", "32MiB"]
    assert main(args) == 0
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert ("host copy" in printed) == (offload != "none")
    # Offloading loads through offload loading: the weights are read from the files into the slabs.
    assert bool(read) == (offload != "none")


def test_generate_bad_inputs(saved_pipeline, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error: no folder " in capsys.readouterr().err
    args = ["generate", str(saved_pipeline), "--prompt", "x", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--offload", "model", "--budget", "1GiB"]) == 2
    assert "--budget applies" in capsys.readouterr().err


def test_plan_counts_cfg_calls_per_step_and_bytes_per_video(capsys):
    model = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert main(["plan", model, "--budget", "24GiB", "--steps", "40"]) == 0
    with_cfg = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in with_cfg.splitlines() if line.startswith("transformer")}
    assert (
        rows["transformer"][2] == rows["transformer_2"][2] == "streamed"
    )  # both experts, never swapped whole
    assert "(2 denoiser calls)" in with_cfg and "moved per image/video at 40 steps" in with_cfg
    assert main(["plan", model, "--budget", "24GiB", "--steps", "40", "--guidance-scale", "1"]) == 0
    without = capsys.readouterr().out
    assert "denoiser calls" not in without

    def per_step(printed: str) -> str:
        return printed.split(" moved per denoising step")[0].rsplit(", ", 1)[1]

    value, unit = per_step(with_cfg).split()
    half, half_unit = per_step(without).split()
    assert unit == half_unit and float(value) == pytest.approx(2 * float(half), abs=0.01)
    # FLUX.1 runs true CFG only with a negative prompt.
    assert main(["plan", "flux1-dev", "--budget", "12GiB", "--guidance-scale", "3"]) == 0
    assert "denoiser calls" not in capsys.readouterr().out
    assert main(["plan", "flux1-dev", "--budget", "12GiB", "--guidance-scale", "3", "--negative-prompt"]) == 0
    assert "(2 denoiser calls)" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["wan-2.2", "flux2"])
def test_generate_video_and_flux2_from_a_local_folder(model, tmp_path, capsys):
    import functools

    from PIL import Image

    from diffusers_offload.tiny.flux2 import build_tiny_flux2_pipeline
    from diffusers_offload.tiny.wan import build_tiny_wan_pipeline

    builders = {
        "wan-2.2": functools.partial(build_tiny_wan_pipeline, two_experts=True),
        "flux2": build_tiny_flux2_pipeline,
    }
    builders[model]().save_pretrained(tmp_path / model)
    out = tmp_path / "out.png"
    args = [
        "generate",
        str(tmp_path / model),
        "--prompt",
        "a cat",
        "--offload",
        "layerwise",
        "--device",
        "cpu",
    ]
    args += ["--dtype", "float32", "--steps", "2", "--out", str(out)]
    if model == "wan-2.2":
        args += ["--height", "32", "--width", "32", "--frames", "5"]
    else:
        args += ["--height", "64", "--width", "64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    with Image.open(out) as saved:
        assert getattr(saved, "n_frames", 1) == (5 if model == "wan-2.2" else 1)
    assert "host copy" in printed
    if model == "wan-2.2":  # both experts streamed
        assert (
            sum(
                line.split()[1] == "streamed"
                for line in printed.splitlines()
                if line.startswith("transformer")
            )
            == 2
        )


def test_plan_takes_the_pipelines_default_steps(capsys):
    assert main(["plan", "flux1-dev", "--budget", "16GiB"]) == 0
    assert "moved per image/video at 28 steps" in capsys.readouterr().out  # FluxPipeline's default
    assert main(["plan", "nextstep", "--budget", "16GiB"]) == 0
    assert "per image/video" not in capsys.readouterr().out  # autoregressive: no denoising steps
