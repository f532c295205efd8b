"""Build a pipeline's components on the ``meta`` device from configs alone: shapes without weights.

Used to size and plan offloading without downloading or allocating anything. Sources are a local folder in
diffusers layout (``model_index.json`` + ``<component>/config.json``), a NextStep folder (``config.json`` with
``model_type: nextstep`` + ``vae/config.json``), or one of the published configs shipped in
``model_registry/configs`` (see :data:`SHIPPED_MODELS`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model_registry

CONFIGS_DIR = Path(model_registry.__file__).parent / "configs"

# Hub id -> folder under model_registry/configs.
SHIPPED_MODELS: Mapping[str, str] = {
    "stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "Qwen/Qwen-Image": "qwen-image",
    "Tongyi-MAI/Z-Image-Turbo": "z-image-turbo",
    "meituan-longcat/LongCat-Image": "longcat-image",
    "AIDC-AI/Ovis-Image-7B": "ovis-image-7b",
    "stepfun-ai/NextStep-1.1": "nextstep-1.1",
    "black-forest-labs/FLUX.1-dev": "flux1-dev",
    "black-forest-labs/FLUX.2-dev": "flux2-dev",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan21-t2v-14b",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan22-t2v-a14b",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan22-ti2v-5b",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v": "hunyuanvideo15-720p-t2v",
}

# Short names (case-insensitive): each folder name, each repo name, plus a few spellings people use.
_ALIASES: dict[str, str] = {
    **{folder: folder for folder in SHIPPED_MODELS.values()},
    **{hub_id.lower(): folder for hub_id, folder in SHIPPED_MODELS.items()},
    **{hub_id.split("/")[1].lower(): folder for hub_id, folder in SHIPPED_MODELS.items()},
    "sd3.5-medium": "sd35-medium",
    "sd3.5-large": "sd35-large",
    "z-image": "z-image-turbo",
    "ovis-image": "ovis-image-7b",
    "nextstep": "nextstep-1.1",
    "flux1": "flux1-dev",
    "flux.1-dev": "flux1-dev",
    "flux2": "flux2-dev",
    "flux.2-dev": "flux2-dev",
    "wan2.1-t2v-14b": "wan21-t2v-14b",
    "wan2.2-t2v-a14b": "wan22-t2v-a14b",
    "wan2.2-ti2v-5b": "wan22-ti2v-5b",
    "hunyuanvideo-1.5": "hunyuanvideo15-720p-t2v",
}

# NextStep-1.1's published config.json is truncated before vocab_size (see configs/nextstep-1.1/SOURCES.md).
# 152064 is the Qwen2.5-14B vocabulary; every special token id in the config (<= 151669) fits. UNCONFIRMED.
NEXTSTEP_ASSUMED_VOCAB_SIZE = 152064


def shipped_config_dir(model: str) -> Path | None:
    """The shipped config folder for a hub id or short name, or None."""
    folder = _ALIASES.get(str(model).strip().lower())
    return CONFIGS_DIR / folder if folder else None


def pipeline_config(model: str | os.PathLike) -> dict[str, Any]:
    """The pipeline's own config (``model_index.json``, e.g. Wan's ``expand_timesteps``); {} if none."""
    folder = Path(model)
    if not folder.is_dir():
        folder = shipped_config_dir(str(model)) or folder
    index = folder / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def build_meta_components(
    model: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, dict[str, nn.Module]]:
    """Build every model component of a pipeline on the ``meta`` device (see `build_components`)."""
    return build_components(model, dtype=dtype)


def build_components(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "meta",
    only: Collection[str] | None = None,
) -> tuple[str, dict[str, nn.Module]]:
    """Build the model components of a pipeline from configs, on ``meta`` (shapes only) or a real device.

    On a real device the modules are constructed there, so their weights get the classes' own random
    initialisation in place (fast on an accelerator) and every computed buffer is right.

    Args:
        model: a local folder (diffusers layout, or a NextStep folder), or a shipped id / short name such as
            ``"stabilityai/stable-diffusion-3.5-medium"`` or ``"sd35-medium"``. An existing folder wins.
        dtype: dtype the weights would be loaded in (byte sizes follow it); ``_keep_in_fp32_modules`` of
            the model classes are honoured as ``from_pretrained`` would.
        device: where to construct the modules (``"meta"``: no memory at all).
        only: the component names to build (default: all).

    Returns:
        ``(pipeline class name, {attribute: module})``; tokenizers, schedulers and processors are left out.

    Raises:
        ValueError: unknown id (the message lists the shipped ids), or a folder that is neither layout.
    """
    folder = Path(model)
    if not folder.is_dir():
        shipped = shipped_config_dir(str(model))
        if shipped is None:
            known = "\n  ".join(f"{hub_id} (or {short})" for hub_id, short in SHIPPED_MODELS.items())
            raise ValueError(
                f"unknown model {str(model)!r}. Shipped configs:\n  {known}\n"
                "A local folder also works: diffusers layout (model_index.json + <component>/config.json), "
                "or a NextStep folder (config.json with model_type 'nextstep')."
            )
        folder = shipped
    with quiet_libraries():
        if (folder / "model_index.json").is_file():
            return _build_diffusers_folder(folder, dtype, torch.device(device), only)
        config_file = folder / "config.json"
        if config_file.is_file() and _read_json(config_file).get("model_type") == "nextstep":
            if torch.device(device).type != "meta":
                raise ValueError("NextStep components can only be built on the meta device")
            return _build_nextstep_folder(folder, dtype)
    raise ValueError(
        f"{folder} has no model_index.json (diffusers layout) and no NextStep config.json; cannot build it"
    )


# --------------------------------------------------------------------------------------------- diffusers
def _build_diffusers_folder(
    folder: Path, dtype: torch.dtype, device: torch.device, only: Collection[str] | None
) -> tuple[str, dict[str, nn.Module]]:
    index = _read_json(folder / "model_index.json")
    pipeline_class = index.get("_class_name")
    if not pipeline_class:
        raise ValueError(f"{folder / 'model_index.json'} has no _class_name")
    declared = {
        k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
    }
    # Subfolders with a config.json but no index entry still count: LongCat-Image's published index omits
    # `transformer`, which the pipeline loads from its subfolder anyway.
    names = [k for k in declared if (folder / k / "config.json").is_file()]
    names += sorted(
        p.name for p in folder.iterdir() if p.name not in declared and (p / "config.json").is_file()
    )
    components: dict[str, nn.Module] = {}
    for name in names:
        if only is not None and name not in only:
            continue
        config = _read_json(folder / name / "config.json")
        library, class_name = declared.get(name, (None, None))
        cls = _model_class(name, library, class_name, config)
        if cls is not None:  # else a tokenizer, processor or other non-model folder
            components[name] = _instantiate(cls, config, dtype, device)
    return pipeline_class, components


def _model_class(
    name: str, library: str | None, class_name: str | None, config: dict[str, Any]
) -> type | None:
    """The diffusers ``ModelMixin`` / transformers ``PreTrainedModel`` class of a component, or None."""
    import diffusers
    import transformers

    declared = library is not None
    if not declared:  # not in model_index: infer the class from the config itself
        if "_class_name" in config:
            library, class_name = "diffusers", config["_class_name"]
        elif config.get("architectures"):
            library, class_name = "transformers", config["architectures"][0]
        else:
            return None
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"component {name!r}: library {library!r} is not supported (diffusers/transformers)")
    module, base = (
        (diffusers, diffusers.ModelMixin)
        if library == "diffusers"
        else (transformers, transformers.PreTrainedModel)
    )
    cls = getattr(module, class_name, None)
    if declared and not isinstance(cls, type):
        raise ValueError(f"component {name!r}: {library} {module.__version__} has no class {class_name!r}")
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def _instantiate(cls: type, config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> nn.Module:
    from diffusers import ModelMixin

    is_diffusers = issubclass(cls, ModelMixin)
    with torch.device(device):
        if is_diffusers:
            model = cls.from_config(config)
        else:
            model = cls._from_config(cls.config_class.from_dict(_untie_like_the_checkpoint(config)))
    return _finish(model, dtype, substring_match=is_diffusers)


def _untie_like_the_checkpoint(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a multimodal model's lm_head tied as its text model says, when the top level is silent.

    transformers 5 reads the top-level ``tie_word_embeddings`` (default True) and ties lm_head to the
    embeddings; checkpoints saved with transformers 4 (FLUX.2-dev's Mistral-Small-3.x, lm_head 0.67B)
    followed the text config (Mistral's default: untied) and store a separate lm_head, which
    from_pretrained loads as such. Sizes must count it.
    """
    from transformers import AutoConfig

    text = config.get("text_config")
    if not isinstance(text, dict) or "tie_word_embeddings" in config or "model_type" not in text:
        return config
    tied = text.get("tie_word_embeddings")
    if tied is None:
        tied = AutoConfig.for_model(text["model_type"]).tie_word_embeddings
    return {**config, "tie_word_embeddings": bool(tied)}


def _finish(model: nn.Module, dtype: torch.dtype, *, substring_match: bool = False) -> nn.Module:
    """Cast to ``dtype``, re-upcast ``_keep_in_fp32_modules`` like ``from_pretrained``, freeze, eval."""
    model.to(dtype)
    keep: set[str] = set()
    if substring_match:  # diffusers upcasts any parameter whose name contains a pattern, whatever the dtype
        if dtype != torch.float32:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    else:  # transformers: plain list only against fp16, the "strict" list against fp16 and bf16
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if keep:
        for name, param in model.named_parameters():
            hit = any(k in name for k in keep) if substring_match else bool(keep & set(name.split(".")))
            if hit:
                param.data = param.data.to(torch.float32)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------- NextStep
class _TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class _ResBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))


class _FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class _SimpleMLPAdaLN(nn.Module):
    def __init__(self, input_dim: int, cond_dim: int, dim: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.time_embed = _TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(cond_dim, dim)
        self.input_proj = nn.Linear(input_dim, dim)
        self.res_blocks = nn.ModuleList(_ResBlock(dim, mlp_ratio) for _ in range(layers))
        self.final_layer = _FinalLayer(dim, input_dim)


class NextStepFlowMatchingHead(nn.Module):
    """Shape-only stand-in for upstream ``FlowMatchingHead`` (same attribute names, no forward)."""

    def __init__(
        self, input_dim: int, cond_dim: int, dim: int = 1536, layers: int = 12, mlp_ratio: float = 1.0
    ):
        super().__init__()
        self.input_dim = input_dim
        self.net = _SimpleMLPAdaLN(input_dim, cond_dim, dim, layers, mlp_ratio)


class NextStepMetaModel(nn.Module):
    """Shape-only stand-in for upstream ``NextStep`` (same attribute names, no forward).

    The decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) comes from transformers' Qwen2Model
    (q/k/v bias, no o_proj bias: NextStep's ``attention_bias: true, o_attention_bias: false``) or LlamaModel
    when both biases agree.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

        attn_bias = bool(config.get("attention_bias", False))
        o_bias = config.get("o_attention_bias")
        o_bias = attn_bias if o_bias is None else bool(o_bias)
        keys = (
            "hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "head_dim rms_norm_eps max_position_embeddings rope_theta hidden_act"
        ).split()
        llm_kwargs = {k: config[k] for k in keys if k in config}
        llm_kwargs["vocab_size"] = config.get("vocab_size", NEXTSTEP_ASSUMED_VOCAB_SIZE)
        if attn_bias and not o_bias:
            llm_config = Qwen2Config(**llm_kwargs)
            base: nn.Module = Qwen2Model(llm_config)
        elif attn_bias == o_bias:
            llm_config = LlamaConfig(
                attention_bias=attn_bias, mlp_bias=config.get("mlp_bias", False), **llm_kwargs
            )
            base = LlamaModel(llm_config)
        else:
            raise ValueError(
                "NextStep config with o_proj bias but no q/k/v bias has no transformers equivalent"
            )
        self.config = llm_config
        hidden = llm_config.hidden_size
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = nn.Linear(hidden, llm_config.vocab_size, bias=False)

        # 1.1 names these num_channels / patch_size / genloss_*; NextStep-1 latent_* / fm_head_*.
        channels = config.get("latent_channels", config.get("num_channels", 16))
        patch = config.get("latent_patch_size", config.get("patch_size", 2))
        token_dim = channels * patch**2
        self.image_in_projector = nn.Linear(token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = NextStepFlowMatchingHead(
            input_dim=token_dim,
            cond_dim=hidden,
            dim=config.get("fm_head_dim", config.get("genloss_width", 1536)),
            layers=config.get("fm_head_layers", config.get("genloss_depth", 12)),
        )
        if config.get("use_gen_pos_embed", True):  # key missing from the truncated 1.1 config: assume used
            grid = config.get("base_image_grid_size", config.get("latent_size", 32))
            self.register_buffer("gen_pos_embed", torch.empty(1, grid * grid, hidden))


def _build_nextstep_folder(folder: Path, dtype: torch.dtype) -> tuple[str, dict[str, nn.Module]]:
    from diffusers import AutoencoderKL

    config = _read_json(folder / "config.json")
    vae_file = folder / "vae" / "config.json"
    # NextStep's own FLUX-style AutoEncoderParams (defaults from upstream when the file is absent).
    params = _read_json(vae_file) if vae_file.is_file() else {}
    ch_mult = params.get("ch_mult", [1, 2, 4, 4])
    with torch.device("meta"):
        model = NextStepMetaModel(config)
        # Same mapping upstream's inference/gen_pipeline.py uses to host it in diffusers' AutoencoderKL.
        vae = AutoencoderKL(
            in_channels=params.get("in_channels", 3),
            out_channels=params.get("out_ch", 3),
            down_block_types=("DownEncoderBlock2D",) * len(ch_mult),
            up_block_types=("UpDecoderBlock2D",) * len(ch_mult),
            block_out_channels=tuple(params.get("ch", 128) * m for m in ch_mult),
            layers_per_block=params.get("num_res_blocks", 2),
            latent_channels=params.get("z_channels", 16),
            norm_num_groups=32,
            sample_size=params.get("resolution", 256),
            scaling_factor=params.get("scaling_factor", 1.0),
            shift_factor=params.get("shift_factor", 0.0),
            mid_block_add_attention=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return "NextStepPipeline", {"model": _finish(model, dtype), "vae": _finish(vae, dtype)}


# ------------------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence config-key warnings from diffusers/transformers while building, then restore verbosity."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    saved = d_logging.get_verbosity(), t_logging.get_verbosity()
    d_logging.set_verbosity_error()
    t_logging.set_verbosity_error()
    try:
        yield
    finally:
        d_logging.set_verbosity(saved[0])
        t_logging.set_verbosity(saved[1])
