"""The union vocabulary pools identical bytes across tokenizer families, and all EOS into END."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from coordinator.union_vocab import END, ModelVocab, UnionVocab
from model_worker.token_bytes import token_byte_table
from tests.tokenizer_factory import BYTE_LEVEL_EXTRA_SPECIALS, byte_level_bpe, sentencepiece_byte_fallback

PADDING = 5  # model embeddings larger than the tokenizer, as real checkpoints often have


def model_vocab(tokenizer: PreTrainedTokenizerFast, padding: int = PADDING) -> ModelVocab:
    tokens, special = token_byte_table(tokenizer, len(tokenizer) + padding)
    return ModelVocab(tokens=tokens, special=special, eos_ids=frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def bl() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


@pytest.fixture(scope="module")
def sp() -> PreTrainedTokenizerFast:
    return sentencepiece_byte_fallback()


@pytest.fixture(scope="module")
def vocabs(bl: PreTrainedTokenizerFast, sp: PreTrainedTokenizerFast) -> list[ModelVocab]:
    return [model_vocab(bl), model_vocab(sp)]


@pytest.fixture(scope="module")
def union(vocabs: list[ModelVocab]) -> UnionVocab:
    return UnionVocab(vocabs)


def test_index_arrays(union: UnionVocab, vocabs: list[ModelVocab]) -> None:
    assert len(union.index) == len(vocabs)
    for index, vocab in zip(union.index, vocabs, strict=True):
        assert isinstance(index, np.ndarray)
        assert index.dtype == np.int64
        assert index.shape == (len(vocab.tokens),)
        assert index.min() >= -1 and index.max() < union.size


def test_every_text_token_maps_to_its_bytes(union: UnionVocab, vocabs: list[ModelVocab]) -> None:
    for index, vocab in zip(union.index, vocabs, strict=True):
        for i, (data, special) in enumerate(zip(vocab.tokens, vocab.special, strict=True)):
            if not special:
                assert union.bytes_of(int(index[i])) == data
                assert union.lookup(data) == index[i]


def test_size_is_distinct_bytes_plus_end(union: UnionVocab, vocabs: list[ModelVocab]) -> None:
    distinct = {t for v in vocabs for t, s in zip(v.tokens, v.special, strict=True) if not s}
    assert union.size == len(distinct) + 1


def test_single_bytes_pool_across_families(
    union: UnionVocab, bl: PreTrainedTokenizerFast, sp: PreTrainedTokenizerFast
) -> None:
    """GPT-2's 'Ã' (byte 0xC3) and Llama's <0xC3> are one entry: a union keyed by token strings fails this."""
    bl_index, sp_index = union.index
    bl_vocab, sp_vocab = bl.get_vocab(), sp.get_vocab()
    bl_by_byte = {bytes([b]): i for c, i in bl_vocab.items() if len(c) == 1 for b in [_gpt2_byte(c)]}
    for b in range(256):
        bl_uid = bl_index[bl_by_byte[bytes([b])]]
        sp_uid = sp_index[sp_vocab[f"<0x{b:02X}>"]]
        assert bl_uid == sp_uid, f"byte {b:#04x}"
        assert union.bytes_of(int(bl_uid)) == bytes([b])
    assert bl_index[bl_vocab["Ã"]] == sp_index[sp_vocab["<0xC3>"]] == union.lookup(b"\xc3")


def test_multibyte_tokens_pool_across_families(
    union: UnionVocab, bl: PreTrainedTokenizerFast, sp: PreTrainedTokenizerFast
) -> None:
    """'Ã©' (byte-level) and 'é' (SentencePiece) are both b"\\xc3\\xa9"; 'Ġhello' and '▁hello' both b" hello"."""
    bl_index, sp_index = union.index
    bl_vocab, sp_vocab = bl.get_vocab(), sp.get_vocab()
    for bl_token, sp_token, data in [("Ã©", "é", "é".encode()), ("Ġhello", "▁hello", b" hello")]:
        uid = bl_index[bl_vocab[bl_token]]
        assert uid == sp_index[sp_vocab[sp_token]] == union.lookup(data)
        assert union.bytes_of(int(uid)) == data


def test_shared_bytes_share_ids(union: UnionVocab, vocabs: list[ModelVocab]) -> None:
    a, b = vocabs
    a_ids = {t: i for i, (t, s) in enumerate(zip(a.tokens, a.special, strict=True)) if not s}
    b_ids = {t: i for i, (t, s) in enumerate(zip(b.tokens, b.special, strict=True)) if not s}
    shared = a_ids.keys() & b_ids.keys()
    assert len(shared) > 256  # all single bytes, plus merged words both learned
    for data in shared:
        assert union.index[0][a_ids[data]] == union.index[1][b_ids[data]]


def test_string_union_would_not_pool() -> None:
    """Regression guard for the GaC defect: token strings never meet, so their union double counts."""
    bl, sp = byte_level_bpe(), sentencepiece_byte_fallback()
    by_string = set(bl.get_vocab()) | set(sp.get_vocab())
    union = UnionVocab([model_vocab(bl), model_vocab(sp)])
    assert union.size < len(by_string) - 256  # at least the 256 bytes are pooled
    # The same text through either model lands on union ids that spell the same bytes.
    text = "héllo 你好 🙂"
    bl_uids = union.index[0][bl(text, add_special_tokens=False)["input_ids"]]
    sp_uids = union.index[1][sp(text, add_special_tokens=False)["input_ids"]]
    assert b"".join(union.bytes_of(int(u)) for u in bl_uids) == text.encode()
    assert b"".join(union.bytes_of(int(u)) for u in sp_uids) == b" " + text.encode()
    # The byte fallback pieces of "你" are the byte-level model's single-byte entries.
    single_bytes = set(union.index[0][[bl.get_vocab()[c] for c in ("ä", "½", "ł")]].tolist())
    assert single_bytes == {union.lookup(b) for b in (b"\xe4", b"\xbd", b"\xa0")}
    assert single_bytes <= set(sp_uids.tolist())


def test_eos_pools_into_end(union: UnionVocab, bl: PreTrainedTokenizerFast, sp: PreTrainedTokenizerFast) -> None:
    assert END == 0
    assert union.index[0][bl.eos_token_id] == END
    assert union.index[1][sp.eos_token_id] == END
    assert union.is_end(END) and not union.is_end(1)
    assert union.bytes_of(END) == b""


def test_other_specials_are_not_text(
    union: UnionVocab, bl: PreTrainedTokenizerFast, sp: PreTrainedTokenizerFast
) -> None:
    for name in BYTE_LEVEL_EXTRA_SPECIALS:
        assert union.index[0][bl.convert_tokens_to_ids(name)] == -1
    assert union.index[1][sp.bos_token_id] == -1
    assert union.index[1][sp.unk_token_id] == -1
    for index in union.index:  # padding ids past the tokenizer
        assert (index[-PADDING:] == -1).all()
    assert (union.index[0] == -1).sum() == len(BYTE_LEVEL_EXTRA_SPECIALS) + PADDING
    assert (union.index[1] == -1).sum() == 2 + PADDING  # <unk>, <s>
    assert union.lookup(b"<|im_end|>") is None  # display bytes of a special token are no entry
    assert union.lookup(b"</s>") is None


def test_ids_are_deterministic_in_model_then_token_order() -> None:
    a = ModelVocab(
        tokens=[b"x", b"<eos>", b"ab", b"x", b"<pad>"],
        special=[False, True, False, False, True],
        eos_ids=frozenset({1}),
    )
    b = ModelVocab(
        tokens=[b"</s>", b"ab", b"c", b"", b"x"], special=[True, False, False, False, False], eos_ids=frozenset({0})
    )
    union = UnionVocab([a, b])
    assert union.size == 4
    assert union.index[0].tolist() == [1, END, 2, 1, -1]
    assert union.index[1].tolist() == [END, 2, 3, -1, 1]  # empty non-special bytes: -1
    assert [union.bytes_of(u) for u in range(union.size)] == [b"", b"x", b"ab", b"c"]
    again = UnionVocab([a, b])
    assert all((i == j).all() for i, j in zip(union.index, again.index, strict=True))
    swapped = UnionVocab([b, a])
    assert [swapped.bytes_of(u) for u in range(swapped.size)] == [b"", b"ab", b"c", b"x"]


def test_eos_that_is_not_flagged_special_is_still_end() -> None:
    vocab = ModelVocab(tokens=[b"a", b"\n\n"], special=[False, False], eos_ids=frozenset({1}))
    union = UnionVocab([vocab])
    assert union.index[0].tolist() == [1, END]
    assert union.lookup(b"\n\n") is None  # EOS creates no text entry
    assert union.size == 2


def test_lookup_and_bounds(union: UnionVocab) -> None:
    assert union.lookup(b"no model has this token \x00\xff") is None
    assert union.lookup(b"") is None
    with pytest.raises(IndexError):
        union.bytes_of(union.size)
    with pytest.raises(IndexError):
        union.bytes_of(-1)


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="special flags"):
        UnionVocab([ModelVocab(tokens=[b"a", b"b"], special=[False], eos_ids=frozenset())])


def test_coordinator_module_is_torch_free() -> None:
    code = (
        "import sys, coordinator.union_vocab;"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _gpt2_byte(char: str) -> int:
    """The byte a character of GPT-2's byte-to-unicode alphabet stands for (independent of the module under test)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    code = ord(char)
    return code if code in printable else shifted[code - 256]
