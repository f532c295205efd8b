"""Offline, deterministic tiny tokenizers for the tiny random-weight pipelines.

Everything is built in code with the `tokenizers` library (no sentencepiece, no protobuf, no hub access):

* a byte-level BPE tokenizer laid out like OpenAI CLIP's (``</w>`` word suffix, specials at the end of the
  vocabulary), wrapped as transformers' ``CLIPTokenizerFast``;
* a Unigram tokenizer laid out like T5's (``<pad>=0``, ``</s>=1``, ``<unk>=2``), wrapped as
  ``T5TokenizerFast``;
* a Unigram tokenizer with extra special tokens for decoder-only LLM stand-ins.

The vocabularies come from ``PROMPT_WORDS``. BPE merges are learned by a tiny greedy learner with a fixed
tie-break instead of ``tokenizers.trainers.BpeTrainer``, whose tie order varies between runs: two builds must
give the same ids, or two builds of a tiny pipeline would not be bitwise identical.
"""

from __future__ import annotations

import functools
from collections import Counter

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram
from transformers import CLIPTokenizerFast, PreTrainedTokenizerFast, T5TokenizerFast

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "PROMPT_WORDS",
    "build_tiny_clip_tokenizer",
    "build_tiny_llm_tokenizer",
    "build_tiny_t5_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Words of typical text-to-image prompts; every one of them is a single token in the tiny vocabularies.
PROMPT_WORDS: tuple[str, ...] = tuple(
    """
    a an the of with and in on at by from to under over near for is are this that its
    photo photograph picture painting drawing sketch illustration render portrait landscape closeup
    cat cats dog dogs bird horse fox owl lion tiger bear rabbit fish dragon robot astronaut person
    man woman girl boy child people city street house castle tower bridge car boat ship train
    mountain mountains river lake sea ocean beach forest tree trees flower flowers garden field sky
    cloud clouds sun moon star stars night day sunset sunrise rain snow fog space planet
    red orange yellow green blue purple pink black white gray golden silver colorful dark bright
    big small tiny huge old young beautiful cute happy sad detailed realistic cinematic epic
    riding sitting standing running flying walking holding wearing reading eating
    hat glasses book cup table chair window door wall light shadow water fire ice glass
    style art oil watercolor digital anime cartoon pixel high quality resolution lighting
    soft sharp focus background foreground studio vintage modern futuristic fantasy
    """.split()
)

# Characters that get their own token, so no ASCII prompt ever maps to <unk>.
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-_*()[]<>/&%+=|#@"

# Same pre-tokenization pattern as OpenAI CLIP / transformers' CLIPTokenizer.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@functools.cache
def _learn_bpe_merges(words: tuple[str, ...], suffix: str) -> tuple[tuple[str, str], ...]:
    """Greedy BPE: merge the most frequent pair (ties: smallest pair) until every word is one symbol.

    Memoised: a pure function of its arguments, and the slowest part of building a tiny pipeline.
    """
    corpus = [[*w[:-1], w[-1] + suffix] for w in words]
    merges: list[tuple[str, str]] = []
    while corpus := [syms for syms in corpus if len(syms) > 1]:
        pairs = Counter(p for syms in corpus for p in zip(syms, syms[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for syms in corpus:
            i = 0
            while i < len(syms) - 1:
                if (syms[i], syms[i + 1]) == best:
                    syms[i : i + 2] = [syms[i] + syms[i + 1]]
                i += 1
    return tuple(merges)


def build_tiny_clip_tokenizer(
    model_max_length: int = 77, words: tuple[str, ...] = PROMPT_WORDS
) -> CLIPTokenizerFast:
    """A CLIP-style byte-level BPE tokenizer: ~1000 tokens, bos/eos are the last two ids, pad == eos.

    Read ``tok.bos_token_id`` / ``tok.eos_token_id`` / ``tok.pad_token_id`` into the ``CLIPTextConfig``.
    """
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars.sort()
    suffix = "</w>"
    merges = _learn_bpe_merges(words, suffix)
    # Same layout as the real CLIP vocab: bytes, bytes + "</w>", merge results, then the two specials.
    tokens = byte_chars + [c + suffix for c in byte_chars] + [a + b for a, b in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=list(merges),
            continuing_subword_prefix="",
            end_of_word_suffix=suffix,
            fuse_unk=False,
            unk_token=CLIP_EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False
    )
    return CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def _unigram_pieces(words: tuple[str, ...], specials: list[str]) -> list[tuple[str, float]]:
    """Unigram vocab: specials, then whole words (high score), then single characters (low score)."""
    pieces = [(s, 0.0) for s in specials]
    pieces += [("\u2581" + w, -5.0) for w in words]
    pieces += [("\u2581", -6.0)]
    pieces += [("\u2581" + c, -8.0) for c in _CHARS]
    pieces += [(c, -9.0) for c in _CHARS]
    seen: set[str] = set()
    return [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]


def _unigram_tokenizer(pieces: list[tuple[str, float]], unk_id: int) -> Tokenizer:
    """A SentencePiece-like Unigram tokenizer (whitespace split + metaspace), no normalizer."""
    tok = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    # Matches what transformers' T5Tokenizer rebuilds on load, so save/load round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    return tok


def build_tiny_t5_tokenizer(
    model_max_length: int = 512, words: tuple[str, ...] = PROMPT_WORDS
) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer: ``<pad>=0``, ``</s>=1``, ``<unk>=2``, appends ``</s>``, no extra_ids."""
    pieces = _unigram_pieces(words, ["<pad>", "</s>", "<unk>"])
    tok = _unigram_tokenizer(pieces, unk_id=2)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
        additional_special_tokens=[],
    )


def build_tiny_llm_tokenizer(
    special_tokens: tuple[str, ...] = (), words: tuple[str, ...] = PROMPT_WORDS
) -> PreTrainedTokenizerFast:
    """A decoder-only-LLM tokenizer: ``<|endoftext|>`` is pad/eos (id 0), no bos, left padding.

    ``special_tokens`` get ids right after the pieces, in the given order, and are never split.
    """
    pieces = _unigram_pieces(words, [CLIP_EOS, "<unk>"])
    tok = _unigram_tokenizer(pieces, unk_id=1)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token="<unk>", padding_side="left"
    )
    wrapped.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return wrapped
