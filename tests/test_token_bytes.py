"""Every token id maps to the exact bytes it stands for, in each tokenizer family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models
from transformers import PreTrainedTokenizerFast

from model_worker.token_bytes import token_byte_table, tokenizer_kind
from tests.reference import text_bytes_of_ids
from tests.tokenizer_factory import (
    BYTE_LEVEL_EOS,
    BYTE_LEVEL_EXTRA_SPECIALS,
    byte_level_bpe,
    byte_tokens,
    sentencepiece_byte_fallback,
    sentencepiece_legacy,
    sentencepiece_plain,
    wordpiece,
)

TEXTS = [
    "",
    "hello world",
    "hello",
    " hello",
    "  two leading spaces",
    "trailing space ",
    "multiple   inner   spaces",
    "line one\nline two\n",
    "\n\nleading newlines",
    "\tindented\ttabs",
    "你好世界",
    "你好 世界",
    "🙂🚀",
    " 🚀 rocket",
    "héllo naïve café",
    "héllo 你好 🙂 naïve\n世界🚀!",
    "unseen: zebra Ω ☃ ✓ \U0001d518 ß",  # 4-byte letter outside the BMP
    "combining e\u0301 and zero\u200bwidth",
    "1 + 2 = 3",
]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


@pytest.fixture(scope="module")
def sp() -> PreTrainedTokenizerFast:
    return sentencepiece_byte_fallback()


@pytest.fixture(scope="module")
def sp_plain() -> PreTrainedTokenizerFast:
    return sentencepiece_plain()


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sp_expected(text: str) -> bytes:
    """Metaspace adds "▁" before the text unless it already starts with one (a space): the table keeps it."""
    if not text or text.startswith(" "):
        return text.encode()
    return b" " + text.encode()


def test_kinds() -> None:
    assert tokenizer_kind(byte_level_bpe()) == "byte_level"
    assert tokenizer_kind(sentencepiece_byte_fallback()) == "sentencepiece"
    assert tokenizer_kind(sentencepiece_legacy()) == "sentencepiece"
    assert tokenizer_kind(sentencepiece_plain()) == "sentencepiece"
    assert tokenizer_kind(wordpiece()) == "other"


def test_kind_falls_back_to_the_vocabulary() -> None:
    """Without a decoder or pre-tokenizer in the JSON, the token strings tell the family."""
    bl = byte_level_bpe()
    bl.backend_tokenizer.pre_tokenizer = None
    bl.backend_tokenizer.decoder = None
    assert tokenizer_kind(bl) == "byte_level"
    plain = sentencepiece_plain()
    plain.backend_tokenizer.pre_tokenizer = None
    plain.backend_tokenizer.decoder = None
    assert tokenizer_kind(plain) == "sentencepiece"


def test_kind_from_the_normalizer() -> None:
    """Legacy Llama tokenizer.json: no pre-tokenizer, the normalizer writes spaces as "▁"."""
    legacy = sentencepiece_legacy()
    legacy.backend_tokenizer.decoder = None
    legacy.backend_tokenizer.model = models.BPE()  # no byte_fallback flag to go by either
    assert tokenizer_kind(legacy) == "sentencepiece"


class _Whole(AssertionError):
    pass


class _PartsOnly:
    """A backend tokenizer that refuses to hand out its whole JSON or its vocabulary as a dict: for Gemma 3
    (262,144 tokens, 514,906 merges) either was ~200 MB of short-lived Python objects in the worker."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        if name in ("to_str", "get_vocab"):
            raise _Whole(f"backend.{name}() reads the whole vocabulary")
        return getattr(self._backend, name)


class _Tokenizer:
    """A tokenizer whose backend is _PartsOnly."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self.backend_tokenizer = _PartsOnly(tokenizer.backend_tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)


@pytest.mark.parametrize(
    "build", [byte_level_bpe, sentencepiece_byte_fallback, sentencepiece_legacy, sentencepiece_plain]
)
def test_the_table_is_read_from_the_backends_parts(build: Callable[[], PreTrainedTokenizerFast]) -> None:
    """Where the backend's normalizer, pre-tokenizer or decoder name the family, the table and the kind come
    from those parts and the model's tokens one by one, never the whole JSON: the same table."""
    tokenizer = build()
    wrapped = _Tokenizer(tokenizer)
    with pytest.raises(_Whole):
        wrapped.backend_tokenizer.to_str()
    assert tokenizer_kind(wrapped) == tokenizer_kind(tokenizer)
    assert token_byte_table(wrapped, len(tokenizer) + 3) == token_byte_table(tokenizer, len(tokenizer) + 3)


# --- byte-level -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_spell_the_text(byte_level: PreTrainedTokenizerFast, text: str) -> None:
    table, special = token_byte_table(byte_level)
    ids = encode(byte_level, text)
    assert not any(special[i] for i in ids)
    assert text_bytes_of_ids(table, ids) == text.encode()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40).filter(lambda t: "<|" not in t))
def test_byte_level_any_text(text: str) -> None:
    ids = encode(_BYTE_LEVEL, text)
    assert text_bytes_of_ids(_BYTE_LEVEL_TABLE, ids) == text.encode()


def test_byte_level_alphabet(byte_level: PreTrainedTokenizerFast) -> None:
    """The 256 single-character tokens are the 256 bytes, through GPT-2's byte-to-unicode table."""
    table, _ = token_byte_table(byte_level)
    vocab = byte_level.get_vocab()
    singles = {table[i] for tok, i in vocab.items() if len(tok) == 1}
    assert singles == {bytes([b]) for b in range(256)}
    assert table[vocab["Ġ"]] == b" "
    assert table[vocab["Ċ"]] == b"\n"
    assert table[vocab["ĉ"]] == b"\t"
    assert table[vocab["Ã"]] == b"\xc3"
    assert table[vocab["©"]] == b"\xa9"
    assert table[vocab["Ã©"]] == "é".encode()
    assert table[vocab["hÃ©llo"]] == "héllo".encode()


def test_byte_level_agrees_with_the_decoder(byte_level: PreTrainedTokenizerFast) -> None:
    table, special = token_byte_table(byte_level)
    decoder = byte_level.backend_tokenizer.decoder
    for tok, i in byte_level.get_vocab().items():
        if not special[i]:
            assert decoder.decode([tok]) == table[i].decode("utf-8", "replace"), tok


def test_byte_level_specials(byte_level: PreTrainedTokenizerFast) -> None:
    table, special = token_byte_table(byte_level)
    names = [BYTE_LEVEL_EOS, *BYTE_LEVEL_EXTRA_SPECIALS]
    ids = byte_level.convert_tokens_to_ids(names)
    assert [i for i, s in enumerate(special) if s] == sorted(ids)
    assert [table[i] for i in ids] == [n.encode() for n in names]  # display bytes, flagged special


def test_added_tokens() -> None:
    """Non-special added tokens are literal text; special ones are flagged even if all_special_ids misses them."""
    tokenizer = byte_level_bpe()
    tokenizer.add_tokens(["foo bar", "naïve-word"])
    tokenizer.add_tokens([AddedToken("<|tool|>", special=True)])
    table, special = token_byte_table(tokenizer)
    foo, naive, tool = tokenizer.convert_tokens_to_ids(["foo bar", "naïve-word", "<|tool|>"])
    assert (table[foo], special[foo]) == (b"foo bar", False)
    assert (table[naive], special[naive]) == ("naïve-word".encode(), False)
    assert (table[tool], special[tool]) == (b"<|tool|>", True)
    text = "say foo bar and naïve-word\n"
    assert text_bytes_of_ids(table, encode(tokenizer, text)) == text.encode()


def test_model_larger_than_tokenizer(byte_level: PreTrainedTokenizerFast) -> None:
    n = len(byte_level)
    table, special = token_byte_table(byte_level, n + 7)
    assert len(table) == len(special) == n + 7
    assert table[n:] == [b""] * 7
    assert all(special[n:])
    short_table, short_special = token_byte_table(byte_level, 100)
    assert (short_table, short_special) == (table[:100], special[:100])


# --- SentencePiece with byte fallback -----------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_tokens_spell_the_text(sp: PreTrainedTokenizerFast, text: str) -> None:
    table, special = token_byte_table(sp)
    ids = encode(sp, text)
    assert not any(special[i] for i in ids)  # byte fallback: never <unk>
    assert text_bytes_of_ids(table, ids) == sp_expected(text)


def test_sentencepiece_prefix_space_is_exactly_one(sp: PreTrainedTokenizerFast) -> None:
    """The "first" scheme: one "▁" before text that does not start with a space, none before text that does."""
    table, _ = token_byte_table(sp)
    assert text_bytes_of_ids(table, encode(sp, "hello")) == b" hello"
    assert text_bytes_of_ids(table, encode(sp, " hello")) == b" hello"
    assert text_bytes_of_ids(table, encode(sp, "  hello")) == b"  hello"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40).filter(lambda t: "▁" not in t and "<" not in t))
def test_sentencepiece_any_text(text: str) -> None:
    ids = encode(_SP, text)
    assert text_bytes_of_ids(_SP_TABLE, ids) == sp_expected(text)


def test_byte_fallback_pieces(sp: PreTrainedTokenizerFast) -> None:
    table, special = token_byte_table(sp)
    ids = sp.convert_tokens_to_ids(byte_tokens())
    assert [table[i] for i in ids] == [bytes([b]) for b in range(256)]
    assert not any(special[i] for i in ids)


@pytest.mark.parametrize("text", ["你", "世界", "🙂", "🚀", "\n"])
def test_byte_fallback_spells_utf8(sp: PreTrainedTokenizerFast, text: str) -> None:
    """Characters outside the vocabulary become one piece per UTF-8 byte, each piece that single byte."""
    table, _ = token_byte_table(sp)
    ids = encode(sp, text)
    pieces = sp.convert_ids_to_tokens(ids)
    assert pieces[0] == "▁"
    assert pieces[1:] == [f"<0x{b:02X}>" for b in text.encode()]
    assert all(len(table[i]) == 1 for i in ids[1:])
    assert text_bytes_of_ids(table, ids[1:]) == text.encode()


def test_sentencepiece_pieces(sp: PreTrainedTokenizerFast) -> None:
    table, _ = token_byte_table(sp)
    vocab = sp.get_vocab()
    assert table[vocab["▁"]] == b" "
    assert table[vocab["é"]] == "é".encode()
    assert table[vocab["▁héllo"]] == " héllo".encode()


def test_sentencepiece_agrees_with_the_decoder(sp: PreTrainedTokenizerFast) -> None:
    """The decoder strips the text's first space, so decode after a plain "x" piece."""
    table, special = token_byte_table(sp)
    decoder = sp.backend_tokenizer.decoder
    for tok, i in sp.get_vocab().items():
        if not special[i]:
            assert decoder.decode(["x", tok])[1:] == table[i].decode("utf-8", "replace"), tok


def test_sentencepiece_specials(sp: PreTrainedTokenizerFast) -> None:
    table, special = token_byte_table(sp)
    assert [i for i, s in enumerate(special) if s] == [0, 1, 2]
    assert table[:3] == [b"<unk>", b"<s>", b"</s>"]
    ids = sp("hi")["input_ids"]  # with the BOS the post-processor adds
    assert ids[0] == sp.bos_token_id and special[ids[0]]
    assert text_bytes_of_ids(table, ids[1:]) == b" hi"


def test_sentencepiece_added_tokens() -> None:
    """Added words are literal text, matched in the raw text when not normalized."""
    tokenizer = sentencepiece_byte_fallback()
    tokenizer.add_tokens([AddedToken("foo bar", normalized=True), AddedToken("<tool>", normalized=False)])
    table, special = token_byte_table(tokenizer)
    foo, tool = tokenizer.convert_tokens_to_ids(["foo bar", "<tool>"])
    assert (table[foo], special[foo], table[tool], special[tool]) == (b"foo bar", False, b"<tool>", False)
    for text in ["x foo bar y", "xfoo bary", "call <tool> now"]:
        assert text_bytes_of_ids(table, encode(tokenizer, text)) == sp_expected(text), text
    assert text_bytes_of_ids(table, encode(tokenizer, "<tool> x")) == b"<tool> x"  # "▁" only before model text


# --- legacy SentencePiece: the normalizer does Metaspace's work --------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_legacy_sentencepiece_tokens_spell_the_text(text: str) -> None:
    """Prepend("▁") puts one space before any non-empty text, even one that starts with a space."""
    tokenizer = _LEGACY
    table, special = token_byte_table(tokenizer)
    ids = encode(tokenizer, text)
    assert not any(special[i] for i in ids)
    assert text_bytes_of_ids(table, ids) == (b" " + text.encode() if text else b"")


def test_legacy_normalized_added_tokens() -> None:
    """A normalized added token is matched in the normalized text: "foo bar" there is "▁foo▁bar", a space longer."""
    tokenizer = sentencepiece_legacy()
    tokenizer.add_tokens([AddedToken("foo bar", normalized=True), AddedToken("▁▁", normalized=True)])
    table, special = token_byte_table(tokenizer)
    foo, spaces = tokenizer.convert_tokens_to_ids(["foo bar", "▁▁"])
    assert tokenizer.convert_ids_to_tokens([foo, spaces]) == ["▁foo▁bar", "▁▁▁"]  # the backend's normalized names
    assert (table[foo], special[foo]) == (b" foo bar", False)
    assert (table[spaces], special[spaces]) == (b"   ", False)
    for text in ["x foo bar y", "a   b", "a    b"]:
        assert text_bytes_of_ids(table, encode(tokenizer, text)) == b" " + text.encode(), text


# --- plain SentencePiece (no byte fallback) -----------------------------------------------------


@pytest.mark.parametrize("text", [t for t in TEXTS if t.isascii()])
def test_plain_sentencepiece_spells_known_text(sp_plain: PreTrainedTokenizerFast, text: str) -> None:
    table, special = token_byte_table(sp_plain)
    ids = encode(sp_plain, text)
    assert not any(special[i] for i in ids)
    assert text_bytes_of_ids(table, ids) == sp_expected(text)


def test_plain_sentencepiece_unknown_is_special(sp_plain: PreTrainedTokenizerFast) -> None:
    """Without byte fallback "<0xNN>" means nothing and unknown text is <unk>, which is not text."""
    table, special = token_byte_table(sp_plain)
    ids = encode(sp_plain, "a 你好 b")
    assert sp_plain.unk_token_id in ids
    assert special[sp_plain.unk_token_id]
    assert [i for i, s in enumerate(special) if s] == sorted(sp_plain.all_special_ids)
    assert all(b"\xe2\x96\x81" not in t for t in table)  # no "▁" left anywhere


# --- shared tables for the hypothesis tests (built once; hypothesis dislikes function-scoped fixtures) ---

_BYTE_LEVEL = byte_level_bpe()
_BYTE_LEVEL_TABLE = token_byte_table(_BYTE_LEVEL)[0]
_SP = sentencepiece_byte_fallback()
_SP_TABLE = token_byte_table(_SP)[0]
_LEGACY = sentencepiece_legacy()
