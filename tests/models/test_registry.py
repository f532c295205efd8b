"""Adapter registry: lookup, registration, generic fallback, shipped declarations against real classes."""

from __future__ import annotations

import functools
import inspect
import textwrap

import diffusers
import pytest
import torch
from torch import nn

import diffusers_offload.model_registry as model_registry
from diffusers_offload.model_registry import (
    ModelAdapter,
    generic_adapter,
    get_adapter,
    list_adapters,
    register_adapter,
    unregister_adapter,
)
from diffusers_offload.planning.meta import build_meta_components


@functools.cache
def _meta(model: str):
    return build_meta_components(model)


def _pipeline(model: str):
    """A real diffusers pipeline instance holding meta-built components (no tokenizers)."""
    class_name, comps = _meta(model)
    cls = getattr(diffusers, class_name)
    kwargs = {k: comps.get(k) for k in inspect.signature(cls.__init__).parameters if k != "self"}
    kwargs["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler()
    return cls(**kwargs)


@pytest.fixture
def scratch_names():
    """Adapter names registered by a test, removed afterwards so tests stay independent."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            unregister_adapter(name)
        except KeyError:
            pass


# ------------------------------------------------------------------------------------------------ lookup
def test_every_shipped_pipeline_class_exists_in_diffusers_and_maps_to_its_adapter():
    for adapter in list_adapters():
        for class_name in adapter.pipeline_classes:
            if class_name == "NextStepPipeline":  # upstream code, not part of diffusers
                assert get_adapter(class_name) is adapter
                continue
            cls = getattr(diffusers, class_name)  # AttributeError = a typo in a declaration
            assert get_adapter(cls) is adapter
            assert get_adapter(class_name) is adapter


def test_lookup_by_instance_uses_the_class_name():
    fake = type("QwenImagePipeline", (), {})()  # unrelated class, same name
    assert get_adapter(fake).name == "qwen-image"


def test_lookup_walks_the_mro():
    class MyTunedSD3(diffusers.StableDiffusion3Pipeline):
        pass

    assert get_adapter(MyTunedSD3).name == "sd3"
    assert get_adapter(object.__new__(MyTunedSD3)).name == "sd3"


def test_unknown_class_name_without_components_is_an_error():
    with pytest.raises(ValueError, match="no adapter is registered for NoSuchPipeline"):
        get_adapter("NoSuchPipeline")


# ---------------------------------------------------------------------------------------------- register
def test_register_own_adapter_then_look_it_up(scratch_names):
    class MyPipeline:
        pass

    adapter = ModelAdapter(name="mine", pipeline_classes=("MyPipeline",), block_lists=("blocks",))
    scratch_names.append("mine")
    assert register_adapter(adapter) is adapter
    assert get_adapter(MyPipeline()) is adapter
    assert adapter in list_adapters()
    assert register_adapter(
        ModelAdapter(name="mine", pipeline_classes=("MyPipeline",), block_lists=("blocks",))
    )


def test_register_refuses_taken_name_or_class_unless_overwrite(scratch_names):
    scratch_names += ["mine", "other"]
    register_adapter(ModelAdapter(name="mine", pipeline_classes=("MyPipeline",)))
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(ModelAdapter(name="mine", pipeline_classes=("MyPipeline",), denoiser="unet"))
    with pytest.raises(ValueError, match="MyPipeline -> 'mine'"):
        register_adapter(ModelAdapter(name="other", pipeline_classes=("MyPipeline",)))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline -> 'sd3'"):
        register_adapter(ModelAdapter(name="other", pipeline_classes=("StableDiffusion3Pipeline",)))

    replacement = register_adapter(
        ModelAdapter(name="mine", pipeline_classes=("MyPipeline",), denoiser="unet"), overwrite=True
    )
    assert get_adapter("MyPipeline") is replacement
    taker = register_adapter(ModelAdapter(name="other", pipeline_classes=("MyPipeline",)), overwrite=True)
    assert get_adapter("MyPipeline") is taker


def test_adapter_validates_its_declaration():
    with pytest.raises(TypeError, match=r"write \('layers',\)"):
        ModelAdapter(name="x", pipeline_classes=("P",), block_lists="layers")
    with pytest.raises(ValueError, match="not a dotted attribute path"):
        ModelAdapter(name="x", pipeline_classes=("P",), block_lists=("layers[0]",))
    with pytest.raises(ValueError, match="must be distinct"):
        ModelAdapter(name="x", pipeline_classes=("P",), encoders={"transformer": ()})
    with pytest.raises(ValueError, match="is not a method name"):
        ModelAdapter(name="x", pipeline_classes=("P",), entry_methods={"model": ("image_head.sample",)})
    with pytest.raises(ValueError, match="non-encoders"):
        ModelAdapter(name="x", pipeline_classes=("P",), prefer_resident_encoders=("text_encoder",))
    adapter = ModelAdapter(name="x", pipeline_classes=["P"], encoders={"text_encoder": ["layers"]})
    assert adapter.pipeline_classes == ("P",) and adapter.encoders["text_encoder"] == ("layers",)
    with pytest.raises(TypeError):
        adapter.encoders["text_encoder_2"] = ()  # frozen mapping
    assert hash(adapter) == hash(ModelAdapter(name="x", pipeline_classes=("P",)))


def test_blocks_error_names_the_missing_path_and_the_lists_that_exist():
    adapter = model_registry.get_adapter("ZImagePipeline")
    transformer = _meta("z-image")[1]["transformer"]
    with pytest.raises(ValueError) as err:
        adapter.blocks(transformer, "refiner")
    message = str(err.value)
    assert "'refiner'" in message
    assert "noise_refiner [2 x ZImageTransformerBlock]" in message and "layers [30 x" in message
    with pytest.raises(ValueError, match="is a Linear, not an nn.ModuleList"):
        adapter.blocks(transformer, "cap_embedder.1")


# ----------------------------------------------------------------------------------------------- generic
class Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.proj = nn.Linear(width, width)


class RepeatedDiT(nn.Module):
    _repeated_blocks = ["Block"]

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.double = nn.ModuleList(Block() for _ in range(2))
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])  # not repeated blocks
        self.single = nn.ModuleList(Block() for _ in range(3))


class PlainDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
        self.mixed = nn.ModuleList([Block(64), nn.Linear(64, 64)])  # mixed classes never qualify
        self.big = nn.ModuleList(Block(32) for _ in range(2))


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(4))


class ToyPipeline:
    def __init__(self, **modules):
        self.__dict__.update(modules)
        self.tokenizer = object()  # non-module components are ignored


def test_generic_uses_repeated_blocks_in_registration_order():
    pipe = ToyPipeline(transformer=RepeatedDiT(), text_encoder=TextEncoder(), vae=nn.Conv2d(3, 3, 1))
    adapter = get_adapter(pipe)
    assert adapter.name == "generic:ToyPipeline"
    assert adapter.denoiser == "transformer"
    assert adapter.block_lists == ("double", "single")
    assert adapter.encoders == {"text_encoder": ("layers",)}
    assert adapter.vae == "vae" and adapter.entry_methods == {"vae": ("encode", "decode")}
    assert "_repeated_blocks" in adapter.notes


def test_generic_falls_back_to_the_largest_list_of_identical_blocks():
    pipe = ToyPipeline(unet=PlainDiT())
    adapter = generic_adapter(pipe)
    assert adapter.denoiser == "unet"
    assert adapter.block_lists == ("big",)
    assert adapter.vae is None and adapter.encoders == {}


def test_generic_picks_the_largest_non_encoder_module_as_denoiser():
    comps = {"text_encoder": TextEncoder(), "backbone": PlainDiT(), "adapter_net": RepeatedDiT()}
    adapter = get_adapter("CustomPipeline", components=comps)
    assert adapter.denoiser == "backbone" and adapter.pipeline_classes == ("CustomPipeline",)


def test_generic_error_shows_a_register_example():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class WeirdPipeline(ToyPipeline):
        pass

    with pytest.raises(ValueError) as err:
        get_adapter(WeirdPipeline(transformer=NoBlocks(), text_encoder_2=TextEncoder()))
    message = str(err.value)
    assert "WeirdPipeline" in message and "ModuleLists: none" in message
    assert "register_adapter(ModelAdapter(" in message
    assert 'pipeline_classes=("WeirdPipeline",)' in message and '"text_encoder_2": ()' in message
    # the example is valid Python once the placeholder path is filled in
    example = message[message.index("    from diffusers_offload.model_registry") :]
    compile(textwrap.dedent(example), "<example>", "exec")

    with pytest.raises(ValueError, match="no denoiser found"):
        generic_adapter(ToyPipeline(text_encoder=TextEncoder()))


@pytest.mark.parametrize("model", ["sd35-medium", "qwen-image", "z-image", "longcat-image", "ovis-image"])
def test_generic_rules_agree_with_the_declarations_on_real_configs(model):
    pipe = _pipeline(model)
    declared = get_adapter(pipe)
    derived = generic_adapter(pipe)
    assert derived.block_lists == declared.block_lists
    for attr, paths in derived.encoders.items():
        assert [declared.blocks(pipe.components[attr], p) for p in paths] == [
            declared.blocks(pipe.components[attr], p) for p in declared.encoders[attr]
        ]


# ------------------------------------------------------------------------------ declarations vs real modules
EXPECTED_BLOCKS = {
    # model: {component: [len of each declared block list, in order]}
    "sd35-medium": {
        "transformer": [24],
        "text_encoder": [12],
        "text_encoder_2": [32],
        "text_encoder_3": [24],
    },
    "sd35-large": {"transformer": [38], "text_encoder": [12], "text_encoder_2": [32], "text_encoder_3": [24]},
    "qwen-image": {"transformer": [60], "text_encoder": [28]},
    "z-image": {"transformer": [2, 2, 30], "text_encoder": [36]},
    "longcat-image": {"transformer": [10, 20], "text_encoder": [28]},
    "ovis-image": {"transformer": [6, 27], "text_encoder": [28]},
    "nextstep": {"model": [48]},
    "flux1-dev": {"transformer": [19, 38], "text_encoder": [12], "text_encoder_2": [24]},
    "flux2-dev": {"transformer": [8, 48], "text_encoder": [40]},
    "wan21-t2v-14b": {"transformer": [40], "text_encoder": [24]},
    "wan22-t2v-a14b": {"transformer": [40], "transformer_2": [40], "text_encoder": [24]},
    "wan22-ti2v-5b": {"transformer": [30], "text_encoder": [24]},
    "hunyuanvideo15-720p-t2v": {"transformer": [54], "text_encoder": [28], "text_encoder_2": [12]},
}


@pytest.mark.parametrize("model", sorted(EXPECTED_BLOCKS))
def test_declared_paths_resolve_on_meta_built_configs(model):
    class_name, comps = _meta(model)
    adapter = get_adapter(class_name)
    # NextStep's meta tree mirrors upstream's structure but not its methods
    adapter.validate(comps, check_entry_methods=adapter.name != "nextstep")
    lengths = {attr: [len(ml) for _, ml in adapter.block_lists_of(attr, mod)] for attr, mod in comps.items()}
    lengths = {attr: n for attr, n in lengths.items() if n}
    assert lengths == EXPECTED_BLOCKS[model]


@pytest.mark.parametrize(
    "model",
    [
        "sd35-medium",
        "qwen-image",
        "z-image",
        "longcat-image",
        "ovis-image",
        "flux1-dev",
        "flux2-dev",
        "wan22-t2v-a14b",
    ],
)
def test_entry_methods_exist_on_real_pipeline_instances(model):
    pipe = _pipeline(model)
    comps = get_adapter(pipe).validate(pipe)  # raises if any declared method or path is missing
    assert set(comps) >= {"transformer", "text_encoder", "vae"}


def test_qwen25vl_layout_in_installed_transformers():
    adapter = get_adapter("QwenImagePipeline")
    text_encoder = _meta("qwen-image")[1]["text_encoder"]
    [(path, layers)] = adapter.block_lists_of("text_encoder", text_encoder)
    assert path == "model.language_model.layers" and len(layers) == 28
    assert [p for p, _ in adapter.host_only_of("text_encoder", text_encoder)] == ["model.visual"]
    assert get_adapter("LongCatImagePipeline").entry_methods["text_encoder"] == ("generate",)


def test_nextstep_declaration():
    adapter = get_adapter("NextStepPipeline")
    model = _meta("nextstep")[1]["model"]
    assert adapter.denoiser == "model" and adapter.block_lists == ("layers",)
    assert adapter.prefer_resident_blocks and "per token" in adapter.notes
    assert adapter.host_only == {"model": ("lm_head",)}
    assert adapter.entry_methods["model"] == ("forward_model", "prepare_inputs_embeds")
    for name in ("embed_tokens", "norm", "lm_head", "image_in_projector", "image_out_projector"):
        assert isinstance(getattr(model, name), nn.Module)
    assert len(model.image_head.net.res_blocks) == 12
    assert model.gen_pos_embed.shape == (1, 64 * 64, 5120)


def test_nextstep_declaration_fits_the_standin_pipeline():
    import nextstep_standin as standin  # tests/nextstep_standin.py mimics upstream NextStep-1

    pipe = standin.build_tiny_nextstep_pipeline()
    adapter = get_adapter(pipe)
    assert adapter.name == "nextstep"
    assert set(adapter.validate(pipe)) == {"model", "vae"}  # paths, host-only, gen_pos_embed, methods


def test_video_and_flux_declarations_in_installed_libraries():
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    comps = _meta("flux2-dev")[1]
    flux2 = get_adapter("Flux2Pipeline")
    hosted = [p for p, _ in flux2.host_only_of("text_encoder", comps["text_encoder"])]
    assert hosted == ["model.vision_tower", "model.multi_modal_projector"]
    assert flux2.resident_tensors == {"vae": ("bn.running_mean", "bn.running_var")}
    assert get_adapter("WanImageToVideoPipeline").experts == ("transformer_2",)
    with torch.device("meta"):
        vision = dict(num_hidden_layers=2)
        encoders = {
            "FluxPipeline": CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)),
            "WanImageToVideoPipeline": CLIPVisionModel(CLIPVisionConfig(**vision)),
            "HunyuanVideo15ImageToVideoPipeline": SiglipVisionModel(SiglipVisionConfig(**vision)),
        }
    for pipeline_class, encoder in encoders.items():
        adapter = get_adapter(pipeline_class)
        assert [len(ml) for _, ml in adapter.block_lists_of("image_encoder", encoder)] == [2], pipeline_class


def test_sd3_image_encoder_path_in_installed_transformers():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        siglip = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=3))
    adapter = get_adapter("StableDiffusion3Pipeline")
    assert [len(ml) for _, ml in adapter.block_lists_of("image_encoder", siglip)] == [3]


# ------------------------------------------------------------------------------------- execution order
def _outermost_block_calls(model: nn.Module) -> list[str]:
    """Record every call of an entry of an outermost ModuleList, as 'path.index'."""
    calls: list[str] = []
    taken: list[str] = []
    for name, ml in model.named_modules():
        if not isinstance(ml, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        taken.append(name)
        for i, block in enumerate(ml):
            block.register_forward_pre_hook(lambda *_, key=f"{name}.{i}": calls.append(key))
    return calls


def _declared_order(pipeline_class: str, model: nn.Module) -> list[str]:
    adapter = get_adapter(pipeline_class)
    return [f"{p}.{i}" for p, ml in adapter.block_lists_of(adapter.denoiser, model) for i in range(len(ml))]


def _tiny_dits():
    """(pipeline class, tiny real DiT, forward kwargs) for every diffusers model served."""
    torch.manual_seed(0)
    flux_like = dict(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
    )  # fmt: skip
    flux_inputs = dict(
        hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 5, 32),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
    )  # fmt: skip
    yield (
        "StableDiffusion3Pipeline",
        diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
            out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
        dict(
            hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
            pooled_projections=torch.randn(1, 8), timestep=torch.tensor([1.0]),
        ),
    )  # fmt: skip
    yield (
        "QwenImagePipeline",
        diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
        ),
        dict(
            hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 16),
            encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)],
        ),
    )  # fmt: skip
    yield (
        "ZImagePipeline",
        diffusers.ZImageTransformer2DModel(
            dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[8, 12, 12], axes_lens=[64, 32, 32], in_channels=4,
        ),
        dict(x=[torch.randn(4, 1, 8, 8)], t=torch.tensor([0.5]), cap_feats=[torch.randn(7, 32)]),
    )  # fmt: skip
    yield (
        "LongCatImagePipeline",
        diffusers.LongCatImageTransformer2DModel(pooled_projection_dim=32, **flux_like),
        flux_inputs,
    )
    yield "OvisImagePipeline", diffusers.OvisImageTransformer2DModel(out_channels=8, **flux_like), flux_inputs
    yield (
        "FluxPipeline",
        diffusers.FluxTransformer2DModel(pooled_projection_dim=8, **flux_like),
        {**flux_inputs, "pooled_projections": torch.randn(1, 8)},
    )
    from diffusers_offload.tiny.flux2 import build_tiny_flux2_transformer
    from diffusers_offload.tiny.wan import build_tiny_wan_transformer

    yield (
        "Flux2Pipeline",
        build_tiny_flux2_transformer(),
        dict(
            hidden_states=torch.randn(1, 16, 128), encoder_hidden_states=torch.randn(1, 5, 96),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]), img_ids=torch.zeros(1, 16, 4),
            txt_ids=torch.zeros(1, 5, 4),
        ),
    )  # fmt: skip
    yield (
        "WanPipeline",
        build_tiny_wan_transformer(),
        dict(
            hidden_states=torch.randn(1, 16, 2, 4, 4), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 5, 32),
        ),
    )  # fmt: skip


@pytest.mark.parametrize("case", list(_tiny_dits()), ids=lambda case: case[0])
def test_declared_block_order_is_the_forward_call_order(case):
    pipeline_class, model, inputs = case
    calls = _outermost_block_calls(model)
    with torch.no_grad():
        model(**inputs)
    # every block runs once, in the declared order, and no undeclared ModuleList runs
    assert calls == _declared_order(pipeline_class, model)


def test_denoiser_calls_and_experts_are_validated():
    from diffusers_offload.model_registry import DenoiserCalls

    with pytest.raises(ValueError, match="not both"):
        DenoiserCalls("guidance_scale", guider="guider")
    with pytest.raises(TypeError, match=r"write \('negative_prompt',\)"):
        DenoiserCalls("true_cfg_scale", needs_one_of="negative_prompt")
    with pytest.raises(TypeError, match="DenoiserCalls"):
        ModelAdapter(name="x", pipeline_classes=("P",), calls=2)
    with pytest.raises(ValueError, match="must be distinct"):
        ModelAdapter(name="x", pipeline_classes=("P",), experts=("transformer",))
    cfg = DenoiserCalls("guidance_scale", default=5.0)
    assert [cfg.per_step(c) for c in ({}, {"guidance_scale": 1.0}, {"guidance_scale": None})] == [2, 1, 2]
    true_cfg = DenoiserCalls("true_cfg_scale", default=4.0, needs_one_of=("negative_prompt",))
    assert true_cfg.per_step({}) == 1 and true_cfg.per_step({"negative_prompt": "blurry"}) == 2
    adapter = ModelAdapter(
        name="x", pipeline_classes=("P",), block_lists=("blocks",), experts=("transformer_2",)
    )
    assert adapter.role("transformer_2") == "denoiser" and adapter.block_paths("transformer_2") == ("blocks",)
