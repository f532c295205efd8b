"""The tiny Qwen-family pipelines (Qwen-Image, Z-Image, LongCat-Image, Ovis-Image) and their tokenizer.

Each pipeline must run a 64x64, 2-step call on CPU fast, bitwise deterministically, without NaN, and survive
``save_pretrained`` -> ``DiffusionPipeline.from_pretrained`` offline. The call-count table documents what each
pipeline asks of its components, which is what offloading hooks have to serve.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_offload.tiny._qwen_tokenizer import (
    LONGCAT_PROMPT_PREFIX,
    LONGCAT_PROMPT_SUFFIX,
    OVIS_SYSTEM_PROMPT,
    QWEN3_CHAT_TEMPLATE,
    QWEN_IMAGE_PROMPT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    _trained_bpe,
    build_tiny_qwen_tokenizer,
)
from diffusers_offload.tiny.longcat_image import (
    TINY_LONGCAT_IMAGE_CALL,
    build_tiny_longcat_image_pipeline,
)
from diffusers_offload.tiny.ovis_image import TINY_OVIS_IMAGE_CALL, build_tiny_ovis_image_pipeline
from diffusers_offload.tiny.qwen_image import (
    REWRITE_TOKENS,
    TINY_QWEN_IMAGE_CALL,
    build_tiny_qwen_image_pipeline,
)
from diffusers_offload.tiny.z_image import TINY_Z_IMAGE_CALL, build_tiny_z_image_pipeline

Builder = Callable[..., DiffusionPipeline]

CASES: dict[str, tuple[Builder, dict[str, Any]]] = {
    "qwen_image": (build_tiny_qwen_image_pipeline, TINY_QWEN_IMAGE_CALL),
    "z_image": (build_tiny_z_image_pipeline, TINY_Z_IMAGE_CALL),
    "longcat_image": (build_tiny_longcat_image_pipeline, TINY_LONGCAT_IMAGE_CALL),
    "ovis_image": (build_tiny_ovis_image_pipeline, TINY_OVIS_IMAGE_CALL),
}

# Component method calls made by one default call, 2 steps. The DiT runs twice per step with separate CFG
# passes (Qwen-Image, LongCat, Ovis) and once per step with a batch of 2 (Z-Image). LongCat's text encoder
# also rewrites the prompt with one generate(): a prefill forward plus one forward per generated token.
EXPECTED_CALLS: dict[str, dict[str, int]] = {
    "qwen_image": {"text_encoder.forward": 2, "transformer.forward": 4, "vae.decode": 1},
    "z_image": {"text_encoder.forward": 2, "transformer.forward": 2, "vae.decode": 1},
    "longcat_image": {
        "text_encoder.generate": 1,
        "text_encoder.forward": 1 + REWRITE_TOKENS + 2,
        "transformer.forward": 4,
        "vae.decode": 1,
    },
    "ovis_image": {"text_encoder.forward": 2, "transformer.forward": 4, "vae.decode": 1},
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The ops are tiny: with several threads on a busy machine, OpenMP barriers made calls 10-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(
    pipe: DiffusionPipeline, call: dict[str, Any], prompt: str = "a cat", **overrides: Any
) -> torch.Tensor:
    kwargs = {**call, **overrides}
    return pipe(prompt, **kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images


def _modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _public(config: dict[str, Any]) -> dict[str, Any]:
    # Drops bookkeeping such as "_use_default_values", which is only set on loaded configs.
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _rehome_weights(pipe: DiffusionPipeline) -> None:
    """Copy every parameter and buffer into a fresh allocation.

    from_pretrained leaves weights in safetensors memory maps, at file offsets only 8-byte aligned, and MKL's
    batch-1 GEMV rounds differently when a weight is not 16-byte aligned: same values, ~1e-7 drift in outputs.
    Fresh allocations are 64-byte aligned, like the ones of a freshly built pipeline.
    """
    for module in _modules(pipe).values():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.data = tensor.data.clone()


@pytest.mark.parametrize("name", CASES)
def test_call_is_fast_finite_and_deterministic(name: str) -> None:
    build, call = CASES[name]
    pipe = build(seed=0)
    image = _run(pipe, call)
    start = time.perf_counter()
    again = _run(pipe, call)
    elapsed = time.perf_counter() - start

    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert image.std() > 0.01  # not a flat image
    assert torch.equal(image, again), "two calls differ"
    assert torch.equal(image, _run(build(seed=0), call)), "two builds with the same seed differ"
    assert not torch.equal(image, _run(build(seed=1), call)), "the seed does not reach the weights"
    assert elapsed < 1.0, f"{name}: warm call took {elapsed:.2f} s"


@pytest.mark.parametrize("name", CASES)
def test_prompt_reaches_the_dit(name: str) -> None:
    build, call = CASES[name]
    pipe = build()
    # LongCat's rewrite of a random LM barely depends on the prompt: encode the prompt itself.
    extra = {"enable_prompt_rewrite": False} if name == "longcat_image" else {}
    assert not torch.equal(_run(pipe, call, "a cat", **extra), _run(pipe, call, "a red car", **extra))


@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    build, call = CASES[name]
    pipe = build()
    reference = _run(pipe, call)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)

    assert type(loaded) is type(pipe)
    assert loaded.components.keys() == pipe.components.keys()
    for key, component in pipe.components.items():
        other = loaded.components[key]
        # LongCat's text_processor is a tokenizer standing in for Qwen2VLProcessor; it comes back as one.
        assert type(other) is type(component), key
        if isinstance(component, torch.nn.Module):
            mine, theirs = component.state_dict(), other.state_dict()
            assert mine.keys() == theirs.keys(), key
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), key
        elif hasattr(component, "backend_tokenizer"):
            assert other.backend_tokenizer.to_str() == component.backend_tokenizer.to_str(), key
            assert other.chat_template == component.chat_template, key
        else:
            assert _public(other.config) == _public(component.config), key

    assert torch.allclose(_run(loaded, call), reference, atol=1e-5)  # weights still in the mmaps
    _rehome_weights(loaded)
    assert torch.equal(_run(loaded, call), reference)


@pytest.mark.parametrize("name", CASES)
def test_component_calls(name: str) -> None:
    build, call = CASES[name]
    pipe = build()
    counts: Counter[str] = Counter()
    for key, module in _modules(pipe).items():
        module.register_forward_pre_hook(functools.partial(_count_forward, counts, f"{key}.forward"))
        for method in ("generate", "encode", "decode"):
            if hasattr(module, method):
                setattr(module, method, _counting(counts, f"{key}.{method}", getattr(module, method)))
    _run(pipe, call)
    assert dict(counts) == EXPECTED_CALLS[name]


def _count_forward(counts: Counter[str], key: str, *_: Any) -> None:
    counts[key] += 1


def _counting(counts: Counter[str], key: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return method(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_build_runs(name: str) -> None:
    build, call = CASES[name]
    pipe = build(dtype=torch.bfloat16)
    assert {m.dtype for m in _modules(pipe).values()} == {torch.bfloat16}
    image = _run(pipe, call)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_tokenizer_layout() -> None:
    tok = build_tiny_qwen_tokenizer()
    specials = tok.convert_tokens_to_ids([*QWEN_SPECIAL_TOKENS, "<think>", "</think>"])
    bpe_size = len(_trained_bpe()[0])
    # Added tokens follow the BPE vocabulary in Qwen's order, as in the real 151k vocabulary.
    assert specials == list(range(bpe_size, bpe_size + len(specials))) and len(tok) == specials[-1] + 1
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    ids = tok("<|im_start|>user\na cat<|im_end|>").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|im_start|>",
        "user",
        "\u010a",
        "a",
        "\u0120cat",
        "<|im_end|>",
    ]
    assert tok.decode(ids, skip_special_tokens=True) == "user\na cat"


def test_tokenizer_training_is_deterministic_across_processes() -> None:
    # BpeTrainer numbers some tokens in hash-map order (tokenizers#1794); a new process has new hash seeds.
    code = (
        "import hashlib, json; from diffusers_offload.tiny._qwen_tokenizer import _trained_bpe; "
        "print(hashlib.sha256(json.dumps(_trained_bpe()).encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == hashlib.sha256(json.dumps(_trained_bpe()).encode()).hexdigest()


def test_chat_templates() -> None:
    qwen2_vl = build_tiny_qwen_tokenizer()
    message = [{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]
    assert qwen2_vl.apply_chat_template(message, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )
    qwen3 = build_tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    message = [{"role": "user", "content": "a cat"}]
    chat = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    render = qwen3.apply_chat_template
    assert render(message, tokenize=False, add_generation_prompt=True, enable_thinking=True) == chat
    assert render(message, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        chat + "<think>\n\n</think>\n\n"
    )


def test_hard_coded_template_cuts() -> None:
    """The tiny tokenizer splits the templates like the real one, so the pipelines' fixed cuts still fit."""
    qwen = build_tiny_qwen_image_pipeline()
    assert qwen.prompt_template_encode == QWEN_IMAGE_PROMPT_TEMPLATE
    ids = qwen.tokenizer(QWEN_IMAGE_PROMPT_TEMPLATE.format("a cat")).input_ids
    cut = qwen.prompt_template_encode_start_idx
    assert cut == 34
    # 34 tokens are exactly the system turn and "<|im_start|>user\n": the embeddings start at the prompt.
    prefix, suffix = QWEN_IMAGE_PROMPT_TEMPLATE.split("{}")
    assert qwen.tokenizer.decode(ids[:cut]) == prefix
    assert qwen.tokenizer.decode(ids[cut:]) == "a cat" + suffix

    ovis = build_tiny_ovis_image_pipeline()
    assert ovis.system_prompt == OVIS_SYSTEM_PROMPT
    ids = ovis.tokenizer(ovis._get_messages("a cat")[0], add_special_tokens=False).input_ids
    cut = ovis.user_prompt_begin_id
    assert cut == 28
    # One token per word (what makes Qwen-Image's 34 exact with the real tokenizer) puts the 28-token cut
    # after "background": the ":" token is kept, as upstream.
    assert ovis.tokenizer.decode(ids[:cut]) == "<|im_start|>user\n" + OVIS_SYSTEM_PROMPT.removesuffix(": ")
    assert ovis.tokenizer.decode(ids[cut:]).startswith(": a cat<|im_end|>")

    longcat = build_tiny_longcat_image_pipeline()
    # LongCat measures its prefix/suffix with the tokenizer itself; only the strings need to match.
    assert longcat.prompt_template_encode_prefix == LONGCAT_PROMPT_PREFIX
    assert longcat.prompt_template_encode_suffix == LONGCAT_PROMPT_SUFFIX


def test_longcat_rewrite_generates_exactly_rewrite_tokens() -> None:
    pipe = build_tiny_longcat_image_pipeline()
    prompt = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    inputs = pipe.text_processor(text=[prompt], return_tensors="pt")
    # Same max_new_tokens as LongCatImagePipeline.rewire_prompt; the generation config stops it early.
    out = pipe.text_encoder.generate(**inputs, max_new_tokens=512)
    new = out[0, inputs.input_ids.shape[1] :].tolist()
    assert len(new) == REWRITE_TOKENS + 1 and new[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.eos_token_id not in new[:-1]
