"""Measured activation peaks on the CPU beside `planning.activations`' estimates.

Each row builds a real-size model from the shipped configs with random weights (the DiT with one block of
each kind, since activations do not pile up across blocks at inference), runs one denoiser call or one
VAE decode in bfloat16 at a CPU-sized resolution and counts the peak bytes of the tensors it creates
(`bench.live_bytes.LiveTensorBytes`), then prints them next to the estimate for the same size.

    python benchmarks/activation_peaks.py            # every row (about 9 minutes on 2 cores)
    python benchmarks/activation_peaks.py --only wan  # rows whose name contains "wan"
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import diffusers
import torch
from torch.utils._pytree import tree_leaves

from diffusers_offload.bench.live_bytes import LiveTensorBytes
from diffusers_offload.bench.models import MODELS
from diffusers_offload.planning import format_bytes
from diffusers_offload.planning.activations import estimate_activations
from diffusers_offload.planning.meta import CONFIGS_DIR, quiet_libraries
from diffusers_offload.planning.tables import format_table

DTYPE = torch.bfloat16
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Row:
    name: str
    folder: str  # under model_registry/configs
    family: str  # adapter name
    part: str  # "denoiser" or "vae"
    height: int
    width: int
    frames: int | None = None
    layers: dict[str, int] | None = None  # config overrides: one block of each kind
    inputs: Callable[..., dict[str, Any]] | None = None
    pipeline_config: dict[str, Any] | None = None
    guidance_scale: float | None = None  # for the estimate: 0 runs Z-Image without its batched CFG


def _config(folder: str, part: str) -> dict[str, Any]:
    with open(CONFIGS_DIR / folder / part / "config.json", encoding="utf-8") as f:
        return json.load(f)


def _bench_inputs(
    model: str, frames: int | None = None, text_tokens: int | None = None
) -> Callable[..., dict[str, Any]]:
    spec = MODELS[model]
    if frames is not None:
        spec = replace(spec, frames=frames)
    if text_tokens is not None:  # the prompt length the estimate assumes (the pipeline's maximum)
        spec = replace(spec, text_tokens=text_tokens)
    return lambda dit, height, width: spec.make_inputs(dit, height, width, spec, CPU, DTYPE)[0]


def _ti2v_inputs(dit: Any, height: int, width: int, frames: int) -> dict[str, Any]:
    c = dit.config
    latents = torch.randn(1, c.in_channels, (frames - 1) // 4 + 1, height // 16, width // 16, dtype=DTYPE)
    tokens = latents.shape[2] * latents.shape[3] * latents.shape[4] // 4
    return dict(  # expand_timesteps: one timestep per token, as the pipeline passes them
        hidden_states=latents,
        timestep=torch.full((1, tokens), 500.0),
        encoder_hidden_states=torch.randn(1, 512, c.text_dim, dtype=DTYPE),
        return_dict=False,
    )


def _hunyuan_inputs(dit: Any, height: int, width: int, frames: int) -> dict[str, Any]:
    c = dit.config
    latents = torch.randn(1, c.in_channels, (frames - 1) // 4 + 1, height // 16, width // 16, dtype=DTYPE)
    return dict(
        hidden_states=latents,
        timestep=torch.full((1,), 500.0, dtype=DTYPE),
        encoder_hidden_states=torch.randn(1, 1000, c.text_embed_dim, dtype=DTYPE),
        encoder_attention_mask=torch.ones(1, 1000),
        encoder_hidden_states_2=torch.randn(1, 256, c.text_embed_2_dim, dtype=DTYPE),
        encoder_attention_mask_2=torch.ones(1, 256),
        image_embeds=torch.zeros(1, 729, c.image_embed_dim, dtype=DTYPE),
        return_dict=False,
    )


ROWS = (
    Row("sd35-large DiT", "sd35-large", "sd3", "denoiser", 1024, 1024, None, {"num_layers": 1}),
    Row("qwen-image DiT", "qwen-image", "qwen-image", "denoiser", 1024, 1024, None, {"num_layers": 1}),
    Row(
        "z-image DiT",
        "z-image-turbo",
        "z-image",
        "denoiser",
        1024,
        1024,
        None,
        {"n_layers": 1, "n_refiner_layers": 1},
        guidance_scale=0.0,  # the benchmark's call is batch 1 (Turbo without CFG)
    ),
    Row(
        "flux1-dev DiT",
        "flux1-dev",
        "flux",
        "denoiser",
        1024,
        1024,
        None,
        {"num_layers": 1, "num_single_layers": 1},
    ),
    Row("wan21-t2v-14b DiT", "wan21-t2v-14b", "wan", "denoiser", 480, 832, 9, {"num_layers": 1}),
    Row(
        "wan22-ti2v-5b DiT",
        "wan22-ti2v-5b",
        "wan",
        "denoiser",
        480,
        832,
        33,
        {"num_layers": 1},
        _ti2v_inputs,
        {"expand_timesteps": True},
    ),
    Row(
        "hunyuanvideo15 DiT",
        "hunyuanvideo15-720p-t2v",
        "hunyuanvideo15",
        "denoiser",
        480,
        848,
        9,
        {"num_layers": 1, "num_refiner_layers": 1},
        _hunyuan_inputs,
    ),
    Row("flux1-dev VAE (KL)", "flux1-dev", "flux", "vae", 512, 512),
    Row("qwen-image VAE", "qwen-image", "qwen-image", "vae", 512, 512),
    Row("wan21 VAE", "wan21-t2v-14b", "wan", "vae", 256, 256, 17),
    Row("wan22-ti2v-5b VAE", "wan22-ti2v-5b", "wan", "vae", 256, 256, 9),
    Row("hunyuanvideo15 VAE", "hunyuanvideo15-720p-t2v", "hunyuanvideo15", "vae", 128, 128, 17),
)

_DEFAULT_INPUTS = {
    "sd35-large": _bench_inputs("sd35-medium"),
    "qwen-image": _bench_inputs("qwen-image", text_tokens=512),
    "z-image-turbo": _bench_inputs("z-image", text_tokens=512),
    "flux1-dev": _bench_inputs("flux1-dev"),
}


def _build(cls: type, config: dict[str, Any], overrides: dict[str, int] | None) -> Any:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(overrides or {})
    torch.manual_seed(0)
    with quiet_libraries():
        return cls.from_config(config).to(DTYPE).eval()


def _peak(module: torch.nn.Module, run: Callable[[], Any], inputs: list[Any]) -> int:
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    excluded = [*module.parameters(), *module.buffers(), *tensors]
    with torch.no_grad(), LiveTensorBytes(exclude=excluded) as live:
        run()
    return live.peak


def measure(row: Row) -> tuple[int, int, str]:
    """(measured peak, estimated bytes, what was run) for one row."""
    transformer, vae = _config(row.folder, "transformer"), _config(row.folder, "vae")
    estimate = estimate_activations(
        row.family,
        transformer,
        vae,
        pipeline_config=row.pipeline_config,
        height=row.height,
        width=row.width,
        frames=row.frames,
        guidance_scale=row.guidance_scale,
    )
    if row.part == "denoiser":
        dit = _build(getattr(diffusers, transformer["_class_name"]), transformer, row.layers)
        if row.inputs is not None:
            call = row.inputs(dit, row.height, row.width, row.frames)
        elif row.folder == "wan21-t2v-14b":
            call = _bench_inputs("wan21-t2v-14b", row.frames)(dit, row.height, row.width)
        else:
            call = _DEFAULT_INPUTS[row.folder](dit, row.height, row.width)
        peak = _peak(dit, lambda: dit(**call), [call])
        what = f"{estimate.tokens} tokens + {estimate.context_tokens} context, batch {estimate.call_batch}"
        return peak, estimate.denoiser_bytes, what
    model = _build(getattr(diffusers, vae["_class_name"]), vae, None)
    factor = 16 if vae.get("scale_factor_spatial") == 16 or "spatial_compression_ratio" in vae else 8
    channels = vae.get("latent_channels") or vae.get("z_dim")
    shape = (1, channels, row.height // factor, row.width // factor)
    if row.frames is not None:
        shape = (*shape[:2], (row.frames - 1) // 4 + 1, *shape[2:])
    elif "temperal_downsample" in vae:  # a video VAE decoding one image (Qwen-Image)
        shape = (*shape[:2], 1, *shape[2:])
    latents = torch.randn(shape, dtype=DTYPE)
    peak = _peak(model, lambda: model.decode(latents), [latents])
    frames = f", {row.frames} frames" if row.frames else ""
    return peak, estimate.vae_bytes, f"decode {row.width}x{row.height}{frames}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the rows whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for row in ROWS:
        if args.only not in row.name:
            continue
        started = time.perf_counter()
        peak, estimate, what = measure(row)
        size = f"{row.width}x{row.height}" + (f"x{row.frames}" if row.frames else "")
        rows.append(
            (
                row.name,
                size,
                what,
                format_bytes(peak),
                format_bytes(estimate),
                f"{estimate / peak:.2f}",
                f"{time.perf_counter() - started:.0f}",
            )
        )
        print(rows[-1], flush=True)
    headers = ("row", "size", "what ran", "measured", "estimate", "est/meas", "s")
    print(format_table(headers, rows, right=(False, False, False, True, True, True, True)))


if __name__ == "__main__":
    main()
