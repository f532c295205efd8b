"""Activation memory of one pipeline call, estimated from its resolution, frames and batch.

The planner keeps ``reserve`` bytes of the budget free for everything that is not a weight. This module
estimates that reserve from the call instead of assuming a fixed 1 GiB. Two phases can set the peak, and
they never overlap (the VAE runs after the last denoising step):

**Denoiser forward.** Tokens per sample ``L = frames_lat * (height / (s * p)) * (width / (s * p))``, with
the VAE's spatial factor ``s`` (``2 ** (len(block_out_channels) - 1)``, or the config's
``scale_factor_spatial`` / ``spatial_compression_ratio``), the DiT's patch ``p`` (2 where FLUX-style
pipelines pack 2x2 latents) and, for video, ``frames_lat = (frames - 1) / t + 1`` (temporal factor
``t``). Attention runs through SDPA (flash or memory-efficient kernels on an accelerator, the flash kernel
on the CPU), which never holds the ``L x L`` score matrix, so every live tensor is ``tokens x width`` and
the peak is linear in tokens::

    denoiser = batch * cfg_batch * c * hidden * (L + L_ctx) * (element_size / 2)

``hidden`` is ``heads * head_dim``; ``L_ctx`` the text (and image-prompt) tokens where they join the
image tokens in one sequence (FLUX, Qwen-Image, Z-Image, HunyuanVideo-1.5; the prompt's maximum length),
0 where text only enters through cross-attention or its own stream (Wan, SD3). ``cfg_batch`` is 2 where
the pipeline batches the conditional and unconditional predictions into one call (SD3, Z-Image), else 1
(pipelines that make two calls reuse the same memory). ``c`` is the bytes per token and hidden unit of
the largest live set of the forward at 16-bit activations, where a block's expanded MLP hidden
(``ffn_dim`` wide) or its float32 residual update is alive: Wan upcasts ``hidden_states.float() +
ff_output.float() * gate``, 4 float32 copies next to 3 bf16 ones, ``3 * 2 + 4 * 4 = 22``. ``c`` was
counted on the CPU with one block of each kind at the real hidden size and two token counts (the slope,
so constant terms drop out); see ``benchmarks/activation_peaks.py`` and docs/benchmarks.md. Wan 2.2
TI2V-5B's per-token timesteps (``expand_timesteps``) add a float32 ``6 x hidden`` modulation per token,
twice: ``c = 66``. Float32 activations are taken as twice the 16-bit figure (an upper bound).

**VAE decode.** Bytes per output pixel times the pixels decoded at a time, plus the decoded image or
video, held twice while the pipeline concatenates the frames::

    vae = batch * (v * height * width * frames_at_once * (element_size / 2) + 2 * 3 * frames * height
                   * width * element_size)

Image VAEs decode the whole image; the Wan VAEs decode one latent frame at a time with a causal cache
(``frames_at_once = 1``: their peak does not grow with the clip); HunyuanVideo-1.5's decodes every frame
at once (``frames_at_once = frames``), of one 256 x 256 tile when ``vae.enable_tiling()`` is on. ``v``
follows the VAE's channel widths (AutoencoderKL: ``2 * max(3 * block_out_channels[1], 5 *
block_out_channels[0])``, counted at three widths; the Wan and HunyuanVideo-1.5 VAEs: proportional to
their base width, counted at the published one).

**Reserve** ``= max(denoiser, vae) + 10% + 256 MiB`` for the caching allocator's rounding, kernel
workspaces (cuBLAS, attention), the latents and prompt embeddings held across the loop and the
schedulers' small tensors. Text encoders run before the loop at <= 1024 tokens; their activations are
assumed below both phases. All of this is counted on the CPU; device peaks are not measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .budget import format_bytes

MARGIN_BYTES = 256 * 2**20
MARGIN_FRACTION = 0.10
_MEASURED_DTYPE_BYTES = 2  # the coefficients below are counted with bfloat16 activations


@dataclass(frozen=True)
class _Family:
    """How one adapter's pipelines turn height/width/frames into tokens, and the counted coefficients."""

    c: float  # denoiser bytes per token per hidden unit (16-bit activations)
    v: Callable[[Mapping[str, Any]], float]  # VAE decode bytes per output pixel (of one frame, or of
    # every frame if `whole_clip_vae`), from the VAE's config
    default_height: int | Callable[[Mapping[str, Any]], int]
    default_width: int | Callable[[Mapping[str, Any]], int]
    context_tokens: int = 0  # text/image-prompt tokens in the same sequence as the image tokens
    default_frames: int | None = None  # None: an image pipeline
    cfg_batch: int = 1  # 2 where cond and uncond are one call of twice the batch
    cfg_above: float = 1.0  # ... while guidance_scale is above this (the pipeline's default scale is)
    image_condition: bool = False  # edit pipelines: the input image's latents join the sequence
    c_expanded_timesteps: float | None = None  # Wan 2.2 TI2V-5B (pipeline config expand_timesteps)
    measured: bool = True  # c counted on this family's own blocks (else borrowed, see `notes`)
    whole_clip_vae: bool = False  # the VAE decodes every frame at once (HunyuanVideo-1.5), not chunks
    notes: str = ""


def _sample_size(configs: Mapping[str, Any]) -> int:
    """SD3: ``transformer.config.sample_size * vae_scale_factor`` (1024 for SD3.5)."""
    return int(configs["transformer"].get("sample_size", 128)) * _spatial_factor(configs["vae"])


def _hunyuan_size(configs: Mapping[str, Any]) -> tuple[int, int]:
    """HunyuanVideo-1.5 picks the 16:9 bucket of its transformer's ``target_size`` (720 x 1280 at 960)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    factor = _spatial_factor(configs["vae"])
    target = int(configs["transformer"].get("target_size", 960))
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=factor)
    height, width = processor.calculate_default_height_width(9, 16, target)
    return int(height), int(width)


def _kl_vae(vae: Mapping[str, Any]) -> float:
    """AutoencoderKL: its last upsampler's output (``block_out_channels[1]`` wide) at full resolution, three
    bf16 copies, or the last up block (``block_out_channels[0]``) with five: counted at (32, 64), (64, 64)
    and (128, 256) channels."""
    channels = list(vae.get("block_out_channels") or (128, 256))
    return 2.0 * max(3 * channels[min(1, len(channels) - 1)], 5 * channels[0])


def _per_channel(key: str, per_channel: float) -> Callable[..., float]:
    """A VAE whose decode peak per output pixel is taken to scale with one channel count of its config
    (counted at the published width only)."""

    def v(vae: Mapping[str, Any]) -> float:
        value = vae.get(key) or 0
        if isinstance(value, (list, tuple)):
            value = value[0]
        return per_channel * float(value)

    return v


def _wan_vae(vae: Mapping[str, Any]) -> float:
    if vae.get("decoder_base_dim"):  # Wan 2.2's 16x VAE (TI2V-5B): 10,940 B per pixel at 256
        return 42.8 * vae["decoder_base_dim"]
    return 106.6 * vae.get("base_dim", 96)  # Wan 2.1's: 10,230 B per pixel at 96


# Coefficients: see the module docstring and docs/benchmarks.md (counted at diffusers 0.42.1).
_FLUX = dict(c=35.0, v=_kl_vae, default_height=1024, default_width=1024, context_tokens=512)
_QWEN = dict(
    c=31.0, v=_per_channel("base_dim", 36.2), default_height=1024, default_width=1024, context_tokens=512
)
_FAMILIES: dict[str, _Family] = {
    "flux": _Family(**_FLUX, notes="FLUX.1; Kontext's input image adds its tokens (not counted)"),
    "flux2": _Family(**_FLUX, measured=False, notes="c borrowed from FLUX.1 (same block kinds)"),
    "longcat-image": _Family(**_FLUX, measured=False, notes="c borrowed from FLUX.1 (FLUX-style blocks)"),
    "longcat-image-edit": _Family(
        **_FLUX, image_condition=True, measured=False, notes="c borrowed from FLUX.1"
    ),
    "ovis-image": _Family(**{**_FLUX, "context_tokens": 256}, measured=False, notes="c borrowed from FLUX.1"),
    "qwen-image": _Family(**_QWEN),
    "qwen-image-edit": _Family(**_QWEN, image_condition=True),
    # Z-Image batches CFG whenever guidance_scale > 0 (default 5.0; Turbo is usually run at 0).
    "z-image": _Family(
        c=32.0,
        v=_kl_vae,
        default_height=1024,
        default_width=1024,
        context_tokens=512,
        cfg_batch=2,
        cfg_above=0.0,
    ),
    "sd3": _Family(c=27.0, v=_kl_vae, default_height=_sample_size, default_width=_sample_size, cfg_batch=2),
    "wan": _Family(
        c=23.0,
        # Per output pixel: 10,230 B counted for Wan 2.1's VAE (base_dim 96), 10,940 for TI2V-5B's
        # (decoder_base_dim 256).
        v=_wan_vae,
        default_height=480,
        default_width=832,
        default_frames=81,
        c_expanded_timesteps=66.0,
    ),
    "hunyuanvideo15": _Family(
        c=29.0,
        v=_per_channel("block_out_channels", 14.05),  # per pixel of every output frame: 1,796 counted
        whole_clip_vae=True,
        default_height=lambda configs: _hunyuan_size(configs)[0],
        default_width=lambda configs: _hunyuan_size(configs)[1],
        default_frames=121,
        context_tokens=1000 + 256 + 729,  # Qwen2.5-VL prompt, ByT5 glyphs, SigLIP image slots
    ),
}


def _spatial_factor(vae: Mapping[str, Any]) -> int:
    for key in ("scale_factor_spatial", "spatial_compression_ratio"):
        if vae.get(key):
            return int(vae[key])
    if "temperal_downsample" in vae:  # Wan-style VAE used for images (Qwen-Image)
        return 2 ** len(vae["temperal_downsample"])
    return 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def _temporal_factor(vae: Mapping[str, Any]) -> int:
    for key in ("scale_factor_temporal", "temporal_compression_ratio"):
        if vae.get(key):
            return int(vae[key])
    if "temperal_downsample" in vae:
        return 2 ** sum(bool(x) for x in vae["temperal_downsample"])
    return 1


def _patch(transformer: Mapping[str, Any]) -> int:
    """Spatial patch of the DiT; FLUX-style models pack 2x2 latents into channels before the DiT."""
    if "all_patch_size" in transformer:  # Z-Image
        return int(transformer["all_patch_size"][0])
    patch = transformer.get("patch_size", 1)
    patch = int(patch[-1]) if isinstance(patch, (list, tuple)) else int(patch)
    packed = transformer.get("_class_name", "").startswith(("Flux", "LongCat", "Ovis", "QwenImage"))
    return 2 if packed and patch == 1 else patch


def _hidden(transformer: Mapping[str, Any]) -> int:
    if "dim" in transformer:  # Z-Image
        return int(transformer["dim"])
    heads = transformer.get("num_attention_heads")
    head_dim = transformer.get("attention_head_dim")
    if heads and head_dim:
        return int(heads) * int(head_dim)
    return int(transformer.get("caption_projection_dim") or transformer["hidden_size"])


@dataclass(frozen=True)
class ActivationEstimate:
    """The activation memory one pipeline call is planned for, and the reserve it asks of the budget."""

    family: str
    height: int
    width: int
    frames: int | None  # None for an image pipeline
    batch: int  # images/videos per call
    tokens: int  # image (or video) tokens of one sample the denoiser attends to
    context_tokens: int  # text/image-prompt tokens in the same sequence
    call_batch: int  # batch of one denoiser call (twice `batch` where CFG is batched)
    denoiser_bytes: int
    vae_bytes: int
    measured: bool  # whether the denoiser coefficient was counted on this family's own blocks
    vae_tile: tuple[int, int] | None = None  # the tile a whole-clip VAE decodes at a time, if tiled
    advice: str = ""  # how to lower the estimate, where there is a way besides a smaller call

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phases."""
        return max(self.denoiser_bytes, self.vae_bytes)

    @property
    def reserve_bytes(self) -> int:
        """``peak + 10% + 256 MiB`` (the margin: see the module docstring)."""
        return int(self.peak_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES

    def __str__(self) -> str:
        size = f"{self.width}x{self.height}" + (f", {self.frames} frames" if self.frames else "")
        context = f" + {self.context_tokens} context" if self.context_tokens else ""
        borrowed = "" if self.measured else " (coefficient borrowed from a sibling family)"
        tiled = f" in {self.vae_tile[1]}x{self.vae_tile[0]} tiles" if self.vae_tile else ""
        return (
            f"activations at {size}, batch {self.batch}: denoiser {format_bytes(self.denoiser_bytes)} "
            f"({self.tokens} tokens{context}, call batch {self.call_batch}){borrowed}, "
            f"VAE decode{tiled} {format_bytes(self.vae_bytes)} -> reserve {format_bytes(self.reserve_bytes)}"
        )


def has_activation_model(family: str) -> bool:
    """Whether :func:`estimate_activations` knows the adapter called ``family``."""
    return family in _FAMILIES


def estimate_activations(
    family: str,
    transformer_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    pipeline_class: str = "the pipeline",
    pipeline_config: Mapping[str, Any] | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    batch: int = 1,
    element_size: int = 2,
    vae_tile: tuple[int, int] | None = None,
    guidance_scale: float | None = None,
) -> ActivationEstimate:
    """Activation bytes of one call of an adapter ``family``'s pipeline (see the module docstring).

    ``height``/``width``/``frames`` default to the pipeline's own defaults; ``element_size`` is the
    activation dtype's (2 for bfloat16/float16); ``vae_tile`` the VAE's tile (height, width) in pixels when
    its tiled decode is on (it only lowers the estimate of VAEs that decode the whole clip at once);
    ``guidance_scale`` (None: the pipeline's default) turns batched CFG off where it is low enough.
    Raises ValueError, naming the fix, for a family without
    an activation model, frames for an image pipeline, a size that is not a multiple of the VAE factor
    times the patch, frames the VAE cannot compress (Wan: 4k+1), or a batch below 1.
    """
    spec = _FAMILIES.get(family)
    if spec is None:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(
            f"no activation model for adapter {family!r} (known: {known}); give the reserve yourself, "
            "e.g. reserve='2GiB'"
        )
    transformer, vae = dict(transformer_config), dict(vae_config)
    configs = {"transformer": transformer, "vae": vae}
    for name, value in (("height", height), ("width", width), ("frames", frames), ("batch", batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive int")
    if frames is not None and spec.default_frames is None:
        raise ValueError(
            f"frames={frames}: frames apply to video pipelines; {pipeline_class} makes images, leave them out"
        )

    def default(value: int | Callable[[Mapping[str, Any]], int]) -> int:
        return value(configs) if callable(value) else value

    height = default(spec.default_height) if height is None else height
    width = default(spec.default_width) if width is None else width
    s, p = _spatial_factor(vae), _patch(transformer)
    for name, value in (("height", height), ("width", width)):
        if value % (s * p):
            lower, upper = value - value % (s * p), value - value % (s * p) + s * p
            nearest = f"{lower} or {upper}" if lower else str(upper)
            raise ValueError(
                f"{name}={value}: not a multiple of {s * p} (VAE factor {s} x patch {p}) for "
                f"{pipeline_class}; use {nearest}"
            )
    latent_frames = 1
    if spec.default_frames is not None:
        frames = spec.default_frames if frames is None else frames
        t = _temporal_factor(vae)
        if (frames - 1) % t:
            lower = frames - (frames - 1) % t
            raise ValueError(
                f"frames={frames}: {pipeline_class}'s VAE compresses time {t}x, so frames must be "
                f"{t}k+1; use {lower} or {lower + t}"
            )
        latent_frames = (frames - 1) // t + 1
    h_lat, w_lat = height // s, width // s
    tokens = latent_frames * (h_lat // p) * (w_lat // p)
    if spec.image_condition:
        tokens *= 2
    c = spec.c
    if spec.c_expanded_timesteps is not None and (pipeline_config or {}).get("expand_timesteps"):
        c = spec.c_expanded_timesteps
    scale = element_size / _MEASURED_DTYPE_BYTES
    cfg = guidance_scale is None or guidance_scale > spec.cfg_above
    call_batch = batch * (spec.cfg_batch if cfg else 1)
    denoiser = call_batch * c * _hidden(transformer) * (tokens + spec.context_tokens) * scale
    video = 2 * 3 * (frames or 1) * height * width * element_size
    pixels = height * width
    advice = ""
    if spec.whole_clip_vae:
        if vae_tile is not None:
            pixels = min(height, vae_tile[0]) * min(width, vae_tile[1])
        else:
            advice = "call pipe.vae.enable_tiling() (its decode then holds one tile of every frame)"
        pixels *= frames or 1
    vae_bytes = batch * (spec.v(vae) * pixels * scale + video)
    return ActivationEstimate(
        family=family,
        height=height,
        width=width,
        frames=frames if spec.default_frames is not None else None,
        batch=batch,
        tokens=tokens,
        context_tokens=spec.context_tokens,
        call_batch=call_batch,
        denoiser_bytes=int(denoiser),
        vae_bytes=int(vae_bytes),
        measured=spec.measured,
        vae_tile=vae_tile if spec.whole_clip_vae else None,
        advice=advice,
    )


def _config_of(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None) or {}
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    config.setdefault("_class_name", type(module).__name__)
    return config


def estimate_for_components(
    adapter: Any,
    components: Mapping[str, Any],
    *,
    pipeline_class: str = "the pipeline",
    pipeline_config: Mapping[str, Any] | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    batch: int | None = None,
    vae_tiling: bool | None = None,
    guidance_scale: float | None = None,
) -> ActivationEstimate | None:
    """:func:`estimate_activations` for a pipeline's components (real or on ``meta``) and its adapter.

    The activation dtype is the denoiser's weight dtype. ``vae_tiling``: whether the VAE decodes by tiles
    (None: as the VAE module is set, ``vae.use_tiling``). Returns None for an adapter without an activation
    model when no size was asked for (the planner then keeps ``DEFAULT_RESERVE``); asking for one raises.
    """
    if not has_activation_model(adapter.name):
        if height is None and width is None and frames is None and batch in (None, 1):
            return None
        return estimate_activations(adapter.name, {}, {})  # raises: no activation model
    denoiser = components.get(adapter.denoiser)
    vae = components.get(adapter.vae) if adapter.vae else None
    floats = [p for p in (denoiser.parameters() if denoiser is not None else ()) if p.is_floating_point()]
    element_size = min((p.element_size() for p in floats), default=2)
    return estimate_activations(
        adapter.name,
        _config_of(denoiser),
        _config_of(vae) if vae is not None else {},
        pipeline_class=pipeline_class,
        pipeline_config=pipeline_config,
        height=height,
        width=width,
        frames=frames,
        batch=1 if batch is None else batch,
        element_size=element_size,
        vae_tile=_tile(vae, vae_tiling),
        guidance_scale=guidance_scale,
    )


def _tile(vae: Any, tiling: bool | None) -> tuple[int, int] | None:
    if tiling is None:
        tiling = bool(getattr(vae, "use_tiling", False))
    if not tiling:
        return None
    return int(getattr(vae, "tile_sample_min_height", 256)), int(getattr(vae, "tile_sample_min_width", 256))
