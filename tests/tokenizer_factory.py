"""Small tokenizers of the three families, built locally (no hub access) for tests.

Each builder trains on a tiny corpus that has ASCII, CJK, emoji and accented Latin, and returns a
fresh ``PreTrainedTokenizerFast`` (tests may add tokens to it without affecting others).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS: tuple[str, ...] = (
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "héllo naïve café résumé",
    "你好世界 你好",
    "🙂🚀 rockets and smiles 🙂",
    "line one\nline two\n\tindented",
    "1 + 2 = 3; 10 + 20 = 30",
)

# Indented code: a byte-level BPE trained with it learns runs of spaces as tokens, which it spells
# differently at the end of a text and before a word ('\n  ' + '  ' against '\n   ' + ' a').
CODE_CORPUS: tuple[str, ...] = (
    "def add(a, b):\n    return a + b\n\ndef f(x):\n    if x:\n        return x\n    return 0\n",
) * 4

BYTE_LEVEL_EOS = "<|endoftext|>"
BYTE_LEVEL_EXTRA_SPECIALS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
SP_UNK, SP_BOS, SP_EOS = "<unk>", "<s>", "</s>"


def byte_tokens() -> list[str]:
    """SentencePiece byte-fallback pieces ``<0x00>`` .. ``<0xFF>``."""
    return [f"<0x{i:02X}>" for i in range(256)]


def byte_level_bpe(merges: int = 200, corpus: tuple[str, ...] = CORPUS) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE; ``<|endoftext|>`` is BOS = EOS = UNK = PAD, plus two chat specials."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [BYTE_LEVEL_EOS, *BYTE_LEVEL_EXTRA_SPECIALS]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BYTE_LEVEL_EOS,
        eos_token=BYTE_LEVEL_EOS,
        unk_token=BYTE_LEVEL_EOS,
        pad_token=BYTE_LEVEL_EOS,
        additional_special_tokens=list(BYTE_LEVEL_EXTRA_SPECIALS),
        clean_up_tokenization_spaces=False,
    )


def sentencepiece_byte_fallback(merges: int = 150, legacy: bool = False) -> PreTrainedTokenizerFast:
    """Llama-2 style: Metaspace ("▁", prepend "first") BPE with byte fallback and ``<0xNN>`` pieces.

    Ids as in Llama: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<0x00>`` .. ``<0xFF>`` 3..258. The alphabet is
    ASCII plus "é" and "ï", so CJK, emoji, newlines and tabs can only be spelled with byte pieces.
    ``legacy``: the older tokenizer.json of Llama-2 / Mistral instead, where a normalizer (Prepend "▁",
    Replace " " -> "▁") does the Metaspace's work and there is no pre-tokenizer; "▁" goes before all text.
    """
    scratch = Tokenizer(models.BPE(unk_token=SP_UNK))
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = [SP_UNK, SP_BOS, SP_EOS, *byte_tokens()]
    alphabet = ["▁", *(chr(c) for c in range(33, 127)), "é", "ï"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    scratch.train_from_iterator(CORPUS, trainer)
    vocab = scratch.get_vocab(with_added_tokens=False)
    merge_pairs = _bpe_merges(scratch)

    # Rebuilt with byte fallback; the byte pieces become ordinary vocabulary entries (as in Llama's tokenizer.json).
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merge_pairs, unk_token=SP_UNK, byte_fallback=True, fuse_unk=True)
    )
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([SP_UNK, SP_BOS, SP_EOS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SP_BOS} $A", pair=f"{SP_BOS} $A {SP_BOS} $B", special_tokens=[(SP_BOS, vocab[SP_BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SP_BOS,
        eos_token=SP_EOS,
        unk_token=SP_UNK,
        clean_up_tokenization_spaces=False,
    )


def sentencepiece_legacy(merges: int = 150) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral tokenizer.json as published: SentencePiece spaces done by the normalizer."""
    return sentencepiece_byte_fallback(merges, legacy=True)


def sentencepiece_plain(vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """T5 style: Unigram with Metaspace ("▁", prepend "always"), no byte fallback: unknown text is ``<unk>``.

    The corpus is ASCII only, so CJK, emoji and accented letters are unknown.
    """
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[SP_UNK, SP_BOS, SP_EOS],
        unk_token=SP_UNK,
        initial_alphabet=["▁", *(chr(c) for c in range(33, 127))],
        show_progress=False,
    )
    backend.train_from_iterator([line for line in CORPUS if line.isascii()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SP_BOS,
        eos_token=SP_EOS,
        unk_token=SP_UNK,
        clean_up_tokenization_spaces=False,
    )


def wordpiece(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """BERT style WordPiece: neither byte-level nor SentencePiece."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    )


def _bpe_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]
