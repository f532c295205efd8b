"""The tiny SD3 pipeline and the NextStep-1 stand-in: they run, are deterministic, and round-trip on disk."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from nextstep_standin import TINY_NEXTSTEP_CALL, NextStepPipeline, build_tiny_nextstep_pipeline

from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline, build_tiny_sd3_transformer

PROMPT = "a photo of a cat riding a horse"


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # On a small, busy CPU box, OpenMP threads fighting over tiny ops make a call ~10-100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sd3_image(pipe: StableDiffusion3Pipeline, prompt: str = PROMPT, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, **TINY_SD3_CALL, generator=generator, output_type="pt").images


def _realign(pipe: DiffusionPipeline) -> None:
    """Copy every weight into a fresh allocation.

    from_pretrained memory-maps safetensors, so tensors start at arbitrary byte offsets, and MKL's CPU
    matmul (1-row case) rounds differently for weights that are not 64-byte aligned: ~1e-7 differences,
    not a loading bug. Fresh torch allocations are 64-byte aligned like the originals.
    """
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                tensor.data = tensor.data.clone()


# --------------------------------------------------------------------------------------------------- SD3


def test_sd3_runs_with_cfg_batch_of_two() -> None:
    pipe = build_tiny_sd3_pipeline()
    batches: list[int] = []
    pipe.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(
            kwargs.get("hidden_states", args[0] if args else None).shape[0]
        ),
        with_kwargs=True,
    )
    image = _sd3_image(pipe)
    assert image.shape == (1, 3, TINY_SD3_CALL["height"], TINY_SD3_CALL["width"])
    assert torch.isfinite(image).all()
    assert image.std() > 0
    assert TINY_SD3_CALL["guidance_scale"] > 1
    assert batches == [2] * TINY_SD3_CALL["num_inference_steps"]


def test_sd3_is_deterministic() -> None:
    pipe = build_tiny_sd3_pipeline(seed=0)
    first = _sd3_image(pipe)
    assert torch.equal(first, _sd3_image(pipe))
    assert torch.equal(first, _sd3_image(build_tiny_sd3_pipeline(seed=0)))
    assert not torch.equal(first, _sd3_image(build_tiny_sd3_pipeline(seed=1)))
    assert not torch.equal(first, _sd3_image(pipe, prompt="a red dog"))


def test_sd3_build_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    build_tiny_sd3_pipeline(seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_sd3_text_configs_match_tokenizers() -> None:
    pipe = build_tiny_sd3_pipeline()
    for encoder, tokenizer in [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]:
        assert tokenizer.model_max_length == 77
        assert encoder.config.bos_token_id == tokenizer.bos_token_id
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.pad_token_id == tokenizer.pad_token_id
        assert encoder.config.vocab_size == len(tokenizer)
    assert pipe.text_encoder_3.config.vocab_size == len(pipe.tokenizer_3)
    assert pipe.tokenizer_3.pad_token_id == 0 and pipe.tokenizer_3.eos_token_id == 1
    assert pipe.vae.config.shift_factor and pipe.vae.config.scaling_factor


def test_sd3_transformer_layers_and_determinism() -> None:
    model = build_tiny_sd3_transformer(num_layers=5)
    assert len(model.transformer_blocks) == 5
    again = build_tiny_sd3_transformer(num_layers=5).state_dict()
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())
    other = build_tiny_sd3_transformer(seed=1, num_layers=5).state_dict()
    assert not all(torch.equal(t, other[k]) for k, t in model.state_dict().items())


def test_sd3_save_load_roundtrip(tmp_path) -> None:
    pipe = build_tiny_sd3_pipeline()
    expected = _sd3_image(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, StableDiffusion3Pipeline)
    loaded.set_progress_bar_config(disable=True)
    _realign(loaded)
    assert torch.equal(expected, _sd3_image(loaded))


# --------------------------------------------------------------------------------------------- NextStep


def _nextstep_image(pipe: NextStepPipeline, prompt: str = PROMPT, seed: int = 0) -> torch.Tensor:
    return pipe.generate_image(prompt, **TINY_NEXTSTEP_CALL, seed=seed)


def test_nextstep_runs() -> None:
    image = _nextstep_image(build_tiny_nextstep_pipeline())
    assert image.shape == (1, 3, *TINY_NEXTSTEP_CALL["hw"])
    assert torch.isfinite(image).all()
    assert image.std() > 0


def test_nextstep_is_deterministic() -> None:
    pipe = build_tiny_nextstep_pipeline(seed=0)
    first = _nextstep_image(pipe)
    assert torch.equal(first, _nextstep_image(pipe))
    assert torch.equal(first, _nextstep_image(build_tiny_nextstep_pipeline(seed=0)))
    assert not torch.equal(first, _nextstep_image(build_tiny_nextstep_pipeline(seed=1)))
    assert not torch.equal(first, _nextstep_image(pipe, seed=1))


def test_nextstep_module_tree_matches_upstream_paths() -> None:
    model = build_tiny_nextstep_pipeline().model
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 2
    assert (
        isinstance(model.image_head.net.res_blocks, torch.nn.ModuleList)
        and len(model.image_head.net.res_blocks) == 2
    )
    assert "gen_pos_embed" in dict(model.named_buffers())
    for name in ["embed_tokens", "norm", "lm_head", "image_in_projector", "image_out_projector"]:
        assert isinstance(getattr(model, name), torch.nn.Module)


def test_nextstep_generation_loop_shape() -> None:
    pipe = build_tiny_nextstep_pipeline()
    model = pipe.model
    calls: Counter[str] = Counter()
    decode_shapes: list[tuple[int, ...]] = []

    def count(name: str):
        return lambda *_: calls.update([name])

    model.layers[0].register_forward_pre_hook(lambda _m, args: decode_shapes.append(tuple(args[0].shape)))
    model.layers[-1].register_forward_pre_hook(count("last_layer"))
    model.image_head.net.register_forward_pre_hook(count("head_net"))
    model.image_head.net.res_blocks[-1].register_forward_pre_hook(count("last_res_block"))
    model.lm_head.register_forward_pre_hook(count("lm_head"))
    model.register_forward_pre_hook(count("model_forward"))

    _nextstep_image(pipe)

    hw, steps = TINY_NEXTSTEP_CALL["hw"], TINY_NEXTSTEP_CALL["num_sampling_steps"]
    n_tokens = (hw[0] // pipe.down_factor) * (hw[1] // pipe.down_factor)
    assert n_tokens == 16
    assert calls["last_layer"] == 1 + n_tokens  # prefill + one single-token forward per image token
    assert calls["head_net"] == calls["last_res_block"] == n_tokens * steps
    assert calls["lm_head"] == 0 and calls["model_forward"] == 0
    batch = 2  # CFG: prompt + negative prompt
    assert decode_shapes[0][0] == batch and decode_shapes[0][1] > 1
    assert decode_shapes[1:] == [(batch, 1, model.config.hidden_size)] * n_tokens
