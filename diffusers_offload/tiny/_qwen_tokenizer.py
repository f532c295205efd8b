"""Offline tiny byte-level BPE tokenizer laid out like Qwen2/Qwen2.5/Qwen3's, for the tiny Qwen pipelines.

Same pipeline as the real tokenizer: NFC, Qwen's split regex, byte-level BPE without subword prefix/suffix,
special tokens appended after the BPE vocabulary. The merges are learned with ``tokenizers``' BpeTrainer on
the prompt templates that QwenImage, Z-Image, LongCat-Image and Ovis-Image hard-code, so every template word
is one token, as in the real 151k vocabulary. That matters: QwenImage drops the first 34 template tokens
(``prompt_template_encode_start_idx``) and Ovis-Image the first 28 (``user_prompt_begin_id``); a vocabulary
that split template words differently would move those cuts.

BpeTrainer is deterministic here: its run-to-run id drift (tokenizers#1794) only hits continuing-subword and
end-of-word tokens, which this layout does not have, and it sorts the byte alphabet before numbering it.
"""

from __future__ import annotations

import functools
import json
import re

from diffusers.pipelines.longcat_image.system_messages import SYSTEM_PROMPT_EN, SYSTEM_PROMPT_ZH
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

__all__ = [
    "LONGCAT_PROMPT_PREFIX",
    "LONGCAT_PROMPT_SUFFIX",
    "OVIS_SYSTEM_PROMPT",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN3_CHAT_TEMPLATE",
    "QWEN_IMAGE_PROMPT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "build_tiny_qwen_tokenizer",
]

# Copies of the strings the diffusers pipelines set in __init__ (the tests check they still match).
QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
OVIS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
    "of the objects and background: "
)
LONGCAT_PROMPT_PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image "
    "content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n"
)
LONGCAT_PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

# Special tokens, in the order of the real Qwen2.5 vocabulary (object/box/quad tokens left out: nothing uses
# them). They are never split, and decode(skip_special_tokens=True) drops them.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's thinking markers: added (never split) but not special, as in the real Qwen3 tokenizer.
_QWEN3_THINK_TOKENS = ("<think>", "</think>")

# Hand-written equivalent of the Qwen2-VL/Qwen2.5-VL chat template: default system message; content is a
# string or a list of {"type": "text" | "image" | "video"} parts (LongCat's prompt rewriter sends a list).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Hand-written equivalent of Qwen3's chat template for plain chats: no default system message, and
# enable_thinking=False pre-fills an empty think block (Ovis-Image passes False, Z-Image passes True).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# transformers' Qwen2Tokenizer pre-tokenization regex.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# A few prompts on top of the templates, so typical test prompts are whole-word tokens too.
_PROMPT_WORDS = (
    "a cat, a dog, an astronaut riding a horse, a photo of a red car, bad quality, blurry, low resolution, "
    "dance monkey, a watercolor painting of a city at night"
)


def _training_texts() -> list[str]:
    """Template and prompt texts with the special tokens cut out (those are added whole, afterwards)."""
    texts = [
        QWEN_IMAGE_PROMPT_TEMPLATE,
        "<|im_start|>user\n" + OVIS_SYSTEM_PROMPT,
        LONGCAT_PROMPT_PREFIX,
        LONGCAT_PROMPT_SUFFIX,
        # LongCat's rewriter feeds these to generate(): as whole words, ~2k tokens instead of ~10k bytes.
        SYSTEM_PROMPT_EN + "\nUser Input: \nRewritten prompt:",
        SYSTEM_PROMPT_ZH + "\n用户输入为：\n改写后的prompt为：",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        _PROMPT_WORDS,
    ]
    specials = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS + _QWEN3_THINK_TOKENS))
    return [piece for text in texts for piece in specials.split(text) if piece]


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a byte-level BPE trained until every training word is one token (~4.6k tokens)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # vocab_size is only an upper bound: training stops once no pair is left to merge.
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_training_texts(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], tuple((a, b) for a, b in model["merges"])


def build_tiny_qwen_tokenizer(chat_template: str = QWEN2_VL_CHAT_TEMPLATE) -> Qwen2TokenizerFast:
    """A fresh ``Qwen2TokenizerFast``: ~4.6k BPE tokens, ``QWEN_SPECIAL_TOKENS``, ``<think>``, ``</think>``.

    ``<|endoftext|>`` is pad/unk and ``<|im_end|>`` eos, as in the real instruct tokenizers; read other ids
    with ``tok.convert_tokens_to_ids``. ``chat_template``: ``QWEN2_VL_CHAT_TEMPLATE`` for Qwen2.5-VL text
    encoders, ``QWEN3_CHAT_TEMPLATE`` for Qwen3 ones.
    """
    bpe_vocab, merges = _trained_bpe()
    # Number the added tokens up front, in Qwen's order; left to Qwen2Tokenizer.__init__, eos and pad would
    # be numbered first.
    vocab = dict(bpe_vocab)
    for token in QWEN_SPECIAL_TOKENS + _QWEN3_THINK_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=list(merges),
        eos_token="<|im_end|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN3_THINK_TOKENS])
    tok.chat_template = chat_template
    return tok
