"""The activation reserve estimated from a call's size: tokens from the configs, the formula checked against
peaks counted on the CPU, errors that name the fix, and the planner giving a bigger video fewer blocks."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import diffusers_offload as dof
from diffusers_offload.bench.live_bytes import LiveTensorBytes
from diffusers_offload.cli import main
from diffusers_offload.model_registry import get_adapter
from diffusers_offload.planning import measure_components, plan_offload
from diffusers_offload.planning.activations import estimate_activations, estimate_for_components
from diffusers_offload.planning.meta import CONFIGS_DIR, build_meta_components, pipeline_config
from diffusers_offload.tiny.flux import build_tiny_flux_pipeline
from diffusers_offload.tiny.wan import build_tiny_wan_pipeline

BF16 = torch.bfloat16


def _configs(folder: str) -> tuple[dict, dict]:
    read = lambda part: json.loads((CONFIGS_DIR / folder / part / "config.json").read_text())  # noqa: E731
    return read("transformer"), read("vae")


def _estimate(model: str, **size):
    class_name, components = build_meta_components(model)
    adapter = get_adapter(class_name, components=components)
    return estimate_for_components(
        adapter, components, pipeline_class=class_name, pipeline_config=pipeline_config(model), **size
    )


@pytest.mark.parametrize(
    ("model", "size", "tokens"),
    [
        ("flux1-dev", {}, 64 * 64),  # 1024 px / (VAE 8 x packed 2x2)
        ("sd35-medium", {"height": 512, "width": 768}, 32 * 48),
        ("qwen-image", {"height": 1328, "width": 1328}, 83 * 83),
        ("z-image", {}, 64 * 64),
        ("wan21-t2v-14b", {}, 21 * 30 * 52),  # 81 frames -> 21 latent frames of 480/16 x 832/16
        ("wan22-ti2v-5b", {"height": 704, "width": 1280, "frames": 121}, 31 * 22 * 40),  # VAE 16 x patch 2
        ("hunyuanvideo-1.5", {}, 31 * 45 * 80),  # 720 x 1280, 121 frames, VAE 16, patch 1
    ],
)
def test_tokens_follow_the_vae_factor_and_patch_of_the_shipped_configs(model, size, tokens):
    assert _estimate(model, **size).tokens == tokens


def test_the_estimate_grows_with_size_frames_and_batch():
    base = _estimate("wan21-t2v-14b")
    assert (base.height, base.width, base.frames, base.batch) == (480, 832, 81, 1)  # the pipeline's defaults
    longer = _estimate("wan21-t2v-14b", frames=121)
    larger = _estimate("wan21-t2v-14b", height=720, width=1280)
    two = _estimate("wan21-t2v-14b", batch=2)
    assert longer.denoiser_bytes > base.denoiser_bytes and larger.vae_bytes > base.vae_bytes
    assert two.denoiser_bytes == 2 * base.denoiser_bytes and two.reserve_bytes > base.reserve_bytes
    # SD3 and Z-Image batch CFG's two predictions into one call: twice the batch in the denoiser, unless
    # guidance is off.
    assert _estimate("sd35-medium").call_batch == 2 and _estimate("z-image").call_batch == 2
    assert _estimate("sd35-medium", guidance_scale=1.0).call_batch == 1
    assert _estimate("z-image", guidance_scale=0.0).call_batch == 1
    assert _estimate("flux1-dev").call_batch == 1
    # Wan 2.2 TI2V-5B's per-token timesteps (model_index expand_timesteps) cost more per token.
    ti2v = _estimate("wan22-ti2v-5b")
    transformer, vae = _configs("wan22-ti2v-5b")
    plain = estimate_activations("wan", transformer, vae)
    assert ti2v.denoiser_bytes > 2 * plain.denoiser_bytes


def _counted_peak(module: torch.nn.Module, run, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), LiveTensorBytes(exclude=[*module.parameters(), *module.buffers(), *inputs]) as live:
        run()
    return live.peak


def _narrow(config: dict, **overrides) -> dict:
    return {**{k: v for k, v in config.items() if not k.startswith("_")}, **overrides}


def test_wan_denoiser_estimate_matches_a_counted_forward():
    """A Wan block at a narrower width (one layer: activations do not pile up across blocks)."""
    transformer, vae = _configs("wan21-t2v-14b")
    config = _narrow(transformer, num_layers=1, num_attention_heads=4, ffn_dim=1382, text_dim=512)
    torch.manual_seed(0)
    dit = diffusers.WanTransformer3DModel(**config).to(BF16).eval()
    height, width, frames = 256, 384, 17
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, dtype=BF16)
    text = torch.randn(1, 512, 512, dtype=BF16)
    t = torch.tensor([500.0])
    peak = _counted_peak(dit, lambda: dit(latents, t, text, return_dict=False), latents, text, t)
    config["_class_name"] = "WanTransformer3DModel"
    estimate = estimate_activations("wan", config, vae, height=height, width=width, frames=frames)
    assert 0.8 < estimate.denoiser_bytes / peak < 1.2


def test_flux_denoiser_estimate_matches_a_counted_forward():
    transformer, vae = _configs("flux1-dev")
    config = _narrow(
        transformer, num_layers=1, num_single_layers=1, num_attention_heads=4, joint_attention_dim=256
    )
    torch.manual_seed(0)
    dit = diffusers.FluxTransformer2DModel(**config).to(BF16).eval()
    height = width = 512
    rows, cols = height // 16, width // 16
    grid = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack(grid, -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=torch.randn(1, rows * cols, 64, dtype=BF16),
        encoder_hidden_states=torch.randn(1, 512, 256, dtype=BF16),
        pooled_projections=torch.randn(1, 768, dtype=BF16),
        timestep=torch.tensor([0.5], dtype=BF16),
        img_ids=torch.cat([torch.zeros(rows * cols, 1), ids], 1).to(BF16),
        txt_ids=torch.zeros(512, 3, dtype=BF16),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    peak = _counted_peak(dit, lambda: dit(**inputs), *tensors)
    config["_class_name"] = "FluxTransformer2DModel"
    estimate = estimate_activations("flux", config, vae, height=height, width=width)
    assert 0.8 < estimate.denoiser_bytes / peak < 1.2


@pytest.mark.parametrize("channels", [(32, 64, 64, 64), (64, 64, 64, 64)])
def test_kl_vae_decode_estimate_matches_a_counted_decode(channels):
    """Either the last upsampler's output or the last up block sets the peak, depending on the widths."""
    transformer, vae = _configs("flux1-dev")
    config = _narrow(vae, block_out_channels=list(channels))
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**config).to(BF16).eval()
    latents = torch.randn(1, 16, 32, 32, dtype=BF16)
    peak = _counted_peak(model, lambda: model.decode(latents), latents)
    transformer["_class_name"] = "FluxTransformer2DModel"
    estimate = estimate_activations("flux", transformer, config, height=256, width=256)
    assert 0.9 < estimate.vae_bytes / peak < 1.1


def test_wan_video_vae_estimate_matches_a_counted_decode():
    """Wan's VAE decodes latent frame by frame: its peak does not grow with the clip."""
    transformer, vae = _configs("wan21-t2v-14b")
    config = _narrow(vae, base_dim=16)
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**config).to(BF16).eval()
    latents = torch.randn(1, 16, 4, 16, 16, dtype=BF16)  # 13 frames of 128 x 128
    peak = _counted_peak(model, lambda: model.decode(latents), latents)
    config["_class_name"] = "AutoencoderKLWan"
    estimate = estimate_activations("wan", transformer, config, height=128, width=128, frames=13)
    assert 0.85 < estimate.vae_bytes / peak < 1.15


@pytest.mark.parametrize(
    ("model", "flags", "message"),
    [
        ("flux1-dev", ["--frames", "17"], "--frames 17: frames apply to video pipelines"),
        ("flux1-dev", ["--height", "1000"], "--height 1000: not a multiple of 16 (VAE factor 8 x patch 2)"),
        ("flux1-dev", ["--height", "1000"], "use 992 or 1008"),
        ("wan22-ti2v-5b", ["--width", "848"], "not a multiple of 32 (VAE factor 16 x patch 2)"),
        ("wan21-t2v-14b", ["--frames", "80"], "frames must be 4k+1; use 77 or 81"),
        ("nextstep", ["--height", "512"], "no activation model for adapter 'nextstep'"),
    ],
)
def test_plan_refuses_sizes_the_pipeline_cannot_make_naming_the_fix(model, flags, message, capsys):
    assert main(["plan", model, "--budget", "48GiB", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_plan_prints_the_estimate_and_a_bigger_video_leaves_fewer_resident_blocks(capsys):
    assert main(["plan", "wan21-t2v-14b", "--budget", "40GiB", "--height", "720", "--width", "1280"]) == 0
    printed = capsys.readouterr().out
    assert "activations at 1280x720, 81 frames, batch 1: denoiser" in printed

    class_name, components = build_meta_components("wan21-t2v-14b")
    adapter = get_adapter(class_name, components=components)
    sizes = measure_components(adapter.components(components), adapter)
    resident, reserves = [], []
    for size in ({}, {"height": 720, "width": 1280}, {"height": 720, "width": 1280, "batch": 2}):
        activations = estimate_for_components(adapter, components, pipeline_class=class_name, **size)
        plan = plan_offload(sizes, "32GiB", strategy="layerwise", activations=activations)
        assert plan.reserve_bytes == activations.reserve_bytes
        assert plan.peak_device_bytes <= plan.budget_bytes
        resident.append(len(plan.component("transformer").resident_blocks))
        reserves.append(plan.reserve_bytes)
    assert reserves[0] < reserves[1] < reserves[2]
    assert resident[0] > resident[1] > resident[2]
    # A reserve given by hand wins over the estimate.
    given = plan_offload(sizes, "32GiB", strategy="layerwise", reserve="1GiB", activations=activations)
    assert given.reserve_bytes == 2**30 and "not used: the reserve was given" in str(given)


def test_pipeline_planning_takes_the_call_size():
    pipe = dof.attach(build_tiny_wan_pipeline())
    handle = pipe.enable_offload("4GiB", "cpu", height=64, width=96, frames=9, batch=2)
    activations = handle.plan.activations
    assert (activations.height, activations.width, activations.frames, activations.batch) == (64, 96, 9, 2)
    assert handle.plan.reserve_bytes == activations.reserve_bytes
    pipe.disable_offload()
    flux = dof.attach(build_tiny_flux_pipeline())
    with pytest.raises(ValueError, match="frames=5: frames apply to video pipelines; FluxPipeline makes"):
        flux.enable_offload("4GiB", "cpu", frames=5)
    assert flux.offload_handle is None  # nothing applied
    with pytest.raises(ValueError, match="apply to planning within a budget"):
        flux.enable_layerwise_offload("cpu", height=512)
