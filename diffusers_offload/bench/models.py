"""The models the benchmark runs: how each is built and what one denoising step feeds its transformer.

Real-size models are built from the shipped configs with random weights, constructed on the device
(initialised there, every computed buffer right) and cast to the benchmark dtype; tiny ones come from
`diffusers_offload.tiny`. A step is the transformer calls of one denoising step at a realistic sequence
length: SD3.5 batches CFG into one call of batch 2, Qwen-Image's true CFG and Wan's CFG make two calls
of batch 1.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.loading import CheckpointWeights
from ..loader import build_model_without_weights
from ..model_registry import get_adapter, pipeline_modules
from ..planning.meta import build_components, quiet_libraries

Inputs = list[dict[str, Any]]  # one kwargs dict per transformer call of a step


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: where it comes from and the shape of a denoising step."""

    name: str
    source: str  # a shipped model id for `build_components`, or "tiny"
    make_inputs: Callable[[nn.Module, int, int, BenchModel, torch.device, torch.dtype], Inputs]
    calls_per_step: int  # transformer calls of one denoising step
    batch: int  # batch of each call
    text_tokens: int  # prompt length the DiT attends to
    height: int = 1024
    width: int = 1024
    tiny_builder: Callable[..., Any] | None = None
    frames: int = 1  # video models: frames of the clip


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    if device.type == "meta":  # shapes only (tests run the real-size steps on meta)
        return torch.empty(shape, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _sd3_inputs(dit: nn.Module, height: int, width: int, spec: BenchModel, device, dtype) -> Inputs:
    c = dit.config
    shape = (spec.batch, c.in_channels, height // 8, width // 8)
    return [
        dict(
            hidden_states=_randn(shape, device, dtype, 0),
            encoder_hidden_states=_randn(
                (spec.batch, spec.text_tokens, c.joint_attention_dim), device, dtype, 1
            ),
            pooled_projections=_randn((spec.batch, c.pooled_projection_dim), device, dtype, 2),
            timestep=torch.full((spec.batch,), 500.0, device=device),
            return_dict=False,
        )
    ]


def _qwen_image_inputs(dit: nn.Module, height: int, width: int, spec: BenchModel, device, dtype) -> Inputs:
    c = dit.config
    rows, cols = height // 16, width // 16  # VAE factor 8, then 2x2 patches packed into channels
    latents = _randn((spec.batch, rows * cols, c.in_channels), device, dtype, 0)
    calls = []
    for call in range(spec.calls_per_step):  # the prompt, then the negative prompt (true CFG)
        calls.append(
            dict(
                hidden_states=latents,
                encoder_hidden_states=_randn(
                    (spec.batch, spec.text_tokens, c.joint_attention_dim), device, dtype, 1 + call
                ),
                encoder_hidden_states_mask=torch.ones(spec.batch, spec.text_tokens, device=device),
                timestep=torch.full((spec.batch,), 0.5, device=device, dtype=dtype),
                img_shapes=[[(1, rows, cols)]] * spec.batch,
                return_dict=False,
            )
        )
    return calls


def _z_image_inputs(dit: nn.Module, height: int, width: int, spec: BenchModel, device, dtype) -> Inputs:
    c = dit.config
    return [
        dict(
            x=[
                _randn((c.in_channels, 1, height // 8, width // 8), device, dtype, i)
                for i in range(spec.batch)
            ],
            t=torch.full((spec.batch,), 0.5, device=device, dtype=dtype),
            cap_feats=[
                _randn((spec.text_tokens, c.cap_feat_dim), device, dtype, 10 + i) for i in range(spec.batch)
            ],
            return_dict=False,
        )
    ]


# Tiny DiTs get more blocks than the tiny pipelines' two, so that a ring of 2-3 slots really streams.
TINY_BLOCKS = 6


def _flux_inputs(dit: nn.Module, height: int, width: int, spec: BenchModel, device, dtype) -> Inputs:
    c = dit.config
    rows, cols = height // 16, width // 16  # VAE factor 8, then 2x2 patches packed into channels
    image_ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    image_ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    image_ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    batch = spec.batch
    call = dict(
        hidden_states=_randn((batch, rows * cols, c.in_channels), device, dtype, 0),
        encoder_hidden_states=_randn((batch, spec.text_tokens, c.joint_attention_dim), device, dtype, 1),
        pooled_projections=_randn((batch, c.pooled_projection_dim), device, dtype, 2),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=image_ids.reshape(rows * cols, 3),
        txt_ids=torch.zeros(spec.text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    if c.guidance_embeds:  # FLUX.1-dev is guidance-distilled: one call per step, the scale as an input
        call["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return [call]


def _wan_inputs(dit: nn.Module, height: int, width: int, spec: BenchModel, device, dtype) -> Inputs:
    c = dit.config
    latent_frames = (spec.frames - 1) // 4 + 1  # the VAE compresses time 4x, keeping the first frame
    latents = _randn((spec.batch, c.in_channels, latent_frames, height // 8, width // 8), device, dtype, 0)
    return [
        dict(  # the prompt, then the negative prompt (CFG as two calls)
            hidden_states=latents,
            timestep=torch.full((spec.batch,), 500, device=device, dtype=torch.long),
            encoder_hidden_states=_randn((spec.batch, spec.text_tokens, c.text_dim), device, dtype, 1 + call),
            return_dict=False,
        )
        for call in range(spec.calls_per_step)
    ]


def _tiny(module: str) -> Callable[..., Any]:
    """Builds `diffusers_offload.tiny.<module>`'s pipeline with a DiT of `TINY_BLOCKS` blocks."""

    def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
        import importlib

        tiny = importlib.import_module(f"diffusers_offload.tiny.{module}")
        pipe = getattr(tiny, f"build_tiny_{module}_pipeline")(seed, dtype)
        pipe.transformer = getattr(tiny, f"build_tiny_{module}_transformer")(
            seed, dtype, num_layers=TINY_BLOCKS
        )
        return pipe

    return build


MODELS: dict[str, BenchModel] = {
    spec.name: spec
    for spec in (
        # CFG batched into one call; 77 CLIP + 256 T5 tokens.
        BenchModel("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", _sd3_inputs, 1, 2, 333),
        # True CFG: two calls per step.
        BenchModel("qwen-image", "Qwen/Qwen-Image", _qwen_image_inputs, 2, 1, 128),
        # Turbo runs without CFG: one call of batch 1.
        BenchModel("z-image", "Tongyi-MAI/Z-Image-Turbo", _z_image_inputs, 1, 1, 128),
        # Guidance-distilled: one call per step; 512 T5 tokens.
        BenchModel("flux1-dev", "black-forest-labs/FLUX.1-dev", _flux_inputs, 1, 1, 512),
        # 480p, 25 frames: 7 latent frames of 30x52 patches, 10,920 tokens; CFG as two calls.
        BenchModel(
            "wan21-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", _wan_inputs, 2, 1, 512, 480, 832, frames=25
        ),
        BenchModel("tiny-sd3", "tiny", _sd3_inputs, 1, 2, 16, 64, 64, _tiny("sd3")),
        BenchModel("tiny-qwen-image", "tiny", _qwen_image_inputs, 2, 1, 16, 64, 64, _tiny("qwen_image")),
        BenchModel("tiny-z-image", "tiny", _z_image_inputs, 1, 1, 16, 64, 64, _tiny("z_image")),
        BenchModel("tiny-flux", "tiny", _flux_inputs, 1, 1, 16, 64, 64, _tiny("flux")),
        BenchModel("tiny-wan", "tiny", _wan_inputs, 2, 1, 16, 32, 32, _tiny("wan"), frames=5),
    )
}


def get_model(name: str) -> BenchModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}") from None


def build_pipeline(
    spec: BenchModel,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dit_only: bool = False,
    checkpoint: Path | None = None,
    into_offload: bool = False,
) -> tuple[Any, float | None]:
    """The pipeline with random weights on `device`, and the seconds `from_pretrained` took (checkpoint only).

    With `checkpoint`, the pipeline is the transformer alone: saved there once (random weights) and loaded
    back with `from_pretrained` on the CPU, as a user's would be (its host memory is then what a user has).
    `into_offload`: instead, as offload loading does, the transformer is built without weights and
    bound to the checkpoint; the next `enable_*_offload()` reads it straight into its slabs.
    """
    dit_only = dit_only or checkpoint is not None
    saved = checkpoint is not None and (checkpoint / "config.json").is_file()
    if spec.source == "tiny":
        with quiet_libraries():
            pipe = spec.tiny_builder(0, dtype)
        denoiser = get_adapter(pipe).denoiser
        if dit_only:
            for name in pipeline_modules(pipe):
                if name != denoiser:
                    setattr(pipe, name, None)
        pipe.to(device)
        components = {denoiser: getattr(pipe, denoiser)}
    else:
        torch.manual_seed(0)
        class_name, components = build_components(  # on meta when its weights come from the checkpoint
            spec.source,
            dtype=dtype,
            device="meta" if saved else device,
            only=("transformer",) if dit_only else None,
        )
        import diffusers

        pipeline_class = getattr(diffusers, class_name)
        parameters = inspect.signature(pipeline_class.__init__).parameters
        pipe = pipeline_class(**{name: components.get(name) for name in parameters if name != "self"})
    if checkpoint is None:
        return pipe, None
    transformer = components.pop("transformer")
    if not saved:
        transformer.save_pretrained(checkpoint)
    transformer_class = type(transformer)
    pipe.transformer = None
    del transformer  # freed before loading, so that host memory holds one copy
    started = time.perf_counter()
    if into_offload:
        transformer, stand_ins, entries = build_model_without_weights(transformer_class, checkpoint, dtype)
        weights = CheckpointWeights()
        weights.bind("transformer", stand_ins, entries)
        pipe.transformer = transformer
        pipe._weights_source = weights  # read (and closed) by the row's enable_*_offload()
    else:
        pipe.transformer = transformer_class.from_pretrained(checkpoint, torch_dtype=dtype)
    return pipe, time.perf_counter() - started


def text_encoder_inputs(pipe: Any, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Random prompt ids for each text encoder the pipeline has: each runs once per image."""
    adapter = get_adapter(pipe)
    inputs = {}
    for name in adapter.encoders:
        encoder = getattr(pipe, name, None)
        if encoder is None or not hasattr(encoder, "config") or name == "image_encoder":
            continue
        text = (
            encoder.config.get_text_config() if hasattr(encoder.config, "get_text_config") else encoder.config
        )
        tokens = min(256, getattr(text, "max_position_embeddings", 256) or 256)
        generator = torch.Generator().manual_seed(len(inputs))
        ids = torch.randint(0, text.vocab_size, (1, tokens), generator=generator)
        inputs[name] = {"input_ids": ids.to(device)}
    return inputs
