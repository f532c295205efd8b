"""Meta-device builds of the shipped configs, their parameter counts, and component byte sizes."""

from __future__ import annotations

import functools
import json
import shutil
import time

import pytest
import torch
from torch import nn

from diffusers_offload.model_registry import ModelAdapter, get_adapter
from diffusers_offload.planning.meta import SHIPPED_MODELS, build_meta_components, shipped_config_dir
from diffusers_offload.planning.sizing import ComponentSizes, measure_components


@functools.cache
def _meta(model: str):
    return build_meta_components(model)


def _unique(tensors) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def _params(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for p in _unique(p for n, p in module.named_parameters() if not n.startswith(skip)))


def _elements(module: nn.Module) -> int:
    """Parameters and all buffers (persistent or not), tied tensors once."""
    return sum(t.numel() for t in _unique((*module.parameters(), *module.buffers())))


def _checkpoint_numel(module: nn.Module) -> int:
    """Elements a checkpoint stores: parameters plus persistent buffers, tied tensors once."""
    return sum(t.numel() for t in _unique(module.state_dict(keep_vars=True).values()))


# ------------------------------------------------------------------------------------------------ builds
def test_every_shipped_config_builds_on_meta_in_seconds():
    import diffusers  # noqa: F401  library import time is not ours to measure
    import transformers  # noqa: F401

    start = time.perf_counter()
    built = {hub_id: build_meta_components(hub_id) for hub_id in SHIPPED_MODELS}
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"building all shipped configs took {elapsed:.1f}s"
    for hub_id, (class_name, comps) in built.items():
        assert comps, hub_id
        for name, module in comps.items():
            devices = {t.device.type for t in (*module.parameters(), *module.buffers())}
            assert devices == {"meta"}, f"{hub_id}/{name} allocated real memory: {devices}"
            assert not any(p.requires_grad for p in module.parameters())
        assert get_adapter(class_name).pipeline_classes  # every shipped pipeline class is declared


# Exact parameter counts from configs/VERIFY.md (meta-device count on the steering side).
VERIFY_PARAMS = {
    ("sd35-medium", "transformer"): 2_243_171_520,
    ("sd35-medium", "vae"): 83_819_683,
    ("sd35-medium", "text_encoder"): 123_650_304,
    ("sd35-medium", "text_encoder_2"): 694_659_840,
    ("sd35-medium", "text_encoder_3"): 4_762_310_656,
    ("sd35-large", "transformer"): 8_056_627_520,
    ("qwen-image", "transformer"): 20_430_401_088,
    ("qwen-image", "vae"): 126_892_531,
    ("qwen-image", "text_encoder"): 8_292_166_656,
    ("z-image-turbo", "transformer"): 6_154_908_736,
    ("z-image-turbo", "text_encoder"): 4_022_468_096,
    ("longcat-image", "transformer"): 6_270_668_864,
    ("longcat-image", "text_encoder"): 8_292_166_656,
    ("ovis-image-7b", "transformer"): 7_370_449_728,
    ("ovis-image-7b", "text_encoder"): 1_720_574_976,
    ("nextstep-1.1", "vae"): 83_819_683,
    # configs/VERIFY.md, video and FLUX section
    ("flux1-dev", "transformer"): 11_901_408_320,
    ("flux1-dev", "vae"): 83_819_683,
    ("flux1-dev", "text_encoder"): 123_060_480,
    ("flux1-dev", "text_encoder_2"): 4_762_310_656,
    ("flux2-dev", "transformer"): 32_223_281_152,
    ("flux2-dev", "vae"): 84_046_115,
    # lm_head untied, as the checkpoint stores it (transformers 5 alone would tie it: 23,340,272,640)
    ("flux2-dev", "text_encoder"): 24_011_361_280,
    ("wan21-t2v-14b", "transformer"): 14_288_491_584,
    ("wan21-t2v-14b", "vae"): 126_892_531,
    ("wan21-t2v-14b", "text_encoder"): 5_680_910_336,
    ("wan22-t2v-a14b", "transformer"): 14_288_491_584,
    ("wan22-t2v-a14b", "transformer_2"): 14_288_491_584,
    ("wan22-ti2v-5b", "transformer"): 4_999_787_712,
    ("wan22-ti2v-5b", "vae"): 704_688_668,
    ("hunyuanvideo15-720p-t2v", "transformer"): 8_326_608_160,
    ("hunyuanvideo15-720p-t2v", "vae"): 1_260_634_115,
    ("hunyuanvideo15-720p-t2v", "text_encoder"): 7_070_619_136,
    ("hunyuanvideo15-720p-t2v", "text_encoder_2"): 219_314_944,
}


@pytest.mark.parametrize(("model", "component"), sorted(VERIFY_PARAMS))
def test_parameter_counts_match_verify_md(model, component):
    assert _params(_meta(model)[1][component]) == VERIFY_PARAMS[model, component]


# Published sizes. "DiT 2.5B" for SD3.5-medium is compared with what its checkpoint stores, parameters plus
# the persistent pos_embed buffer (2.243B + 0.227B = 2.470B, 4.94 GB in bf16 as the upstream file): the
# parameters alone (2.243B) are 10% short. The same measure is used for every DiT.
PUBLISHED_DIT = {
    "sd35-medium": 2.5e9,
    "sd35-large": 8.1e9,
    "qwen-image": 20e9,
    "z-image-turbo": 6e9,
    "longcat-image": 6e9,
}


@pytest.mark.parametrize("model", sorted(PUBLISHED_DIT))
def test_dit_size_within_5_percent_of_published(model):
    count = _checkpoint_numel(_meta(model)[1]["transformer"])
    assert count == pytest.approx(PUBLISHED_DIT[model], rel=0.05)


# The published figures of VERIFY.md's second table, for the video and FLUX models.
PUBLISHED_WITHIN_2_PERCENT = {
    ("flux1-dev", "transformer"): 12e9,  # "12 billion parameter"
    ("flux2-dev", "transformer"): 32.2e9,  # "32B"; 32,223,281,152 asserted by a third party
    ("flux2-dev", "text_encoder"): 24e9,  # Mistral Small 3.x "24B", with its lm_head
    ("wan21-t2v-14b", "transformer"): 14.29e9,  # "14B"; 14,288,491,584 from shard headers
    ("wan22-t2v-a14b", "transformer"): 14.29e9,
    ("wan22-ti2v-5b", "transformer"): 5e9,
    ("hunyuanvideo15-720p-t2v", "transformer"): 8.3e9,
}


@pytest.mark.parametrize(("model", "component"), sorted(PUBLISHED_WITHIN_2_PERCENT))
def test_video_and_flux_sizes_within_2_percent_of_published(model, component):
    count = _checkpoint_numel(_meta(model)[1][component])
    assert count == pytest.approx(PUBLISHED_WITHIN_2_PERCENT[model, component], rel=0.02)


def test_wan22_plan_streams_both_experts_and_counts_one_per_step():
    class_name, comps = _meta("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    adapter = get_adapter(class_name)
    sizes = measure_components(adapter.components(comps), adapter)
    assert [s.role for s in sizes if s.name.startswith("transformer")] == ["denoiser", "denoiser"]
    from diffusers_offload.planning import plan_offload

    plan = plan_offload(sizes, "24GiB", calls_per_step=adapter.calls.per_step({}), steps=40)
    experts = [plan.component("transformer"), plan.component("transformer_2")]
    assert [p.strategy for p in experts] == ["streamed", "streamed"]
    # One expert runs per step (the same layout for both), twice with CFG; not the sum of the two.
    assert plan.bytes_moved_per_step == 2 * experts[0].bytes_moved_per_call
    assert plan.peak_device_bytes <= plan.budget_bytes


def test_nextstep_llm_14b_and_157m_head():
    model = _meta("nextstep-1.1")[1]["model"]
    head = _params(model.image_head)
    assert head == 157_228_096  # analytic count in configs/nextstep-1.1/SOURCES.md
    assert head == pytest.approx(157e6, rel=0.05)
    # "14B" = the LLM as it runs for images: embeddings, 48 layers, norm and projectors; lm_head (unused,
    # host-only, 0.78B under the assumed vocabulary) left out. With it the count would be 14.8B (+5.6%).
    llm = _params(model, skip=("image_head.", "lm_head."))
    assert llm == pytest.approx(14e9, rel=0.05)
    assert _params(model.layers) + _params(model.norm) == 13_212_898_304  # VERIFY.md decoder body


# --------------------------------------------------------------------------------------------------- meta
def test_short_names_and_hub_ids_are_equivalent():
    for alias in ("sd35-medium", "SD3.5-medium", "stable-diffusion-3.5-medium"):
        assert shipped_config_dir(alias) == shipped_config_dir("stabilityai/stable-diffusion-3.5-medium")
    assert _meta("nextstep")[0] == "NextStepPipeline"


def test_unknown_model_lists_the_known_ids():
    with pytest.raises(ValueError) as err:
        build_meta_components("black-forest-labs/FLUX.1-schnell")
    message = str(err.value)
    for hub_id in SHIPPED_MODELS:
        assert hub_id in message
    assert "local folder" in message


def test_local_folder_in_diffusers_layout(tmp_path):
    folder = tmp_path / "longcat"
    shutil.copytree(shipped_config_dir("longcat-image"), folder)
    class_name, comps = build_meta_components(folder)
    assert class_name == "LongCatImagePipeline"
    # `transformer` is missing from the published model_index.json but has its own subfolder
    assert set(comps) == {"text_encoder", "vae", "transformer"}

    # non-model folders are skipped, declared or not; a declared class the library lacks is an error
    index = json.loads((folder / "model_index.json").read_text())
    index["text_processor"] = ["transformers", "Qwen2VLProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for sub, config in {
        "text_processor": {},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler"},
    }.items():
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps(config))
    assert set(build_meta_components(folder)[1]) == {"text_encoder", "vae", "transformer"}
    index["vae"] = ["diffusers", "AutoencoderKLFromTheFuture"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no class 'AutoencoderKLFromTheFuture'"):
        build_meta_components(folder)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        build_meta_components(tmp_path / "empty")


def test_dtype_and_keep_in_fp32_modules():
    _, comps = build_meta_components("sd35-medium", dtype=torch.float16)
    t5 = comps["text_encoder_3"]
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32  # T5's _keep_in_fp32_modules, applied for fp16 like from_pretrained
    assert t5.shared.weight.dtype == torch.float16
    bf16_t5 = _meta("sd35-medium")[1]["text_encoder_3"]
    assert bf16_t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- sizing
def _sizes(model: str) -> dict[str, ComponentSizes]:
    class_name, comps = _meta(model)
    return {s.name: s for s in measure_components(comps, get_adapter(class_name))}


def test_sizes_split_blocks_other_and_host_only():
    sizes = _sizes("qwen-image")
    te, dit, vae = sizes["text_encoder"], sizes["transformer"], sizes["vae"]
    assert (dit.role, te.role, vae.role) == ("denoiser", "encoder", "vae")
    assert len(dit.block_bytes) == 60 and len(set(dit.block_bytes)) == 1  # identical blocks
    assert len(te.block_bytes) == 28 and vae.block_bytes == ()
    assert te.host_only_bytes == 2 * _elements(_meta("qwen-image")[1]["text_encoder"].model.visual)
    # bf16: two bytes per element, every parameter and buffer counted exactly once
    for name, module in _meta("qwen-image")[1].items():
        assert sizes[name].total_bytes == 2 * _elements(module)
        assert sizes[name].device_bytes == sizes[name].total_bytes - sizes[name].host_only_bytes


def test_tied_weights_counted_once():
    t5 = _meta("sd35-medium")[1]["text_encoder_3"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    size = _sizes("sd35-medium")["text_encoder_3"]
    assert size.total_bytes == 2 * _params(t5)
    assert size.other_bytes < 2 * (t5.shared.weight.numel() + 10_000_000)  # the embedding is there once


def test_buffers_are_included():
    dit = _sizes("sd35-medium")["transformer"]
    assert dit.total_bytes == 2 * _checkpoint_numel(_meta("sd35-medium")[1]["transformer"])
    assert dit.total_bytes == pytest.approx(4.94e9, rel=0.005)  # upstream safetensors file size


def test_z_image_three_lists_flattened_in_execution_order():
    dit = _sizes("z-image-turbo")["transformer"]
    assert len(dit.block_bytes) == 2 + 2 + 30
    # context_refiner blocks have no adaLN modulation, so they are smaller than noise_refiner's
    assert dit.block_bytes[0] == dit.block_bytes[1] > dit.block_bytes[2] == dit.block_bytes[3]
    assert dit.block_bytes[4] == dit.block_bytes[0]


def test_nextstep_sizes_prefer_resident_and_keep_lm_head_on_host():
    sizes = _sizes("nextstep-1.1")
    llm = sizes["model"]
    model = _meta("nextstep-1.1")[1]["model"]
    assert llm.role == "denoiser" and llm.prefer_resident_blocks
    assert len(llm.block_bytes) == 48
    assert llm.host_only_bytes == 2 * model.lm_head.weight.numel()
    assert not sizes["vae"].prefer_resident_blocks
    assert _sizes("longcat-image")["text_encoder"].prefer_resident_blocks  # generate() for prompt rewrite


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.blocks[2].weight = self.blocks[1].weight  # shared by two blocks
        self.head = nn.Linear(4, 10, bias=False)
        self.tied_head = nn.Linear(4, 10, bias=False)
        self.tied_head.weight = self.embed.weight  # host-only part tied to a resident one
        self.register_buffer("table", torch.zeros(5))


def test_shared_tensors_stay_resident_and_real_modules_work():
    module = _Shared()  # real CPU float32 tensors
    adapter = ModelAdapter(
        name="toy", pipeline_classes=("Toy",), block_lists=("blocks",),
        host_only={"transformer": ("head", "tied_head")},
    )  # fmt: skip
    [size] = measure_components({"transformer": module}, adapter)
    linear_w, bias = 16 * 4, 4 * 4
    assert size.block_bytes == (linear_w + bias, bias, bias)  # the shared weight is in neither block
    assert size.host_only_bytes == 40 * 4  # only the untied head can stay on the host
    assert size.other_bytes == (40 + 5) * 4 + linear_w  # embedding (tied) + buffer + shared weight
    assert size.total_bytes == 4 * _elements(module)


def test_undeclared_components_are_other():
    adapter = get_adapter("StableDiffusion3Pipeline")
    [size] = measure_components(
        {"controlnet": nn.Linear(2, 2, dtype=torch.bfloat16), "tokenizer": None}, adapter
    )
    assert (size.name, size.role, size.block_bytes, size.other_bytes) == ("controlnet", "other", (), 12)
